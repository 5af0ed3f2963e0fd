"""figures.py through `reproduce.py RECIPE --report --plot DIR`: the SVG parses, each plotted point is the report's
number (its data and its pixel position read back through the axis ticks), missing cells are absent points, run counts
are shown, published points sit beside measured ones, and a recipe without figures is refused with nothing written."""
import csv
import json
import math
import os
import random
import xml.etree.ElementTree as ET

import pytest

import figures
import reproduce

SVG = "{http://www.w3.org/2000/svg}"


def option(job, name):
    command = job["command"]
    return command[command.index(name) + 1] if name in command else None


def fake_results(recipe, out, drop=lambda job: False):
    """results.jsonl rows with random numbers for every planned run but those `drop` names. The numbers are inputs:
    the tests compare the figure with the report computed from them."""
    jobs, _ = reproduce.plan_recipe("r", recipe, "DATA", out)
    rng = random.Random(0)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for job in jobs:
            if drop(job):
                continue
            for key in job["keys"]:
                if key[0] == "variance":
                    row = dict(kind="variance", dataset=key[1], backbone=key[2], split=key[3], var_v=rng.random(),
                               var_t=rng.random())
                else:
                    row = dict(run_id=key[0], dataset=key[1], subsample=key[2], accuracy=round(rng.uniform(20, 90), 4),
                               train_seconds=1.0)
                f.write(json.dumps(row) + "\n")
    return jobs


def report(name, recipe, out, monkeypatch, capsys):
    monkeypatch.setitem(reproduce.RECIPES, name, recipe)
    plots, table = os.path.join(out, "figs"), os.path.join(out, "cells.csv")
    reproduce.main([name, "--output-dir", out, "--report", "--csv", table, "--plot", plots])
    printed = capsys.readouterr().out
    with open(table) as f:
        cells = {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(f)}
    trees = {f["name"]: ET.parse(os.path.join(plots, f"{f['name']}.svg")).getroot() for f in recipe["figures"]}
    assert all(f"wrote {os.path.join(plots, n)}.svg" in printed for n in trees)
    return cells, trees


def panels(svg):
    return {g.get("data-title"): g for g in svg.iter(f"{SVG}g") if g.get("class") == "panel"}


def points(panel, kind="measured"):
    return [c for c in panel.iter(f"{SVG}circle") if c.get("class") == f"point {kind}"]


def axis(panel, which, log2=False):
    """pixel -> value along the panel's x or y axis, read from its tick marks."""
    ticks = [t for t in panel.iter(f"{SVG}line") if t.get("class") == f"{which}tick"]
    (p0, v0), (p1, v1) = [(float(t.get("x1" if which == "x" else "y1")), float(t.get("data-value")))
                          for t in (ticks[0], ticks[-1])]
    f, inverse = (math.log2, lambda v: 2 ** v) if log2 else (float, float)
    return lambda pixel: inverse(f(v0) + (pixel - p0) / (p1 - p0) * (f(v1) - f(v0)))


def test_few_shot_curves_are_the_reports_numbers(tmp_path, monkeypatch, capsys):
    recipe = reproduce.upt_fig4(datasets=["dtd", "eurosat"], shots=[1, 2, 16], seeds=[1, 2, 3])
    jobs = fake_results(recipe, str(tmp_path), drop=lambda job: (  # a missing cell, and a cell with 2 of its 3 runs
        option(job, "--method") == "zeroshot" and option(job, "--dataset") == "eurosat"
        or option(job, "--method") == "upt" and option(job, "--dataset") == "dtd" and option(job, "--shots") == "2"
        and option(job, "--seed") == "3"))
    cells, trees = report("fig4", recipe, str(tmp_path), monkeypatch, capsys)
    svg = trees["upt-fig4"]
    assert set(panels(svg)) == {"Average", "DTD", "EuroSAT"}
    seen = 0
    for title, panel in panels(svg).items():
        to_x, to_y = axis(panel, "x", log2=True), axis(panel, "y")
        drawn = {(c.get("data-series"), round(to_x(float(c.get("cx"))))): c for c in points(panel)}
        for k in (1, 2, 16):
            for row in ["Zero-shot CLIP", *reproduce.UPT_METHODS]:
                cell = cells[f"{k} shots", row, title]
                if cell["mean"] == "":  # a missing cell: no point, never a zero
                    assert (row, k) not in drawn
                    continue
                c, seen = drawn.pop((row, k)), seen + 1
                assert float(c.get("data-y")) == pytest.approx(float(cell["mean"]), abs=1e-9)
                assert to_y(float(c.get("cy"))) == pytest.approx(float(cell["mean"]), abs=0.02)  # 0.01 px rounding
                assert c.get("data-n") == cell["n"] and c.get("data-std") == (cell["std"] and repr(float(cell["std"])))
                if cell["n"] == "2":  # fewer runs than the series' usual 3: the point says so
                    assert (row, k, title) == ("UPT", 2, "DTD") and c.get("fill") == "white"
                    assert any(t.text == "n=2" for t in panel.iter(f"{SVG}text"))
        assert drawn == {}  # nothing drawn that the report does not hold
    assert seen == 3 * 5 * 3 - 3 - 3  # zero-shot CLIP on EuroSAT, and so on the Average, is missing at 3 shot counts
    rings = {(c.get("data-series"), t): float(c.get("data-y"))
             for t, p in panels(svg).items() for c in points(p, "paper")}
    assert rings == {(m, t): reproduce.UPT_TABLE2[m][i] for m in reproduce.UPT_METHODS
                     for t, i in [("DTD", 8), ("EuroSAT", 9)]}  # no Average ring: the paper's is over 11
    legend = {t.get("data-series"): t.text for t in svg.iter(f"{SVG}text") if t.get("class") == "legend"}
    assert legend["Zero-shot CLIP"] == "Zero-shot CLIP (1 run)" and legend["UPT"].startswith("UPT (")
    assert len(jobs) == 2 + 4 * 2 * 3 * 3


