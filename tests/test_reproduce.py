"""reproduce.py: recipes run end to end (only what is missing), exact --dry-run/--slurm commands, the report's numbers
against ones computed by hand, every built-in recipe's plan and run count, and the transcribed published numbers."""
import contextlib
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import zlib

import pytest

import reproduce
import train
from conftest import read_rows, write_colour_folder

SEEDS2 = [1, 2]



def in_process(calls):
    """A stand-in for reproduce.execute: train.main in this process, its output in the log."""
    def execute(command, env, log_path):
        assert command[:2] == ["python", "train.py"]
        calls.append(command)
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                train.main(command[2:])
            except SystemExit as e:
                return e.code
        return 0
    return execute


def csv_cells(path):
    with open(path) as f:
        return {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, folder):
    other = write_colour_folder(str(tmp_path_factory.mktemp("other")), colours={
        "cyan_sea": (30, 220, 220), "pink_rose": (240, 120, 200), "grey_rock": (120, 120, 120)})
    return [folder, other]


@pytest.fixture(scope="module")
def tiny(datasets, vit_checkpoint):
    """2 folder datasets x 2 shot counts x 2 seeds x 2 methods, 1 epoch each, on the tiny CLIP: 16 runs."""
    methods = {"FT": ["linear_ft", "--epochs", 1, "--batch-size", 4],
               "CoOp": ["coop", "--n-ctx", 2, "--epochs", 1, "--batch-size", 4]}
    columns = [reproduce.label(d) for d in datasets]
    return dict(title="tiny few-shot", runs=reproduce.few_shot(methods, datasets, [1, 2], SEEDS2, vit_checkpoint,
                                                                 extra=["--workers", "0"]),
                tables=[reproduce.table(f"{k} shots", methods, columns, derived_columns=reproduce.average(columns),
                                        published={("CoOp", columns[0]): 50.0}) for k in (1, 2)])


@pytest.fixture(scope="module")
def ran(tiny, datasets, tmp_path_factory):
    """The tiny recipe run once through reproduce.main, train.main in-process: -> (output dir, commands run)."""
    out, calls = str(tmp_path_factory.mktemp("reproduce")), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(reproduce.RECIPES, "tiny", tiny)
        mp.setattr(reproduce, "execute", in_process(calls))
        reproduce.main(["tiny", "--root", out, "--output-dir", out, "--gpus", "0"])
    return out, calls


def test_a_recipe_runs_once_then_only_what_is_missing(ran, tiny, monkeypatch, capsys):
    out, calls = ran
    jobs, _ = reproduce.plan_recipe("tiny", tiny, out, out)
    assert len(calls) == len(jobs) == 16 and len({tuple(c) for c in calls}) == 16
    assert {(r["run_id"], r["dataset"], r["subsample"]) for r in read_rows(out)} == {k for j in jobs for k in j["keys"]}
    assert all(os.path.isfile(os.path.join(out, "logs", f"{j['id']}.log")) for j in jobs)

    monkeypatch.setitem(reproduce.RECIPES, "tiny", tiny)
    again = []
    monkeypatch.setattr(reproduce, "execute", in_process(again))
    reproduce.main(["tiny", "--root", out, "--output-dir", out, "--gpus", "0"])
    assert again == [] and "0 runs to do (16 of 16 done)" in capsys.readouterr().out

    victim = next(j for j in jobs if "coop" in j["command"])  # its rows go: only it reruns, resumed from its checkpoint
    rows = read_rows(out)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["run_id"] != victim["id"])
    reproduce.main(["tiny", "--root", out, "--output-dir", out, "--gpus", "0"])
    assert again == [victim["command"] + ["--resume"]]
    assert "1 runs to do (15 of 16 done)" in capsys.readouterr().out
    assert reproduce.pending(jobs, reproduce.read_results(out)) == []


