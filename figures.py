"""The papers' figures as SVG files, drawn with the standard library: few-shot curves (UPT Fig. 4, Rethinking Fig. 1,
CoOp Fig. 3), the base/new trade-off (Rethinking Fig. 2) and the variance-vs-gain scatter (UPT Fig. 1(d)(e)).

A figure is a plain dict (curves / tradeoff / scatter below) that reads the cells reproduce.py computes for a recipe's
tables; `python reproduce.py RECIPE --report --plot DIR` writes one SVG per figure. Measured points are filled (the mean
over seeds, with a ±std band on curves), published points hollow; a missing cell is an absent point, never a zero. Each
point carries its numbers (data-* attributes and a hover title) and the caption says how many runs each point has.
"""
import collections
import math
import os
import tempfile
import textwrap
import xml.etree.ElementTree as ET

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
PANEL_W, PANEL_H = 300, 230  # one panel, axes included
LEFT, RIGHT, TOP, BOTTOM = 50, 14, 26, 42  # the plot area's inset in a panel
PER_ROW = 4  # panels per row


# ----------------------------------------------------------------------------------------------------------------------
# Figure specs (built by reproduce.py's recipes)

def curves(name, title, x_tables, rows, panels, *, xlabel="training examples per class (shots)",
           ylabel="accuracy (%)", published=None, note="", limits=(0, 100)):
    """Accuracy vs shots, one line per row, one panel per column of the tables. x_tables: {x: table name} (one table per
    shot count); published: {(row, panel, x): value} drawn hollow beside the measured points; limits: the y axis never
    goes past them (a ±std band is cut there)."""
    return dict(kind="curves", name=name, title=title, x_tables=dict(x_tables), rows=list(rows), panels=list(panels),
                xlabel=xlabel, ylabel=ylabel, published=published or {}, note=note, limits=limits)


def tradeoff(name, title, tables, rows, *, lines=None, x="Base", y="New", note=""):
    """Base vs new accuracy, one panel per table, a point per row; lines: {label: [rows]} joined in order (e.g. CoOp
    at growing epoch budgets). Published points come from the tables' published (row, x) and (row, y)."""
    return dict(kind="tradeoff", name=name, title=title, tables=list(tables), rows=list(rows), lines=lines or {},
                x=x, y=y, note=note)


def scatter(name, title, table, rows, panels, *, note=""):
    """A point per row of `table`, labelled with the row; panels: [dict(x=column, y=column, runs=column, title=...)],
    `runs` naming the measured column whose run count the (derived) point has."""
    return dict(kind="scatter", name=name, title=title, table=table, rows=list(rows), panels=list(panels), note=note)


# ----------------------------------------------------------------------------------------------------------------------
# Points: what each panel shows, from the computed cells

def point(x, y, cell, runs, **extra):
    return dict(x=x, y=y, std=cell.get("std"), n=runs, complete=cell.get("complete", True), **extra)