def test_base_to_new_tradeoff_and_variance_scatter(tmp_path, monkeypatch, capsys):
    recipe = reproduce.base_to_new(datasets=["dtd", "eurosat"], seeds=[1, 2], budgets=(10, 50))
    fake_results(recipe, str(tmp_path))
    cells, trees = report("b2n", recipe, str(tmp_path), monkeypatch, capsys)
    for title, panel in panels(trees["rethinking-fig2"]).items():
        to_x, to_y = axis(panel, "x"), axis(panel, "y")
        for c in points(panel):
            rows = [c.get("data-series")] if c.get("data-series") != "CoOp by epochs" else ["CoOp 10 ep", "CoOp 50 ep"]
            assert any(to_x(float(c.get("cx"))) == pytest.approx(float(cells[title, r, "Base"]["mean"]), abs=0.02) and
                       to_y(float(c.get("cy"))) == pytest.approx(float(cells[title, r, "New"]["mean"]), abs=0.02)
                       for r in rows)
        assert len(points(panel)) == 4 + 2  # CLIP, CoOp, CoCoOp, UPT, and the two CoOp budgets on one line
    average = panels(trees["rethinking-fig2"])["Average"]
    assert {(c.get("data-series"), float(c.get("data-x")), float(c.get("data-y"))) for c in points(average, "paper")} \
        == {(m, v[0], v[1]) for m, v in reproduce.BASE_TO_NEW.items()}

    recipe = reproduce.upt_fig1(datasets=["dtd", "eurosat", "ucf101"], seeds=[1, 2], shots=4)
    assert all("--shots" not in r["argv"] or r["argv"][r["argv"].index("--shots") + 1] == "4" for r in recipe["runs"])
    out = tmp_path / "fig1"
    out.mkdir()
    fake_results(recipe, str(out), drop=lambda job: job["id"].startswith("variance_DTD"))  # DTD: in no panel
    cells, trees = report("fig1", recipe, str(out), monkeypatch, capsys)
    for spec, (title, panel) in zip(recipe["figures"][0]["panels"], panels(trees["upt-fig1"]).items()):
        assert title == spec["title"]
        labels = {t.text for t in panel.iter(f"{SVG}text")}
        assert "DTD" not in labels and {"EuroSAT", "UCF101"} <= labels
        for c in points(panel):
            row = next(r for r in ("EuroSAT", "UCF101") if f": {r}:" in c.find(f"{SVG}title").text)
            assert float(c.get("data-x")) == pytest.approx(float(cells["Fig. 1", row, spec["x"]]["mean"]))
            assert float(c.get("data-y")) == pytest.approx(float(cells["Fig. 1", row, spec["y"]]["mean"]))
            assert c.get("data-n") == cells["Fig. 1", row, spec["runs"]]["n"] == "2"


def test_plot_is_refused_for_a_recipe_without_figures(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["upt-table1", "--output-dir", str(tmp_path), "--report", "--plot", str(tmp_path / "figs")])
    assert e.value.code == 2 and "has no figure" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()


def test_nice_ticks_cover_the_range_with_round_steps():
    for lo, hi in [(0.1, 0.93), (55.3, 81.44), (-17.2, 19.9), (5, 5)]:
        ticks = figures.nice_ticks(lo, hi)
        steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
        assert ticks[0] <= lo and ticks[-1] >= hi and len(steps) == 1 and 3 <= len(ticks) <= 8
        assert f"{steps.pop():.0e}"[0] in "125"


def test_accuracy_axes_stop_at_100_and_cut_the_band_there():
    figure = figures.curves("f", "t", {1: "1 shots", 2: "2 shots"}, ["A"], ["D"])
    cell = lambda mean, std: dict(mean=mean, std=std, n=3, complete=True)  # noqa: E731
    svg = ET.fromstring(ET.tostring(figures.render(figure, {"1 shots": {("A", "D"): cell(97.0, 6.0)},
                                                           "2 shots": {("A", "D"): cell(99.0, 4.0)}}, {})))
    panel = panels(svg)["D"]
    assert max(float(t.get("data-value")) for t in panel.iter(f"{SVG}line") if t.get("class") == "ytick") == 100
    to_y = axis(panel, "y")
    [band] = [p for p in panel.iter(f"{SVG}polygon") if p.get("class") == "band"]
    ys = [to_y(float(xy.split(",")[1])) for xy in band.get("points").split()]
    assert max(ys) == pytest.approx(100, abs=0.02) and min(ys) == pytest.approx(91, abs=0.02)