def test_report_equals_numbers_computed_by_hand(ran, tiny, datasets, monkeypatch, capsys, tmp_path):
    out, _ = ran
    monkeypatch.setitem(reproduce.RECIPES, "tiny", tiny)
    reproduce.main(["tiny", "--output-dir", out, "--report", "--csv", str(tmp_path / "t.csv")])
    text, cells = capsys.readouterr().out, csv_cells(tmp_path / "t.csv")
    last = {}
    for r in read_rows(out):  # rows may repeat (the rerun above): the last one counts
        last[r["method"], r["shots"], r["seed"], r["train_dataset"]] = r["accuracy"]
    for k in (1, 2):
        means = []
        for d in datasets:
            column = reproduce.label(d)
            for method, row in [("linear_ft", "FT"), ("coop", "CoOp")]:
                values = [last[method, k, s, "folder:" + os.path.abspath(d.removeprefix("folder:"))] for s in SEEDS2]
                cell = cells[f"{k} shots", row, column]
                assert float(cell["mean"]) == pytest.approx(statistics.mean(values))
                assert float(cell["std"]) == pytest.approx(statistics.stdev(values))  # ddof=1
                assert cell["n"] == "2" and f"{statistics.mean(values):.2f}±{statistics.stdev(values):.2f}" in text
                if row == "CoOp":
                    means.append(statistics.mean(values))
                    if d == datasets[0]:
                        assert float(cell["published"]) == 50.0
                        assert float(cell["diff"]) == pytest.approx(statistics.mean(values) - 50)
        assert float(cells[f"{k} shots", "CoOp", "Average"]["mean"]) == pytest.approx(statistics.mean(means))
    assert "complete: every cell has all its runs" in text and "cells lack runs" not in text