def panels_of(figure, cells, published):
    """-> [panel]: dict(title, xlabel, ylabel, log2, xticks, series=[dict(name, line, points, paper)]).
    cells: {table: {(row, column): cell or None}} as reproduce.compute; published: {table: {(row, column): number}}."""
    kind, out = figure["kind"], []
    if kind == "curves":
        xs = sorted(figure["x_tables"])
        for column in figure["panels"]:
            series = []
            for row in figure["rows"]:
                points = []
                for x in xs:
                    cell = cells[figure["x_tables"][x]].get((row, column))
                    if cell is not None:
                        points.append(point(x, cell["mean"], cell, cell["n"]))
                paper = [dict(x=x, y=figure["published"][row, column, x]) for x in xs
                         if (row, column, x) in figure["published"]]
                series.append(dict(name=row, line=True, points=points, paper=paper))
            out.append(dict(title=column, xlabel=figure["xlabel"], ylabel=figure["ylabel"], log2=True,
                            xticks=xs, series=series, limits=figure["limits"]))
    elif kind == "tradeoff":
        in_line = {r for rows in figure["lines"].values() for r in rows}
        groups = [(r, [r]) for r in figure["rows"] if r not in in_line] + list(figure["lines"].items())
        for t in figure["tables"]:
            series = []
            for name, rows in groups:
                points, paper = [], []
                for r in rows:
                    cx, cy = cells[t].get((r, figure["x"])), cells[t].get((r, figure["y"]))
                    if cx is not None and cy is not None:
                        points.append(point(cx["mean"], cy["mean"], cy, cy["n"], label=r if len(rows) > 1 else "",
                                            xstd=cx.get("std")))
                    px, py = published[t].get((r, figure["x"])), published[t].get((r, figure["y"]))
                    if px is not None and py is not None:
                        paper.append(dict(x=px, y=py))
                series.append(dict(name=name, line=len(rows) > 1, points=points, paper=paper))
            out.append(dict(title=t, xlabel=f"{figure['x']} accuracy (%)", ylabel=f"{figure['y']} accuracy (%)",
                            log2=False, xticks=None, series=series))
    elif kind == "scatter":
        t = cells[figure["table"]]
        for spec in figure["panels"]:
            points = []
            for r in figure["rows"]:
                cx, cy, runs = t.get((r, spec["x"])), t.get((r, spec["y"])), t.get((r, spec["runs"]))
                if cx is not None and cy is not None:
                    points.append(point(cx["mean"], cy["mean"], cy, runs and runs["n"], label=r))
            out.append(dict(title=spec["title"], xlabel=spec["x"], ylabel=spec["y"], log2=False, xticks=None,
                            series=[dict(name=spec["y"], line=False, points=points, paper=[])]))
    else:
        raise ValueError(f"unknown figure kind {kind!r}: use curves, tradeoff or scatter")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Drawing