def synthetic_rows(out, jobs, value, skip=()):
    """Rows for every evaluation target of `jobs` but those in `skip`, accuracy value(key)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for job in jobs:
            for key in job["keys"]:
                if key not in skip:
                    row = dict(run_id=key[0], dataset=key[1], subsample=key[2], accuracy=value(key))
                    f.write(json.dumps(row) + "\n")


def test_base_to_new_harmonic_means_and_missing_cells(datasets, vit_checkpoint, tmp_path, monkeypatch, capsys):
    recipe = reproduce.base_to_new(datasets, SEEDS2, vit_checkpoint, budgets=(2,))
    out = str(tmp_path)
    jobs, cells = reproduce.plan_recipe("b2n", recipe, out, out)
    assert len(jobs) == 2 * (1 + 2 * 9)  # CLIP once; CoOp, CoCoOp, 2 VPT, UPT, 3 ablations and CoOp 2 ep x 2 seeds
    where = {}  # result key -> (table, row, column, seed)
    for entry, keys in cells:
        for column, key in zip(entry["columns"], keys):
            where[key] = (entry["table"], entry["row"], column, entry["sample"])
    A, B = (reproduce.label(d) for d in datasets)
    skip = {k for k, (t, r, c, s) in where.items() if (t, r) == (B, "MLP") and c == "Base"}  # a whole cell
    skip |= {k for k, (t, r, c, s) in where.items() if (t, r, c, s) == (B, "CoCoOp", "New", 2)}  # one seed of a cell
    value = lambda key: 40 + zlib.crc32(repr(where[key][:3]).encode()) % 50 + where[key][3] * 3.0  # any numbers
    synthetic_rows(out, jobs, value, skip)
    monkeypatch.setitem(reproduce.RECIPES, "b2n", recipe)
    reproduce.main(["b2n", "--output-dir", out, "--report", "--csv", str(tmp_path / "b.csv")])
    text, got = capsys.readouterr().out, csv_cells(tmp_path / "b.csv")

    def values(t, r, c):
        return [value(k) for k, w in where.items() if w[:3] == (t, r, c) and k not in skip]

    mean = lambda t, r, c: statistics.mean(values(t, r, c))

    hm = lambda b, n: 2 * b * n / (b + n)
    for t in (A, B):
        assert float(got[t, "CLIP", "H"]["mean"]) == pytest.approx(hm(mean(t, "CLIP", "Base"), mean(t, "CLIP", "New")))
        assert got[t, "CLIP", "Base"]["std"] == "" and got[t, "CLIP", "Base"]["n"] == "1"  # one run: no std
    base, new = (statistics.mean(mean(t, "UPT", c) for t in (A, B)) for c in ("Base", "New"))
    assert float(got["Average", "UPT", "Base"]["mean"]) == pytest.approx(base)
    assert float(got["Average", "UPT", "H"]["mean"]) == pytest.approx(hm(base, new))  # HM of the averages (CoCoOp)
    assert float(got["Average", "CLIP", "H"]["published"]) == 71.70
    assert got[B, "CoCoOp", "New"]["n"] == "1"  # one seed of two: shown with a *, listed as missing
    assert f"{B} | CoCoOp | New: 1 of 2 runs" in text and f"{B} | MLP | Base: 0 of 2 runs" in text
    assert got[B, "MLP", "Base"]["mean"] == got[B, "MLP", "H"]["mean"] == got["Average", "MLP", "Base"]["mean"] == ""
    mlp = next(line for line in text.split(f"\n{B}")[1].splitlines() if line.startswith("MLP"))
    new = values(B, "MLP", "New")
    assert mlp.split()[1:] == ["missing", f"{statistics.mean(new):.2f}±{statistics.stdev(new):.2f}", "-"]
    assert " 0.00 " not in mlp


def test_grid_cells_take_the_best_mean_over_seeds(datasets, vit_checkpoint, tmp_path, monkeypatch, capsys):
    recipe = reproduce.rethinking_fig1(datasets[:1], [1], SEEDS2, vit_checkpoint)
    out = str(tmp_path)
    jobs, cells = reproduce.plan_recipe("grid", recipe, out, out)
    assert len(jobs) == 1 + 2 + 2 * 9 * 2
    choice = {keys[0]: (e["row"], e["choice"], e["sample"]) for e, keys in cells}
    lr = lambda key: float(choice[key][1].split("lr ")[1]) if choice[key][1] else 0.0
    epochs = lambda key: int(choice[key][1].split()[0]) if choice[key][1] else 0
    value = lambda key: 50 + 10 * lr(key) + epochs(key) / 100 + choice[key][2]  # best: the largest lr, then epochs
    synthetic_rows(out, jobs, value)
    monkeypatch.setitem(reproduce.RECIPES, "grid", recipe)
    reproduce.main(["grid", "--output-dir", out, "--report", "--csv", str(tmp_path / "g.csv")])
    got, column = csv_cells(tmp_path / "g.csv"), reproduce.label(datasets[0])
    assert got["1 shots", "Prompt learning", column]["selected"] == "200 ep, lr 0.02"
    assert float(got["1 shots", "Prompt learning", column]["mean"]) == pytest.approx(50 + 0.2 + 2 + 1.5)
    assert float(got["1 shots", "Classifier FT", column]["mean"]) == pytest.approx(50 + 2 + 2 + 1.5)
    assert float(got["1 shots", "FT - PL", column]["mean"]) == pytest.approx(1.8)
    assert "by mean TEST accuracy" in capsys.readouterr().out
    best = next(k for k, c in choice.items() if c == ("Classifier FT", "200 ep, lr 0.2", 2))
    synthetic_rows(out, jobs, value, skip={best})  # a grid cell without all its seeds: no selection yet
    reproduce.main(["grid", "--output-dir", out, "--report", "--csv", str(tmp_path / "g.csv")])
    assert csv_cells(tmp_path / "g.csv")["1 shots", "Classifier FT", column]["mean"] == ""
    assert "Classifier FT | " + column + ": 17 of 18 runs" in capsys.readouterr().out


def test_table4_grid_selects_on_imagenet_for_the_whole_row(tmp_path, monkeypatch):
    """Rethinking Table 4 with its grid: one setting per row, chosen by ImageNet accuracy, even where a shift would
    prefer another (the per-cell best would be a different model in each column)."""
    recipe = reproduce.rethinking_table4(backbones=["RN50"], seeds=SEEDS2)
    out = str(tmp_path)
    jobs, cells = reproduce.plan_recipe("t4", recipe, out, out)
    choice = {key: (e["row"], e["choice"], e["sample"]) for e, keys in cells for key in keys}
    lr = lambda key: float(choice[key][1].split("lr ")[1]) if choice[key][1] else 0.0
    epochs = lambda key: int(choice[key][1].split()[0]) if choice[key][1] else 0
    value = lambda key: 50 + (lr(key) + epochs(key) / 1000 if key[1] == "imagenet" else -lr(key)) + choice[key][2]
    synthetic_rows(out, jobs, value)
    monkeypatch.setitem(reproduce.RECIPES, "t4", recipe)
    reproduce.main(["t4", "--output-dir", out, "--report", "--csv", str(tmp_path / "t.csv")])
    got = csv_cells(tmp_path / "t.csv")
    for row, best in [("Prompt Learning", 0.02), ("Classifier Fine-tuning", 0.2)]:
        for column in ["ImageNet", "-V2", "-Sketch", "-A", "-R"]:
            assert got["RN50", row, column]["selected"] == f"200 ep, lr {best:g}"  # the shifts would pick lr 2e-3
            imagenet = best + 0.2 if column == "ImageNet" else -best
            assert float(got["RN50", row, column]["mean"]) == pytest.approx(50 + imagenet + 1.5)
    assert got["RN50", "Zero-Shot CLIP", "-A"]["selected"] == ""


def test_a_variance_run_is_done_when_variance_py_wrote_its_row(datasets, vit_checkpoint, tmp_path, capsys):
    recipe = reproduce.upt_fig1(datasets[:1], [1], vit_checkpoint)
    out = str(tmp_path)
    jobs, _ = reproduce.plan_recipe("fig1", recipe, out, out)
    [variance] = [j for j in jobs if j["command"][1] == "variance.py"]
    assert reproduce.pending(jobs, {}) == jobs
    row = dict(kind="variance", dataset=datasets[0], backbone=vit_checkpoint, split="test", var_v=0.1234, var_t=0.05)
    with open(tmp_path / "results.jsonl", "w") as f:  # as variance.py writes it
        f.write(json.dumps(row) + "\n")
    results = reproduce.read_results(out)
    assert variance not in reproduce.pending(jobs, results) and len(reproduce.pending(jobs, results)) == len(jobs) - 1
    reproduce.report("fig1", recipe, reproduce.plan_recipe("fig1", recipe, out, out)[1], results)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(reproduce.label(datasets[0])))
    assert line.split()[1:4] == ["0.1234", "0.0500", "missing"]


def test_dry_run_and_slurm_print_the_exact_commands(tiny, tmp_path, monkeypatch, capsys):
    root, out = str(tmp_path / "data"), str(tmp_path / "out")
    monkeypatch.setitem(reproduce.RECIPES, "tiny", tiny)
    plans = [train.plan(e["argv"] + ["--root", root, "--output-dir", out]) for e in tiny["runs"]]
    done, interrupted = plans[0], plans[5]  # one run finished, one with a checkpoint (as a Ctrl-C leaves it)
    synthetic_rows(out, [dict(keys=[(done["run_id"], *t) for t in done["targets"]])], lambda key: 50.0)
    os.makedirs(interrupted["run_dir"])
    open(os.path.join(interrupted["run_dir"], "checkpoint.pt"), "w").close()
    expected = {shlex.join(["python", "train.py", *e["argv"], "--root", root, "--output-dir", out]
                           + (["--resume"] if p is interrupted else []))
                for e, p in zip(tiny["runs"], plans) if p is not done}

    reproduce.main(["tiny", "--root", root, "--output-dir", out, "--dry-run"])
    *lines, summary = capsys.readouterr().out.strip().splitlines()
    assert set(lines) == expected and len(lines) == 15 and summary == "15 runs to do (1 of 16 done)"
    assert sum("--resume" in line for line in lines) == 1

    script, stub = str(tmp_path / "runs.sh"), tmp_path / "python"
    stub.write_text('#!/bin/sh\nprintf "%s\\0" "$@"\n[ "$3" = coop ] && exit 3\nexit 0\n')  # coop runs fail
    stub.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stub))  # the Python that writes the script is the one it runs
    reproduce.main(["tiny", "--root", root, "--output-dir", out, "--slurm", script])
    printed = capsys.readouterr().out
    assert f"submit it with:\n  sbatch {script}\nthen: python reproduce.py tiny --root {root} --output-dir {out} " \
           "--report\n" in printed
    text = open(script).read()
    for directive in ["--array=0-7", "--gres=gpu:1", "--cpus-per-task=8", f"--output={out}/logs/slurm-%A_%a.log",
                      "--open-mode=append"]:
        assert f"\n#SBATCH {directive}\n" in text
    jobs = reproduce.pending(reproduce.plan_recipe("tiny", tiny, root, out)[0], reproduce.read_results(out))
    tasks = reproduce.tasks_of(jobs)
    assert [len(t) for t in tasks] == [1] + [2] * 7 and all(len({j["subset"] for j in t}) == 1 for t in tasks)
    later = tasks[3][1]  # a checkpoint that appears after the script was written (a requeued or rerun task)
    os.makedirs(os.path.dirname(later["checkpoint"]))
    open(later["checkpoint"], "w").close()
    for task in range(8):  # as Slurm runs it: task i of the array, each run's output in its own log
        done = subprocess.run(["bash", script], env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(task)), cwd=tmp_path,
                              capture_output=True, text=True)
        assert done.returncode == 1  # its coop run failed: the task says so, after running the others
        for job, line in zip(tasks[task], done.stdout.splitlines()[::2]):
            log = os.path.join(out, "logs", f"{job['id']}.log")
            assert line.endswith(f" task {task}: {shlex.join([str(stub), *job['command'][1:]])}"
                                 + (" --resume" if job in (interrupted_job(jobs, interrupted), later) else "")
                                 + f" > {log}")
            logged = open(log).read()
            assert logged.startswith(f"$ {stub} train.py ") and logged.split("\n", 1)[1].split("\0")[:-1] == \
                shlex.split(line.split(": ", 1)[1].rsplit(" > ", 1)[0])[1:]
        assert done.stdout.splitlines()[1::2][-1].endswith("exit 3")
    chunk = subprocess.run(["bash", script, "5"], env=dict(os.environ, SLURM_ARRAY_TASK_ID="2"), capture_output=True,
                           text=True)  # a later chunk: its index plus the chunk's first task
    assert f" task 7: {stub} train.py " in chunk.stdout
    beyond = subprocess.run(["bash", script, "5"], env=dict(os.environ, SLURM_ARRAY_TASK_ID="3"), capture_output=True,
                            text=True)
    assert beyond.returncode == 2 and beyond.stdout == "task 8: this script has tasks 0-7\n"


def interrupted_job(jobs, plan):
    return next(j for j in jobs if j["id"] == plan["run_id"])


def test_runs_are_ordered_by_training_subset_longest_budget_first(datasets, vit_checkpoint):
    methods = {f"CoOp {e}": ["coop", "--epochs", e] for e in (1, 3)} | {"FT": ["linear_ft", "--epochs", 2]}
    recipe = dict(runs=reproduce.few_shot(methods, datasets, [1, 2], SEEDS2, vit_checkpoint), tables=[])
    jobs, _ = reproduce.plan_recipe("order", recipe, "DATA", "out")
    subsets = [j["subset"] for j in jobs]
    assert [subsets[i] for i in range(0, 24, 3)] == list(dict.fromkeys(subsets))  # each subset's 3 runs adjacent
    assert [j["epochs"] for j in jobs] == [3, 2, 1] * 8


def test_one_worker_per_gpu_and_a_failed_run_is_reported(datasets, vit_checkpoint, tmp_path, monkeypatch, capsys):
    """Real subprocesses: a zero-shot run on a folder deleted after the preflight fails (train.py exits 2), the other
    one is done."""
    gone = write_colour_folder(str(tmp_path / "gone"))
    runs = [reproduce.train_run(["--method", "zeroshot", "--dataset", d, "--backbone", vit_checkpoint, "--workers", 0],
                                "t", "CLIP", [reproduce.label(d)]) for d in [datasets[0], gone]]
    monkeypatch.setitem(reproduce.RECIPES, "two", dict(title="two", runs=runs, tables=[]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    envs, execute = [], reproduce.execute

    def deleting(command, env, log):
        envs.append(env["CUDA_VISIBLE_DEVICES"])
        if gone in command:
            shutil.rmtree(gone.removeprefix("folder:"))
        return execute(command, env, log)

    monkeypatch.setattr(reproduce, "execute", deleting)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["two", "--output-dir", out, "--gpus", "2"])
    printed = capsys.readouterr()
    assert exit_info.value.code == 1 and sorted(envs) == ["0", "1"]
    failed = train.plan(runs[1]["argv"] + ["--output-dir", out])["run_id"]
    log = os.path.join(out, "logs", f"{failed}.log")
    assert f"log {log}" in printed.err and "error: " in reproduce.last_line(log) in printed.err
    assert "1 of 2 runs done; 1 failed" in printed.out
    assert [r["dataset"] for r in read_rows(out)] == ["folder:" + os.path.abspath(datasets[0][len("folder:"):])]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert reproduce.gpu_ids(2) == ["3", "5"] and reproduce.gpu_ids(0) == [None]


def test_listing_and_command_line_errors(tiny, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "RECIPES", {"tiny": tiny})
    reproduce.main([])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny"))
    assert line.split()[:4] == ["tiny", "16", "16", "16"]  # runs, trained runs, epochs
    for argv, message in [(["tinny"], "unknown recipe 'tinny' (did you mean 'tiny'?)"),
                          (["tiny", "--gpus", "-1"], "--gpus must be 0 or more")]:
        with pytest.raises(SystemExit) as exit_info:
            reproduce.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Built-in recipes and published numbers

def test_every_builtin_recipe_plans_with_the_expected_run_count():
    n_data, n_shots, n_seeds, n_backbones = 11, 5, 3, 4
    expected = {
        "upt-fig4": n_data + n_data * n_shots * n_seeds * 4,  # zero-shot once per dataset; CoOp, 2 VPT, UPT
        "upt-table1": 5 * n_seeds,
        "upt-table2": n_data * n_seeds * 7,
        "upt-fig1": n_data * 2 + n_data * n_seeds * 4,  # variance and zero-shot per dataset; 4 methods at 16 shots
        "rethinking-table1": n_data * 4,
        "rethinking-table2": n_data * 4 + n_data * 2 * 10,
        "rethinking-fig1": n_data + n_data * n_shots * n_seeds * (1 + 9 + 9),  # zero-shot, probe, 2 grids of 9
        "rethinking-table3": n_backbones * 2,
        "rethinking-table4": n_backbones * (1 + n_seeds + 9 * n_seeds * 2),  # zero-shot, probe, 2 grids of 9
        "rethinking-table4-one-setting": n_backbones * (1 + 3 * n_seeds),
        "base-to-new": n_data * (1 + 8 * n_seeds + (5 - 1) * n_seeds),  # the default CoOp budget is one of the 5
        "cross-dataset": 1 + 8 * n_seeds,  # zero-shot once; CoOp, CoCoOp, 2 VPT, UPT, Joint, Shared, MLP
    }
    assert set(reproduce.RECIPES) == set(expected)
    ids = {}
    for name, recipe in reproduce.RECIPES.items():
        jobs, cells = reproduce.plan_recipe(name, recipe, "/data", "/out")  # train.plan on every run
        assert len(jobs) == expected[name], name
        ids[name] = {j["id"] for j in jobs}
        for job in jobs:
            assert job["command"][:2] in (["python", "train.py"], ["python", "variance.py"])
            assert job["command"][-4:] == ["--root", "/data", "--output-dir", "/out"]
        specs = {t["name"]: t for t in recipe["tables"]}
        for entry, _ in cells:  # every run fills cells that a table shows
            spec = specs[entry["table"]]
            assert entry["row"] in spec["rows"] and set(entry["columns"]) - {None} <= set(spec["columns"])
    trained = lambda name: {i for i in ids[name] if not i.startswith("variance")}
    assert trained("upt-fig1") < ids["upt-fig4"] and len(ids["upt-table2"] & ids["upt-fig4"]) == n_data * n_seeds * 4
    assert ids["rethinking-table1"] < ids["rethinking-table2"]
    assert ids["upt-table1"] < ids["cross-dataset"]  # the same ImageNet runs, evaluated on more targets
    assert ids["rethinking-table4-one-setting"] < ids["rethinking-table4"]  # the default (50 ep, lr 0.002) is in the grid


def test_published_tables_are_consistent():
    """Transcription check: the papers' Average columns are the means of their other columns."""
    for row, values in reproduce.UPT_TABLE2.items():
        assert abs(statistics.mean(values[:11]) - values[11]) < 0.01, row
    for row, values in reproduce.UPT_TABLE1.items():
        assert abs(statistics.mean(values[1:5]) - values[6]) < 0.01, row  # OOD Average
        # the paper's own slip: VPT-shallow's 5 numbers average 60.41, printed 60.38 (its OOD Average is consistent)
        assert abs(statistics.mean(values[:5]) - values[5]) < (0.035 if row == "VPT-shallow" else 0.01), row
    for backbone, rows in reproduce.RETHINKING_TABLE4.items():
        for row, values in rows.items():
            assert abs(statistics.mean(values[:5]) - values[5]) < 0.01, (backbone, row)
    for row, (base, new, h) in reproduce.BASE_TO_NEW.items():
        assert abs(2 * base * new / (base + new) - h) < 0.01, row
    assert reproduce.UPT_TABLE2["UPT"][0] == reproduce.UPT_TABLE1["UPT"][0]  # both tables' ImageNet 16-shot UPT
    assert reproduce.UPT_TABLE2["VPT-deep"][0] == reproduce.UPT_TABLE1["VPT-deep"][0]
    pl, ft = reproduce.RETHINKING_TABLE3.values()
    assert all(8.5 < a / b < 10.5 for a, b in zip(pl, ft))  # "about 10x more efficient"
    t2 = reproduce.RETHINKING_TABLE2
    assert [d for d, v in t2.items() if v[0] > max(v[1], v[2])] == ["EuroSAT"]  # §4.1: the one dataset
    assert sum(v[1] > v[0] for v in t2.values()) == 9  # §4.1: Basic beats ClassName on 9 of 11
    assert [d for d, v in t2.items() if v[3] >= max(v[:3])] == ["SUN397", "DTD", "EuroSAT"]  # Negative best on 3
    assert all(isinstance(v[4], tuple) and isinstance(v[5], tuple) for v in t2.values())


# ----------------------------------------------------------------------------------------------------------------------
# The command line: a grid of any size, train.py options, options that do not go together, hints, preflight

def refused(argv, capsys):
    """reproduce.main(argv) must exit 2 with one line on stderr: -> that line."""
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_grid_and_train_options_make_a_smaller_grid(datasets, vit_checkpoint, tmp_path, capsys):
    out = str(tmp_path)
    argv = ["upt-fig4", "--datasets", ",".join(datasets), "--shots", "1,2", "--seeds", "3", "--backbone",
            vit_checkpoint, "--epochs", "2", "--precision", "fp32", "--workers", "0", "--output-dir", out]
    reproduce.main(argv + ["--dry-run"])
    *lines, summary = capsys.readouterr().out.strip().splitlines()
    assert summary == "18 runs to do (0 of 18 done)"  # zero-shot per dataset; 4 methods x 2 datasets x 2 shots
    commands = [shlex.split(line) for line in lines]
    for c in commands:
        assert c[c.index("--backbone") + 1] == vit_checkpoint and c[c.index("--precision") + 1] == "fp32"
        assert c[c.index("--workers") + 1] == "0" and c[c.index("--dataset") + 1] in datasets
        if "zeroshot" in c:
            assert "--epochs" not in c and "--seed" not in c  # an option a method does not read is not given to it
        else:
            assert c[c.index("--epochs") + 1] == "2" and c[c.index("--seed") + 1] == "3"
    assert sorted(c[c.index("--shots") + 1] for c in commands if "--shots" in c) == ["1"] * 8 + ["2"] * 8
    jobs, _ = reproduce.plan_recipe("fig1", reproduce.build("upt-fig1", reproduce.parse_args(
        ["upt-fig1", "--datasets", "dtd", "--shots", "8", "--seeds", "1"])), "/data", "/out")
    assert [j["subset"][2] for j in jobs].count(8) == 4 and len(jobs) == 6  # variance, zero-shot; 4 methods, 8 shots
    args = reproduce.parse_args(["rethinking-table4", "--backbone", "RN50,ViT-B/16", "--seeds", "1"])
    assert len(reproduce.build("rethinking-table4", args)["tables"]) == 2  # a recipe over backbones takes several