def nice_ticks(lo, hi, count=5):
    """Round tick values covering [lo, hi]: steps of 1, 2, 2.5 or 5 x 10^k, about `count` of them."""
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / (count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def tick_text(value):
    return f"{value:g}"


def el(parent, tag, text=None, **attributes):
    """A child element; attribute names with _ become - (stroke_width -> stroke-width); numbers rounded to 0.01 px."""
    node = ET.SubElement(parent, tag, {k.replace("_", "-"): f"{v:.2f}" if isinstance(v, float) else str(v)
                                       for k, v in attributes.items() if v is not None})
    if text is not None:
        node.text = text
    return node


def draw_panel(svg, x0, y0, panel, colours, typical_runs):
    """One panel at (x0, y0): frame, ticks, labels, ±std bands, lines, points (measured filled, published hollow).
    typical_runs: {series: its most common run count}; a point with another count is marked n=..."""
    g = el(svg, "g", transform=f"translate({x0},{y0})", **{"class": "panel", "data-title": panel["title"]})
    w, h = PANEL_W - LEFT - RIGHT, PANEL_H - TOP - BOTTOM
    ys = [v for s in panel["series"] for p in s["points"] for v in (p["y"] - (p["std"] or 0), p["y"] + (p["std"] or 0))]
    ys += [p["y"] for s in panel["series"] for p in s["paper"]]
    xs = [p["x"] for s in panel["series"] for p in s["points"] + s["paper"]]
    el(g, "text", panel["title"], x=LEFT + w / 2, y=16, text_anchor="middle", font_weight="bold")
    el(g, "rect", x=LEFT, y=TOP, width=w, height=h, fill="none", stroke="#444")
    if not ys:
        el(g, "text", "no data yet", x=LEFT + w / 2, y=TOP + h / 2, text_anchor="middle", fill="#888")
        return
    lo, hi = panel.get("limits") or (-math.inf, math.inf)
    yticks = nice_ticks(max(min(ys), lo), min(max(ys), hi))
    clip = lambda y: min(max(y, yticks[0]), yticks[-1])  # noqa: E731  (a band cut at the axis' end)
    if panel["log2"]:
        xticks, fx = panel["xticks"], math.log2
    else:
        xticks, fx = nice_ticks(min(xs), max(xs)), float
    x_lo, x_hi = fx(xticks[0]), fx(xticks[-1])
    x_span = (x_hi - x_lo) or 1.0
    pad = 0.05 * w if panel["log2"] else 0.0
    sx = lambda x: LEFT + pad + (fx(x) - x_lo) / x_span * (w - 2 * pad)  # noqa: E731
    sy = lambda y: TOP + h - (y - yticks[0]) / (yticks[-1] - yticks[0]) * h  # noqa: E731
    for t in yticks:
        el(g, "line", x1=LEFT - 4, x2=LEFT, y1=sy(t), y2=sy(t), stroke="#444",
           **{"class": "ytick", "data-value": tick_text(t)})
        el(g, "line", x1=LEFT, x2=LEFT + w, y1=sy(t), y2=sy(t), stroke="#eee")
        el(g, "text", tick_text(t), x=LEFT - 6, y=sy(t) + 4, text_anchor="end", font_size=10)
    for t in xticks:
        el(g, "line", x1=sx(t), x2=sx(t), y1=TOP + h, y2=TOP + h + 4, stroke="#444",
           **{"class": "xtick", "data-value": tick_text(t)})
        el(g, "text", tick_text(t), x=sx(t), y=TOP + h + 15, text_anchor="middle", font_size=10)
    el(g, "text", panel["xlabel"], x=LEFT + w / 2, y=PANEL_H - 8, text_anchor="middle", font_size=10)
    el(g, "text", panel["ylabel"], x=12, y=TOP + h / 2, text_anchor="middle", font_size=10,
       transform=f"rotate(-90 12 {TOP + h / 2:.2f})")
    for s in panel["series"]:
        colour, points = colours[s["name"]], s["points"]  # curves: in shot order; trade-off lines: in row order
        if s["line"]:
            for run in segments(points, panel["xticks"]):
                band = [p for p in run if p["std"] is not None] if panel["log2"] else []
                if len(band) > 1:
                    outline = [(sx(p["x"]), sy(clip(p["y"] + p["std"]))) for p in band] + \
                              [(sx(p["x"]), sy(clip(p["y"] - p["std"]))) for p in reversed(band)]
                    el(g, "polygon", points=" ".join(f"{a:.2f},{b:.2f}" for a, b in outline), fill=colour,
                       fill_opacity="0.15", stroke="none", **{"class": "band", "data-series": s["name"]})
                if len(run) > 1:
                    el(g, "polyline", points=" ".join(f"{sx(p['x']):.2f},{sy(p['y']):.2f}" for p in run), fill="none",
                       stroke=colour, stroke_width=1.5)
        for p in points:
            dot = el(g, "circle", cx=sx(p["x"]), cy=sy(p["y"]), r=3.5, fill=colour if p["complete"] else "white",
                     stroke=colour)
            std = "" if p["std"] is None else f" ± {p['std']:.2f}"
            runs = "derived, no" if p["n"] is None else p["n"]
            for key, value in [("class", "point measured"), ("data-series", s["name"]), ("data-x", repr(p["x"])),
                               ("data-y", repr(p["y"])), ("data-std", "" if p["std"] is None else repr(p["std"])),
                               ("data-n", "" if p["n"] is None else str(p["n"]))]:
                dot.set(key, value)
            where = f"{p['label']}: " if p.get("label") else ""
            el(dot, "title", f"{s['name']}, {panel['title']}: {where}x {p['x']:g}, y {p['y']:.2f}{std} ({runs} runs)")
            if p.get("label"):
                el(g, "text", p["label"], x=sx(p["x"]) + 5, y=sy(p["y"]) - 5, font_size=9, fill="#333")
            if p["n"] is not None and p["n"] != typical_runs.get(s["name"]):
                el(g, "text", f"n={runs}", x=sx(p["x"]) + 5, y=sy(p["y"]) + 12, font_size=9, fill=colour)
        for p in s["paper"]:
            ring = el(g, "circle", cx=sx(p["x"]), cy=sy(p["y"]), r=6, fill="none", stroke=colour, stroke_width=1.5)
            for key, value in [("class", "point paper"), ("data-series", s["name"]), ("data-x", repr(p["x"])),
                               ("data-y", repr(p["y"]))]:
                ring.set(key, value)
            el(ring, "title", f"{s['name']}, {panel['title']}: published x {p['x']:g}, y {p['y']:g}")


def segments(points, xs):
    """Consecutive runs of points without a gap on the x grid (a missing shot count breaks the line)."""
    if xs is None:
        return [points]
    out, index = [], {x: i for i, x in enumerate(xs)}
    for p in points:
        if out and index[p["x"]] == index[out[-1][-1]["x"]] + 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def render(figure, cells, published):
    """-> the figure's <svg> element."""
    panels = panels_of(figure, cells, published)
    names = list(dict.fromkeys(s["name"] for p in panels for s in p["series"]))
    colours = {n: COLOURS[i % len(COLOURS)] for i, n in enumerate(names)}
    runs = {name: collections.Counter(pt["n"] for p in panels for s in p["series"] if s["name"] == name
                                      for pt in s["points"] if pt["n"]) for name in names}
    typical = {name: counts.most_common(1)[0][0] for name, counts in runs.items() if counts}
    columns = min(PER_ROW, len(panels))
    grid_rows, width = math.ceil(len(panels) / columns), columns * PANEL_W
    legend = [("dot", colours[name], name + run_counts(runs[name]), name) for name in names]  # with run counts
    if any(s["paper"] for p in panels for s in p["series"]):
        legend.append(("ring", "#444", "published (paper)", None))
    if figure["kind"] == "curves":
        legend.append(("band", "#444", "± std over seeds", None))
    x, y, placed = 10, 40, []
    for entry in legend:
        size = 24 + 6.5 * len(entry[2])
        if x + size > width and x > 10:
            x, y = 10, y + 18
        placed.append((x, y, entry))
        x += size
    header = y + 18
    caption = [line for text in caption_lines(figure) for line in textwrap.wrap(text, width // 6)]
    height = header + grid_rows * PANEL_H + 16 * len(caption) + 10
    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=str(width), height=str(height),
                     viewBox=f"0 0 {width} {height}", font_family="sans-serif", font_size="11")
    el(svg, "rect", width=width, height=height, fill="white")
    el(svg, "text", figure["title"], x=10, y=20, font_size=14, font_weight="bold")
    for x, y, (kind, colour, text, series) in placed:
        if kind == "dot":
            el(svg, "circle", cx=x + 5, cy=y, r=4, fill=colour)
        elif kind == "ring":
            el(svg, "circle", cx=x + 5, cy=y, r=6, fill="none", stroke=colour)
        else:
            el(svg, "rect", x=x, y=y - 5, width=12, height=10, fill=colour, fill_opacity="0.15")
        el(svg, "text", text, x=x + 15, y=y + 4, **{"class": "legend", "data-series": series})
    for i, panel in enumerate(panels):
        draw_panel(svg, (i % columns) * PANEL_W, header + (i // columns) * PANEL_H, panel, colours, typical)
    for j, line in enumerate(caption):
        el(svg, "text", line, x=10, y=header + grid_rows * PANEL_H + 16 * j + 12, font_size=10, fill="#333")
    return svg


def run_counts(counter):
    """" (3 runs)", " (2/3 runs)", " (1 run)" or "" for a series' Counter of run counts."""
    if not counter:
        return ""
    return f" ({'/'.join(map(str, sorted(counter)))} run{'' if set(counter) == {1} else 's'})"


def caption_lines(figure):
    lines = ["runs per point: in the legend (seeds; a point with fewer than its series' usual count is marked n=...); "
             "an Average point is the mean of the datasets' means, drawn only when every dataset has one"]
    lines.append("filled dot: mean over seeds; white dot: fewer runs than planned; ring: published; "
                 "a missing cell is an absent point (never 0)")
    return lines + ([figure["note"]] if figure["note"] else [])


def write_svg(path, svg):
    """Atomically: a complete file or none."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".svg.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            ET.ElementTree(svg).write(f, encoding="utf-8", xml_declaration=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the figure from a web server
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