def test_grid_and_train_options_a_recipe_cannot_take_are_errors(tmp_path, capsys):
    out = ["--output-dir", str(tmp_path)]
    for argv, message in [
            (["upt-table2", "--shots", "1"], "--shots: recipe upt-table2 fixes it (the paper's setting): drop --shots"),
            (["upt-table1", "--datasets", "dtd"], "--datasets: recipe upt-table1 fixes it"),
            (["rethinking-table3", "--seeds", "1,2"], "--seeds: recipe rethinking-table3 takes one value (got '1,2')"),
            (["upt-fig4", "--backbone", "RN50,RN101"], "--backbone: recipe upt-fig4 takes one value"),
            (["upt-fig1", "--shots", "8,16"], "--shots: recipe upt-fig1 takes one value (got '8,16')"),
            (["upt-fig4", "--shots", "1,x"], "--shots takes comma-separated whole numbers (got '1,x')"),
            (["upt-fig4", "--seeds", "0"], "--seeds takes comma-separated numbers of at least 1 (got '0')"),
            (["upt-fig4", "--datasets", "dtdd"], "--datasets: unknown dataset 'dtdd' (did you mean 'dtd'?)"),
            (["rethinking-fig1", "--epochs", "1"], "--epochs: recipe rethinking-fig1 sets it in its own runs "
                                                   "(Prompt learning: --epochs 50): drop --epochs"),
            (["rethinking-table1", "--epochs", "1"], "--epochs is read by no run of recipe rethinking-table1: drop it"),
            (["upt-fig4", "--epochs", "0"], "--epochs must be at least 1 (got 0)"),  # train.py's own check
            (["upt-fig4", "--backbone", "RN51"], "unknown --backbone 'RN51'")]:
        assert message in refused(argv + out + ["--dry-run"], capsys), argv
    assert os.listdir(tmp_path) == []


def test_options_that_do_not_go_together_are_errors_naming_both(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(reproduce.RECIPES, "tiny", tiny)
    csv_path, script = str(tmp_path / "t.csv"), str(tmp_path / "runs.sh")
    for argv, message in [
            (["tiny", "--dry-run", "--csv", csv_path], "--csv and --dry-run do not go together"),
            (["tiny", "--slurm", script, "--csv", csv_path], "--csv and --slurm do not go together"),
            (["tiny", "--dry-run", "--report"], "--dry-run and --report do not go together: pick one"),
            (["tiny", "--slurm", script, "--dry-run"], "--dry-run and --slurm do not go together: pick one"),
            (["--slurm", script], "--slurm needs a recipe: python reproduce.py RECIPE --slurm ..."),
            (["--report"], "--report needs a recipe"), (["--datasets", "dtd"], "--datasets needs a recipe"),
            (["tiny", "--list"], "--list lists every recipe: drop tiny"),
            (["tiny", "--slurm", script, "--gpus", "2"], "--gpus and --slurm do not go together"),
            (["tiny", "--partition", "gpu"], "--partition is read by --slurm only: add --slurm FILE or drop it"),
            (["tiny", "--dry-run", "--max-array", "10"], "--max-array is read by --slurm only"),
            (["tiny", "--slurm", script, "--gres", "gpu:1", "--gpus-per-task", "1"],
             "--gres and --gpus-per-task do not go together: pick one"),
            (["tiny", "--slurm", script, "--max-array", "0"], "--max-array must be 1 or more (got 0)"),
            (["tiny", "--slurm", script, "--sbatch", "--qos=a\n#SBATCH --x"], "--sbatch holds a line break")]:
        assert message in refused(argv, capsys), argv
    assert os.listdir(tmp_path) == []  # nothing written


def test_every_hint_repeats_root_output_dir_and_the_grid(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(reproduce.RECIPES, "tiny", tiny)
    monkeypatch.setattr(reproduce, "execute", lambda command, env, log: 0)  # runs that write no rows
    root, out, script = str(tmp_path / "data"), str(tmp_path / "out"), str(tmp_path / "runs.sh")
    argv = ["tiny", "--precision", "fp32", "--root", root, "--output-dir", out]
    where = f"--root {root} --output-dir {out}"
    reproduce.main(argv + ["--slurm", script, "--partition", "gpu"])
    printed = capsys.readouterr().out
    assert f"then: python reproduce.py tiny --precision fp32 {where} --report\n" in printed
    written_by = f"#   python reproduce.py tiny --precision fp32 {where} --slurm {script} --partition gpu\n"
    assert written_by in open(script).read()
    reproduce.main(argv + ["--report"])
    assert f"(python reproduce.py tiny --precision fp32 {where} --dry-run lists them)" in capsys.readouterr().out
    recipe = reproduce.with_options("tiny", tiny, reproduce.parse_args(argv))
    synthetic_rows(out, reproduce.plan_recipe("tiny", recipe, root, out)[0], lambda key: 50.0)
    reproduce.main(argv + ["--gpus", "0"])
    assert f"16 of 16 runs done. Report: python reproduce.py tiny --precision fp32 {where} --report" in \
        capsys.readouterr().out
    reproduce.main(argv + ["--slurm", script])
    assert f"no script written. Report: python reproduce.py tiny --precision fp32 {where} --report" in \
        capsys.readouterr().out


def test_preflight_refuses_a_grid_with_a_missing_dataset_launching_nothing(datasets, vit_checkpoint, tmp_path,
                                                                          monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(reproduce, "execute", lambda command, env, log: launched.append(command) or 0)
    missing, broken = str(tmp_path / "missing"), tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    runs = [reproduce.train_run(["--method", "coop", "--dataset", d, "--backbone", b, "--shots", 1, "--epochs", 1],
                                "t", "CoOp", [d]) for d in [datasets[0], f"folder:{missing}"]
            for b in [vit_checkpoint, str(broken)]]
    monkeypatch.setitem(reproduce.RECIPES, "bad", dict(title="bad", runs=runs, tables=[]))
    script, out = str(tmp_path / "runs.sh"), str(tmp_path / "out")
    for mode in [["--gpus", "0"], ["--slurm", script]]:
        with pytest.raises(SystemExit) as exit_info:
            reproduce.main(["bad", "--output-dir", out, *mode])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 2, err  # one line per problem: not one per run
        assert err[0].startswith(f"error: {missing} needs train/")
        assert err[1].startswith(f"error: --backbone {broken}: ")
    assert launched == [] and not os.path.exists(script) and not os.path.exists(os.path.join(out, "results.jsonl"))
    blocked = tmp_path / "file"
    blocked.write_text("")
    runs = [r for r in runs if missing not in r["argv"][3] and str(broken) not in r["argv"]]
    monkeypatch.setitem(reproduce.RECIPES, "bad", dict(title="bad", runs=runs, tables=[]))
    err = refused(["bad", "--output-dir", str(blocked / "out"), "--slurm", script], capsys)
    assert err.startswith(f"error: cannot write under {blocked / 'out'} (") and "choose another --output-dir" in err
    reproduce.main(["bad", "--output-dir", out, "--gpus", "0"])  # the good run alone passes
    assert len(launched) == 1
