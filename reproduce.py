"""One command per table: run the grid of a paper's table or figure with train.py, then report it beside the published
numbers (UPT, arXiv:2210.07225; Rethinking the Value of Prompt Learning, ICLR 2023 submission).

    python reproduce.py                                    the recipes, their run counts and epochs
    python reproduce.py upt-table2 --root DATA             run what has no result yet, one run per visible GPU
    python reproduce.py upt-table2 --root DATA --dry-run   the commands still to run
    python reproduce.py upt-table2 --root DATA --slurm runs.sh [--partition P --time 2-00:00:00 ...]
                                                           the same as a Slurm array job, a task per training subset
    python reproduce.py upt-table2 --report [--csv t.csv]  mean ± std over seeds beside the paper's number
    python reproduce.py upt-fig4 --report --plot figs      the recipe's figures as SVG files (figures.py)
    python reproduce.py upt-fig4 --datasets dtd --shots 1 --seeds 1 --epochs 2    a smaller grid (a smoke test)

A run is done when results.jsonl has a row for each of its evaluation targets (train.plan says which), so a rerun does
only what is missing: after a crash, a failed run, or a new dataset. A recipe is a plain dict: its runs (the train.py
options of each, and the table cell each evaluation fills) and its tables (layout, published numbers). Before any run
is launched or any script written, every dataset, backbone and the output folder are checked once (preflight).
"""
import argparse
import contextlib
import csv
import difflib
import functools
import inspect
import io
import json
import math
import os
import queue
import shlex
import statistics
import subprocess
import sys
import threading
import time

import torch

import clip_model
import data
import figures
import runs
import train

HERE = os.path.dirname(os.path.abspath(__file__))
DATASETS = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
            "sun397", "dtd", "eurosat", "ucf101"]  # the 11 datasets of CoOp, in the column order of both papers
NAMES = {"imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
         "stanford_cars": "StanfordCars", "oxford_flowers": "Flowers102", "food101": "Food101",
         "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DTD", "eurosat": "EuroSAT", "ucf101": "UCF101"}
SHIFTS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]  # ImageNet's domain-shifted test sets
SHOTS, SEEDS = [1, 2, 4, 8, 16], [1, 2, 3]
BACKBONES = {"RN50": "ResNet-50", "RN101": "ResNet-101", "ViT-B/32": "ViT-B/32", "ViT-B/16": "ViT-B/16"}
METRICS = {"accuracy": lambda row: row["accuracy"],
           "minutes": lambda row: None if row.get("train_seconds") is None else row["train_seconds"] / 60,
           "var_v": lambda row: row["var_v"], "var_t": lambda row: row["var_t"]}


class RecipeError(Exception):
    """A recipe that cannot be run as written (an unknown name, two runs with one id but other targets): exit code 2."""


def label(dataset):
    """The column name of a dataset: the papers' name, or a folder dataset's folder name."""
    return NAMES.get(dataset) or os.path.basename(dataset.removeprefix("folder:").rstrip("/"))


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks of a recipe: runs (what to run, which cells it fills) and tables (how the cells are laid out)

def train_run(argv, table, row, columns, sample=1, choice=None, metric="accuracy"):
    """`python train.py ARGV`: its evaluation targets (in train.plan's order: the trained dataset, then --eval-datasets)
    fill `columns` of `row` in `table`, as sample `sample` (the seed) of each cell. `choice` names a cell of a
    hyper-parameter grid; the report keeps the choice with the best mean (Rethinking §5.1)."""
    return dict(script="train.py", argv=[str(a) for a in argv], table=table, row=row, columns=list(columns),
                sample=sample, choice=choice, metric=[metric] * len(columns))


def variance_run(dataset, backbone, table, split="test"):
    """`python variance.py`: UPT App. A's intra-class visual and inter-class text variance of one dataset."""
    return dict(script="variance.py", argv=["--dataset", dataset, "--backbone", backbone, "--split", split],
                table=table, row=label(dataset), columns=["Var_v", "Var_t"], sample=1, choice=None,
                metric=["var_v", "var_t"], key=("variance", dataset, backbone, split))


def few_shot(methods, datasets, shots, seeds, backbone, table="{shots} shots", extra=(), choice=None, transpose=False,
             subsample=None):
    """Every method of `methods` ({row: [method, train.py options...]}) on datasets x shots x seeds: a cell per
    (method, dataset) in table `table.format(shots=k, dataset=name)` (datasets as rows with `transpose`). `extra`: options
    given to every run (e.g. --workers 0). `subsample="base"` trains
    on the base classes and also scores the new ones (base-to-new): the cell's columns are then Base and New."""
    runs = []
    for row, (method, *options) in methods.items():
        for d in datasets:
            for k in shots:
                for s in seeds:
                    argv = ["--method", method, "--dataset", d, "--shots", k, "--seed", s, "--backbone", backbone]
                    if subsample:
                        argv += ["--subsample", subsample, "--eval-datasets", f"{d}:new"]
                    r, c = (label(d), row) if transpose else (row, label(d))
                    runs.append(train_run(argv + options + list(extra), table.format(shots=k, dataset=label(d)),
                                          r, ["Base", "New"] if subsample else [c], sample=s, choice=choice))
    return runs


def table(name, rows, columns, *, title="", derived_rows=None, derived_columns=None, published=None, mean_of=None,
          digits=2, note="", select_by=None):
    """A table of the report. Cells are the mean ± std over samples of the runs that fill them; derived cells combine
    others: ("mean", [names]), ("diff", a, b), ("hm", a, b) (harmonic mean), ("ratio", a, b). Derived rows are computed
    first, then derived columns (so an Average row's H is the HM of the averages, as CoCoOp). `mean_of`: each cell is
    the mean of the same cell in those tables. `published`: {(row, column): value or (mean, std)} from the paper.
    `select_by`: a column whose best grid choice every other column of the row uses (one model per row)."""
    return dict(name=name, title=title, rows=list(rows), columns=list(columns), derived_rows=derived_rows or {},
                derived_columns=derived_columns or {}, published=published or {}, mean_of=mean_of, digits=digits,
                note=note, select_by=select_by)


def paper(values, columns):
    """{row: [numbers in column order]} -> {(row, column): number}."""
    out = {}
    for row, numbers in values.items():
        assert len(numbers) == len(columns), (row, numbers)
        out.update({(row, c): v for c, v in zip(columns, numbers) if v is not None})
    return out


def average(columns):
    return {"Average": ("mean", list(columns))}


# ----------------------------------------------------------------------------------------------------------------------
# Published numbers, transcribed from the papers' text

UPT_TABLE1 = {  # UPT Table 1: domain generalisation, ImageNet 16 shots, ViT-B/16, 3 seeds (as printed: VPT-shallow's
    # Average, 60.38, is not the mean of its 5 numbers, 60.41; its OOD Average is)
    #              ImageNet -V2     -S     -A     -R     Average OOD Average
    "CoOp":        [71.51, 64.20, 47.99, 49.71, 75.21, 61.72, 59.28],
    "CoCoOp":      [71.02, 64.07, 48.75, 50.63, 76.18, 62.13, 59.91],
    "VPT-shallow": [68.98, 62.10, 47.68, 47.19, 76.10, 60.38, 58.27],
    "VPT-deep":    [70.57, 63.67, 47.66, 43.85, 74.42, 60.04, 57.40],
    "UPT":         [72.63, 64.35, 48.66, 50.66, 76.24, 62.51, 59.98],
}
UPT_TABLE2 = {  # UPT Table 2: 16 shots, ViT-B/16, 3 seeds; the 11 datasets in DATASETS order, then Average
    "CoOp":        [71.36, 95.93, 92.74, 77.45, 95.90, 86.36, 38.04, 73.59, 68.38, 78.77, 82.04, 78.24],
    "VPT-shallow": [68.98, 94.66, 92.61, 69.09, 81.40, 86.91, 30.93, 68.08, 52.28, 84.87, 75.19, 73.18],
    "VPT-deep":    [70.57, 95.83, 92.91, 76.13, 94.96, 86.18, 40.96, 71.63, 69.79, 91.53, 82.76, 79.39],
    "Joint":       [71.42, 95.84, 93.34, 79.02, 95.25, 86.55, 40.56, 74.17, 67.83, 78.94, 82.81, 78.70],
    "Shared":      [71.46, 95.50, 92.99, 78.66, 95.55, 86.67, 39.18, 73.64, 67.69, 73.36, 82.06, 77.88],
    "MLP":         [71.00, 95.59, 93.74, 75.88, 93.38, 87.20, 37.17, 72.74, 67.31, 90.66, 81.43, 78.73],
    "UPT":         [72.63, 95.94, 92.95, 84.33, 97.11, 85.00, 46.80, 75.92, 70.65, 90.51, 84.03, 81.44],
}
UPT_GAINS = {  # UPT §3.1 (Fig. 4 prints no numbers): UPT's average gain over 11 datasets at 1/2/4/8/16 shots
    "CoOp": [0.48, 1.36, 1.29, 2.46, 3.19], "VPT-deep": [0.89, 2.70, 2.03, 2.40, 2.01]}
RETHINKING_TABLE2 = {  # Rethinking Table 2: zero-shot RN50; random prompts are mean ± std over 10 seeds
    #                ClassName Basic Revised Negative RandToken  RandEmbed
    "ImageNet":     [55.3, 58.2, 59.2, 58.0, (50.0, 2.7), (47.0, 2.8)],
    "Caltech101":   [80.9, 85.9, 87.0, 84.6, (75.3, 3.4), (74.7, 5.4)],
    "OxfordPets":   [78.8, 83.7, 84.7, 81.0, (73.2, 3.8), (72.3, 3.4)],
    "StanfordCars": [54.4, 55.6, 55.6, 49.0, (52.6, 0.9), (46.5, 2.5)],
    "Flowers102":   [57.3, 60.9, 62.8, 62.7, (51.4, 2.6), (46.7, 7.6)],
    "Food101":      [73.9, 75.3, 77.2, 75.5, (72.8, 3.1), (69.0, 2.8)],
    "FGVCAircraft": [15.3, 15.7, 15.8, 15.0, (12.2, 2.5), (10.2, 2.1)],
    "SUN397":       [54.9, 58.5, 57.7, 58.5, (47.6, 3.3), (45.0, 2.4)],
    "DTD":          [41.1, 40.0, 41.1, 42.3, (34.1, 5.6), (28.6, 3.4)],
    "EuroSAT":      [28.4, 24.2, 28.0, 36.7, (22.4, 3.9), (24.2, 4.5)],
    "UCF101":       [56.4, 58.3, 57.9, 57.7, (52.5, 2.4), (47.9, 2.2)],
}
RETHINKING_TABLE3 = {  # Rethinking Table 3: minutes of optimisation, ImageNet 16 shots; RN50, RN101, ViT-B/32, ViT-B/16
    "Prompt learning": [139.5, 143.3, 136.3, 143.1],
    "Classifier fine-tuning": [13.8, 15.9, 13.7, 14.8],
}
RETHINKING_TABLE4 = {  # Rethinking Table 4: ImageNet 16 shots -> ImageNet, -V2, -Sketch, -A, -R, Average
    "RN50": {"Zero-Shot CLIP":         [58.18, 51.34, 33.32, 21.65, 56.00, 44.10],
             "Linear Probe CLIP":      [55.87, 45.97, 19.07, 12.74, 34.86, 33.70],
             "Prompt Learning":        [63.00, 55.27, 34.03, 22.40, 55.90, 46.12],
             "Classifier Fine-tuning": [64.73, 56.03, 34.13, 22.10, 58.30, 47.06]},
    "RN101": {"Zero-Shot CLIP":         [61.62, 54.81, 38.71, 28.05, 64.38, 49.51],
              "Linear Probe CLIP":      [59.75, 50.05, 26.80, 19.44, 47.19, 40.65],
              "Prompt Learning":        [66.53, 58.73, 40.00, 29.00, 64.03, 51.66],
              "Classifier Fine-tuning": [67.50, 58.60, 40.37, 28.90, 64.20, 51.91]},
    "ViT-B/32": {"Zero-Shot CLIP":         [62.05, 54.79, 40.82, 29.57, 65.99, 50.64],
                 "Linear Probe CLIP":      [59.58, 49.73, 28.06, 19.67, 47.20, 40.85],
                 "Prompt Learning":        [66.80, 58.43, 40.97, 31.30, 65.33, 52.57],
                 "Classifier Fine-tuning": [68.10, 58.17, 41.47, 30.63, 67.60, 53.19]},
    "ViT-B/16": {"Zero-Shot CLIP":         [66.73, 60.83, 46.15, 47.77, 73.96, 59.09],
                 "Linear Probe CLIP":      [65.85, 56.26, 34.77, 35.68, 58.43, 50.20],
                 "Prompt Learning":        [71.97, 64.40, 47.97, 49.97, 75.03, 61.86],
                 "Classifier Fine-tuning": [72.97, 64.47, 47.97, 48.50, 75.70, 61.92]},
}
BASE_TO_NEW = {  # CoCoOp (arXiv:2203.05557) Table 1(a), average over the 11 datasets, ViT-B/16: Base, New, H
    "CLIP": [69.34, 74.22, 71.70], "CoOp": [82.69, 63.22, 71.66], "CoCoOp": [80.47, 71.69, 75.83]}


# ----------------------------------------------------------------------------------------------------------------------
# The recipes

UPT_TEMPLATE = "a photo of a {}."  # UPT App. B: zero-shot CLIP and VPT use the default template
UPT_METHODS = {  # UPT App. B: m = 4 for CoOp (the UPT repo's CoOp config: 4 tokens from "a photo of a") and VPT
    "CoOp": ["coop", "--ctx-init", "a photo of a"],
    "VPT-shallow": ["vpt_shallow", "--template", UPT_TEMPLATE],
    "VPT-deep": ["vpt_deep", "--template", UPT_TEMPLATE],
    "UPT": ["upt"],
}
ABLATIONS = {"Joint": ["upt_joint"], "Shared": ["upt_shared"], "MLP": ["upt_mlp"]}  # UPT Table 2, Fig. 5 (a)-(c)


def zero_shot_runs(options, datasets, backbone, tables, row, transpose=False, extra=()):
    """Zero-shot CLIP once per dataset (it does not depend on shots or seed), read by each of `tables`."""
    return [train_run(["--method", "zeroshot", "--dataset", d, "--backbone", backbone, *options, *extra], t,
                      label(d) if transpose else row, [row if transpose else label(d)])
            for t in tables for d in datasets]


def upt_fig4(datasets=DATASETS, shots=SHOTS, seeds=SEEDS, backbone="ViT-B/16"):
    columns, zs = [label(d) for d in datasets], "Zero-shot CLIP"
    gains = {f"UPT - {m}": ("diff", "UPT", m) for m in UPT_GAINS}
    return dict(
        title="UPT Fig. 4: few-shot accuracy on 11 datasets, 1-16 shots, ViT-B/16, 3 seeds",
        runs=zero_shot_runs(["--template", UPT_TEMPLATE], datasets, backbone, [f"{k} shots" for k in shots], zs)
        + few_shot(UPT_METHODS, datasets, shots, seeds, backbone),
        tables=[table(f"{k} shots", [zs, *UPT_METHODS], columns, derived_rows=gains, derived_columns=average(columns),
                      published={(g, "Average"): UPT_GAINS[m][SHOTS.index(k)] for g, (_, _, m) in gains.items()})
                for k in shots],
        figures=[figures.curves(
            "upt-fig4", "UPT Fig. 4: few-shot accuracy, ViT-B/16", {k: f"{k} shots" for k in shots},
            [zs, *UPT_METHODS], ["Average", *columns],
            published={(m, c, 16): v for (m, c), v in paper(UPT_TABLE2, [label(d) for d in DATASETS] + ["Average"])
                       .items() if m in UPT_METHODS and (c in columns or c == "Average" and datasets == DATASETS)}
            if 16 in shots else {},  # the paper's Average is over its 11 datasets
            note="Rings at 16 shots: UPT Table 2 (the paper's 16-shot numbers); Fig. 4 itself prints no numbers.")],
        note="Fig. 4 is a plot: the paper gives only UPT's average gains (§3.1), shown on the 'UPT - ' rows.")


def upt_table1(seeds=SEEDS, backbone="ViT-B/16"):
    methods = {"CoOp": UPT_METHODS["CoOp"], "CoCoOp": ["cocoop"]} | {m: UPT_METHODS[m] for m in list(UPT_METHODS)[1:]}
    columns = ["ImageNet", "-V2", "-S", "-A", "-R"]
    runs = [train_run(["--method", method, "--dataset", "imagenet", "--shots", 16, "--seed", s, "--backbone", backbone,
                       *options, "--eval-datasets", ",".join(SHIFTS)], "Table 1", row, columns, sample=s)
            for row, (method, *options) in methods.items() for s in seeds]
    derived = {"Average": ("mean", columns), "OOD Average": ("mean", columns[1:])}
    return dict(title="UPT Table 1: domain generalisation, ImageNet 16 shots -> -V2/-S/-A/-R, ViT-B/16, 3 seeds",
                runs=runs, tables=[table("Table 1", methods, columns, derived_columns=derived,
                                         published=paper(UPT_TABLE1, columns + list(derived)))])


def upt_table2(datasets=DATASETS, seeds=SEEDS, backbone="ViT-B/16"):
    methods = {m: UPT_METHODS[m] for m in ("CoOp", "VPT-shallow", "VPT-deep")} | ABLATIONS | {"UPT": ["upt"]}
    columns = [label(d) for d in datasets]
    return dict(title="UPT Table 2: multi-modal prompt designs (Joint, Shared, MLP), 16 shots, ViT-B/16, 3 seeds",
                runs=few_shot(methods, datasets, [16], seeds, backbone, table="Table 2"),
                tables=[table("Table 2", methods, columns, derived_columns=average(columns),
                              published=paper(UPT_TABLE2, [label(d) for d in DATASETS] + ["Average"]))])


def upt_fig1(datasets=DATASETS, seeds=SEEDS, backbone="ViT-B/16", shots=16):
    rows, zs = [label(d) for d in datasets], "Zero-shot CLIP"
    gains = {f"{m} gain": ("diff", m, zs) for m in UPT_METHODS}
    return dict(
        title=f"UPT Fig. 1(d)(e): per-dataset feature variances beside the gains over zero-shot, {shots} shots, "
              "ViT-B/16",
        runs=[variance_run(d, backbone, "Fig. 1") for d in datasets]
        + zero_shot_runs(["--template", UPT_TEMPLATE], datasets, backbone, ["Fig. 1"], zs, transpose=True)
        + few_shot(UPT_METHODS, datasets, [shots], seeds, backbone, table="Fig. 1", transpose=True),
        tables=[table("Fig. 1", rows, ["Var_v", "Var_t", zs, *UPT_METHODS], derived_rows=average(rows),
                      derived_columns=gains, digits={"Var_v": 4, "Var_t": 4},
                      note="Var_v: intra-class visual variance (App. A Eq. 6-7), Var_t: inter-class text variance "
                           "(Eq. 8), CLIP features of the test split. The paper plots these points without numbers. "
                           f"The runs are upt-fig4's at {shots} shots (and upt-table2's at 16; same run ids).")],
        figures=[figures.scatter("upt-fig1", f"UPT Fig. 1(d)(e): gain over zero-shot CLIP vs feature variance, "
                                 f"{shots} shots", "Fig. 1", rows, [
                                     dict(x="Var_v", y="CoOp gain", runs="CoOp", title="(d) CoOp vs Var_v"),
                                     dict(x="Var_t", y="VPT-deep gain", runs="VPT-deep", title="(e) VPT-deep vs Var_t"),
                                     dict(x="Var_t", y="VPT-shallow gain", runs="VPT-shallow",
                                          title="VPT-shallow vs Var_t")],
                                 note="Gains: mean accuracy minus zero-shot CLIP's (points: datasets).")],
        note="The paper does not give Fig. 1's shot count (upt_fig1(shots=...) takes one; the recipe's default is 16). "
             "At 16 shots its own Table 2 does not give the text's gaps (CoOp beats VPT by 8.1 on Flowers102, VPT "
             "beats CoOp by 8.4 on EuroSAT): its gaps are 0.94 and 12.76 with VPT-deep, 14.50 and 6.10 with "
             "VPT-shallow.")


HANDCRAFTED = {"ClassName": "classname", "Basic": "basic", "Revised": "revised", "Negative": "negative"}  # its Table 1


def rethinking_table1(datasets=DATASETS, backbone="RN50"):
    rows, columns = [label(d) for d in datasets], list(HANDCRAFTED)
    return dict(title="Rethinking Table 1: zero-shot with hand-crafted prompts, RN50 (numbers: its Table 2)",
                runs=[train_run(["--method", "zeroshot", "--dataset", d, "--backbone", backbone, "--prompt", p],
                                "Table 2", label(d), [name]) for name, p in HANDCRAFTED.items() for d in datasets],
                tables=[table("Table 2", rows, columns, derived_rows=average(rows), digits=1,
                              published=paper({r: RETHINKING_TABLE2[r][:4] for r in rows if r in RETHINKING_TABLE2},
                                              columns))])


def rethinking_table2(datasets=DATASETS, seeds=range(1, 11), backbone="RN50"):
    handcrafted = rethinking_table1(datasets, backbone)
    rows, columns = [label(d) for d in datasets], [*HANDCRAFTED, "RandToken", "RandEmbed"]
    random = [train_run(["--method", "zeroshot", "--dataset", d, "--backbone", backbone, "--prompt", p, "--seed", s],
                        "Table 2", label(d), [name], sample=s)
              for name, p in [("RandToken", "randtoken"), ("RandEmbed", "randembed")] for d in datasets for s in seeds]
    return dict(title="Rethinking Table 2: zero-shot with hand-crafted and random prompts (10 seeds), RN50",
                runs=handcrafted["runs"] + random,
                tables=[table("Table 2", rows, columns, derived_rows=average(rows), digits=1,
                              published=paper({r: RETHINKING_TABLE2[r] for r in rows if r in RETHINKING_TABLE2},
                                              columns),
                              note="random prompts: 4 random tokens prepended (train.py's default --random-length; "
                                   "the paper does not give the length)")])


COOP_GRID = [(e, lr) for e in (50, 100, 200) for lr in (2e-2, 2e-3, 2e-4)]  # Rethinking §5.1: epochs x learning rate
FT_GRID = [(e, lr) for e in (50, 100, 200) for lr in (2e-1, 2e-2, 2e-3)]


def rethinking_fig1(datasets=DATASETS, shots=SHOTS, seeds=SEEDS, backbone="RN50"):
    columns = [label(d) for d in datasets]
    rows = ["Zero-shot CLIP", "Linear probe", "Prompt learning", "Classifier FT"]

    def grid(row, method, grid_cells):
        return [run for e, lr in grid_cells for run in
                few_shot({row: [*method, "--epochs", e, "--lr", lr]}, datasets, shots, seeds, backbone,
                         choice=f"{e} ep, lr {lr:g}")]

    return dict(
        title="Rethinking Fig. 1: prompt learning (CoOp m=16) vs classifier fine-tuning, 1-16 shots, RN50, 3 seeds",
        runs=zero_shot_runs(["--prompt", "dataset"], datasets, backbone, [f"{k} shots" for k in shots], rows[0])
        + few_shot({"Linear probe": ["linear_probe"]}, datasets, shots, seeds, backbone)
        + grid("Prompt learning", ["coop", "--n-ctx", 16], COOP_GRID) + grid("Classifier FT", ["linear_ft"], FT_GRID),
        tables=[table(f"{k} shots", rows, columns, derived_columns=average(columns),
                      derived_rows={"FT - PL": ("diff", "Classifier FT", "Prompt learning")}) for k in shots],
        figures=[figures.curves("rethinking-fig1", "Rethinking Fig. 1: prompt learning vs classifier fine-tuning, RN50",
                                {k: f"{k} shots" for k in shots}, rows, ["Average", *columns],
                                note="Prompt learning and classifier FT: the best of the grid per point (see the "
                                     "table's note). The paper prints no numbers for Fig. 1.")],
        note="Prompt learning and classifier FT: each cell is the best of the paper's grid (epochs {50,100,200} x lr "
             "{2e-2,2e-3,2e-4} for CoOp, {2e-1,2e-2,2e-3} for FT) by mean TEST accuracy over seeds. This selects on "
             "the test set, as the paper says it did (§5.1), so both rows are optimistic. Published (§5.2, Fig. 1 "
             "prints no numbers): classifier FT beats prompt learning by 1.5-2.3% on average for 1-16 shots.")


def rethinking_table3(backbones=tuple(BACKBONES), seed=1):
    methods = {"Prompt learning": ["coop", "--n-ctx", 16], "Classifier fine-tuning": ["linear_ft"]}
    columns = [BACKBONES.get(b, label(b)) for b in backbones]
    runs = [train_run(["--method", method, "--dataset", "imagenet", "--shots", 16, "--seed", seed, "--backbone", b,
                       *options, "--no-feature-bank"], "Table 3", row, [c], metric="minutes")
            for row, (method, *options) in methods.items() for b, c in zip(backbones, columns)]
    return dict(title="Rethinking Table 3: minutes of training, ImageNet 16 shots, 4 backbones, seed 1",
                runs=runs, tables=[table(
                    "Table 3", methods, columns, digits=1,
                    derived_rows={"PL / FT": ("ratio", "Prompt learning", "Classifier fine-tuning")},
                    published=paper(RETHINKING_TABLE3, [BACKBONES[b] for b in BACKBONES]),
                    note="train_seconds / 60 of one run (50 epochs, lr 0.002) with --no-feature-bank: images go "
                         "through the image encoder at every step, as the paper timed it. The paper's GPU is not "
                         "stated; it reports classifier FT about 10x faster.")])


def rethinking_table4(backbones=tuple(BACKBONES), seeds=SEEDS, grid=True):
    methods = {"Zero-Shot CLIP": ["zeroshot"], "Linear Probe CLIP": ["linear_probe"],
               "Prompt Learning": ["coop", "--n-ctx", 16], "Classifier Fine-tuning": ["linear_ft"]}
    grids = {"coop": COOP_GRID, "linear_ft": FT_GRID} if grid else {}  # Rethinking §5.1: "for all experiments"
    columns = ["ImageNet", "-V2", "-Sketch", "-A", "-R"]
    runs = []
    for b in backbones:
        for row, (method, *options) in methods.items():
            for e, lr in grids.get(method, [(None, None)]):
                setting = [] if e is None else ["--epochs", e, "--lr", lr]
                for s in [None] if method == "zeroshot" else seeds:
                    runs.append(train_run(["--method", method, "--dataset", "imagenet", "--backbone", b,
                                           *([] if s is None else ["--shots", 16, "--seed", s]), *options, *setting,
                                           "--eval-datasets", ",".join(SHIFTS)], b, row, columns, sample=s or 1,
                                          choice=None if e is None else f"{e} ep, lr {lr:g}"))
    note = ("Prompt learning and classifier FT: the paper's grid (§5.1: epochs {50,100,200} x lr {2e-2,2e-3,2e-4} for "
            "CoOp, {2e-1,2e-2,2e-3} for FT); the setting with the best mean ImageNet TEST accuracy over seeds is kept "
            "for the whole row (one model per row, the shifts never select), as the paper selects on test: optimistic. "
            "rethinking-table4-one-setting trains train.py's one default instead (ImageNet: 50 epochs, lr 0.002)."
            if grid else "Prompt learning and classifier FT use train.py's defaults (ImageNet: 50 epochs, lr 0.002); "
            "the paper's grid selection (§5.1) is recipe rethinking-table4.")
    return dict(title=f"Rethinking Table 4: ImageNet 16 shots -> -V2/-Sketch/-A/-R, 4 backbones, 3 seeds"
                      f"{', best of the grid' if grid else ', one setting'}",
                runs=runs, tables=[table(b, methods, columns, title=BACKBONES.get(b, b),
                                         derived_columns=average(columns), select_by="ImageNet" if grid else None,
                                         published=paper(RETHINKING_TABLE4.get(b, {}), columns + ["Average"]))
                                   for b in backbones],
                note=note)


def base_to_new(datasets=DATASETS, seeds=SEEDS, backbone="ViT-B/16", budgets=(10, 25, 50, 100, 200)):
    coop = ["coop", "--ctx-init", "a photo of a"]  # CoCoOp's CoOp config for base-to-new (vit_b16_ctxv1)
    methods = {"CoOp": coop, "CoCoOp": ["cocoop"], **{m: UPT_METHODS[m] for m in UPT_METHODS if m != "CoOp"},
               **ABLATIONS}
    budget_rows = {f"CoOp {e} ep": [*coop, "--epochs", e] for e in budgets}  # Rethinking §6, Fig. 2
    tables = [label(d) for d in datasets]
    zero_shot = [train_run(["--method", "zeroshot", "--dataset", d, "--backbone", backbone, "--subsample", "base",
                            "--eval-datasets", f"{d}:new"], label(d), "CLIP", ["Base", "New"]) for d in datasets]
    rows = ["CLIP", *methods, *budget_rows]
    hm = {"H": ("hm", "Base", "New")}
    return dict(
        title="Base-to-new (CoCoOp protocol): train on the base classes, test on base and new, 16 shots, ViT-B/16",
        runs=zero_shot + few_shot(methods | budget_rows, datasets, [16], seeds, backbone, table="{dataset}",
                                  subsample="base"),
        tables=[table("Average", rows, ["Base", "New"], title=f"average over {len(datasets)} datasets", mean_of=tables,
                      derived_columns=hm, published=paper(BASE_TO_NEW, ["Base", "New", "H"]))]
        + [table(t, rows, ["Base", "New"], derived_columns=hm) for t in tables],
        figures=[figures.tradeoff("rethinking-fig2", "Rethinking Fig. 2: the trade-off between optimality (base) and "
                                  "generalisation (new), ViT-B/16, 16 shots", ["Average", *tables],
                                  ["CLIP", "CoOp", "CoCoOp", "UPT"], lines={"CoOp by epochs": list(budget_rows)},
                                  note="'CoOp by epochs': CoOp trained for " + ", ".join(map(str, budgets)) + " epochs "
                                       "(the paper does not list its budgets). Rings on the Average panel: CoCoOp's "
                                       "Table 1 (CLIP, CoOp, CoCoOp).")],
        note="H = 2·Base·New / (Base + New) of the seed means; the Average table takes the mean Base and mean New "
             "over datasets and their H (as CoCoOp). CLIP uses CoOp's per-dataset templates, as CoCoOp did. 'CoOp E "
             "ep' rows: Rethinking §6 Fig. 2 trains CoOp for several epoch budgets but does not list them; these are "
             "ours. linear_ft, linear_probe and CoOp-CSC are class-specific and cannot score new classes.")


def cross_dataset(seeds=SEEDS, backbone="ViT-B/16", targets=DATASETS[1:], shifts=SHIFTS):
    """CoCoOp's and MaPLe's Table 2: train on ImageNet (16 shots, all classes), test on the other datasets and on
    ImageNet's shifts; one run per method and seed fills both tables (its columns that are not a table's are None)."""
    methods = {"CoOp": UPT_METHODS["CoOp"], "CoCoOp": ["cocoop"],
               **{m: UPT_METHODS[m] for m in UPT_METHODS if m != "CoOp"}, **ABLATIONS}
    names = {"imagenetv2": "-V2", "imagenet_sketch": "-S", "imagenet_a": "-A", "imagenet_r": "-R"}
    transfer, shifted = [label(d) for d in targets], [names.get(d, label(d)) for d in shifts]
    evaluated = ["--eval-datasets", ",".join([*targets, *shifts])]
    layouts = {"Cross-dataset": ["ImageNet", *transfer, *[None] * len(shifts)],
               "Domain generalisation": ["ImageNet", *[None] * len(targets), *shifted]}
    runs = [train_run(["--method", "zeroshot", "--dataset", "imagenet", "--backbone", backbone,
                       "--template", UPT_TEMPLATE, *evaluated], t, "Zero-shot CLIP", columns)
            for t, columns in layouts.items()]
    runs += [train_run(["--method", method, "--dataset", "imagenet", "--shots", 16, "--seed", s, "--backbone", backbone,
                        *options, *evaluated], t, row, columns, sample=s)
             for row, (method, *options) in methods.items() for s in seeds for t, columns in layouts.items()]
    rows = ["Zero-shot CLIP", *methods]
    return dict(
        title="Cross-dataset transfer (CoCoOp, MaPLe Table 2): ImageNet 16 shots, all classes -> 10 datasets and 4 "
              "ImageNet shifts, ViT-B/16, 3 seeds",
        runs=runs,
        tables=[table("Cross-dataset", rows, ["ImageNet", *transfer], derived_columns={"Average": ("mean", transfer)},
                      note="Average: the 10 target datasets (the source, ImageNet, is not in it), as CoCoOp."),
                table("Domain generalisation", rows, ["ImageNet", *shifted],
                      derived_columns={"Average": ("mean", ["ImageNet", *shifted]), "OOD Average": ("mean", shifted)},
                      published=paper({m: v for m, v in UPT_TABLE1.items() if m in rows},
                                      ["ImageNet", "-V2", "-S", "-A", "-R", "Average", "OOD Average"]))],
        note="Every method that can score classes it was not trained on (linear_ft, linear_probe and CoOp-CSC cannot). "
             "Prompts and templates are the trained (ImageNet) run's: 'a photo of a {}.' for zero-shot CLIP and VPT, "
             "CoOp from 'a photo of a' (UPT App. B). Paper rows on the domain-generalisation table: UPT Table 1 (same "
             "protocol); CoCoOp's and MaPLe's cross-dataset numbers are not transcribed here.")


RECIPES = {
    "upt-fig4": upt_fig4(),
    "upt-table1": upt_table1(),
    "upt-table2": upt_table2(),
    "upt-fig1": upt_fig1(),
    "rethinking-table1": rethinking_table1(),
    "rethinking-table2": rethinking_table2(),
    "rethinking-fig1": rethinking_fig1(),
    "rethinking-table3": rethinking_table3(),
    "rethinking-table4": rethinking_table4(),
    "rethinking-table4-one-setting": rethinking_table4(grid=False),
    "base-to-new": base_to_new(),
    "cross-dataset": cross_dataset(),
}


# ----------------------------------------------------------------------------------------------------------------------
# The grid of one command line: a recipe rebuilt with --datasets/--shots/--seeds/--backbone, train.py options added

GRID = {"datasets": ["datasets"], "shots": ["shots"], "seeds": ["seeds", "seed"], "backbone": ["backbone", "backbones"]}
PASSED = ["epochs", "lr", "batch_size", "precision", "workers", "compile"]  # train.py options given to the runs


def items_of(option, text, cast=str):
    """A comma-separated option value -> its items, each checked."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        items = [cast(x) for x in items]
    except ValueError:
        raise RecipeError(f"--{option} takes comma-separated whole numbers (got {text!r})") from None
    if not items or (cast is int and min(items) < 1):
        raise RecipeError(f"--{option} takes comma-separated " + ("numbers of at least 1" if cast is int else "names")
                          + f" (got {text!r})")
    return items


def build(name, args):
    """RECIPES[name], or, with a grid option, the recipe's function (its name, - for _) called with those values."""
    given = {key: getattr(args, key) for key in GRID if getattr(args, key) is not None}
    if not given:
        return RECIPES[name]
    function = globals().get(name.replace("-", "_"))
    parameters = inspect.signature(function).parameters if name in RECIPES and callable(function) else {}
    kwargs = {}
    for key, text in given.items():
        parameter = next((p for p in GRID[key] if p in parameters), None)
        if parameter is None:
            raise RecipeError(f"--{key}: recipe {name} fixes it (" + ("the paper's setting" if parameters else
                              "a recipe built with fixed values") + f"): drop --{key}")
        items = items_of(key, text, int if key in ("shots", "seeds") else str)
        for d in items if key == "datasets" else []:
            if not d.startswith("folder:") and d not in data.DATASETS:
                close = difflib.get_close_matches(d, data.DATASETS, n=1)
                raise RecipeError(f"--datasets: unknown dataset {d!r}" + (f" (did you mean {close[0]!r}?)" if close
                                  else "") + f"; use {', '.join(data.DATASETS)} or folder:/path")
        one = not isinstance(parameters[parameter].default, (list, tuple, range))  # e.g. seed=1, not seeds=SEEDS
        if one and len(items) > 1:
            raise RecipeError(f"--{key}: recipe {name} takes one value (got {text!r})")
        kwargs[parameter] = items[0] if one else items
    return function(**kwargs)


def with_options(name, recipe, args):
    """The recipe with the train.py options of the command line (--epochs, --precision, ...) added to every run that
    reads them (runs.USED_BY); an option that no run reads, or that a run sets itself (a grid), is an error."""
    given = {key: getattr(args, key) for key in PASSED if getattr(args, key) is not None}
    if not given:
        return recipe
    entries, used = [], set()
    for entry in recipe["runs"]:
        argv = list(entry["argv"])
        method = argv[argv.index("--method") + 1] if entry["script"] == "train.py" else None
        for key, value in given.items():
            option = runs.option(key)
            if (method is None and key != "workers") or method not in runs.USED_BY.get(key, [method]):
                continue  # variance.py reads --workers only; zero-shot has no --epochs
            if option in argv:
                raise RecipeError(f"{option}: recipe {name} sets it in its own runs ({entry['row']}: {option} "
                                  f"{argv[argv.index(option) + 1]}): drop {option}")
            argv += [option] if value is True else [option, str(value)]
            used.add(key)
        entries.append(dict(entry, argv=argv))
    for key in given.keys() - used:
        raise RecipeError(f"{runs.option(key)} is read by no run of recipe {name}: drop it")
    return dict(recipe, runs=entries)


# ----------------------------------------------------------------------------------------------------------------------
# Planning: each run once, its command, and whether results.jsonl already holds it

def plan_recipe(name, recipe, root, output_dir):
    """-> (jobs, cells). jobs: the distinct runs, ordered so runs on one training subset are adjacent, longest epoch
    budget first (the feature bank's first run computes what the others read). cells: (run entry, result keys)."""
    jobs, cells = {}, []
    for entry in recipe["runs"]:
        argv = [*entry["argv"], "--root", root, "--output-dir", output_dir]
        if entry["script"] == "variance.py":
            key = entry["key"]
            _, dataset, backbone, split = key
            job = dict(id=f"variance_{label(dataset)}_{backbone.replace('/', '-')}_{split}", keys=[key],
                       checkpoint=None, subset=(dataset, "all", None, None, backbone), epochs=0)  # beside zero-shot
            keys = [key, key]
        else:
            try:
                p = train.plan(argv)
            except (runs.RunError, ValueError) as e:
                raise RecipeError(f"recipe {name}: {shlex.join(['python', 'train.py', *argv])}: {e}") from None
            s = p["settings"]
            keys = [(p["run_id"], *target) for target in p["targets"]]
            resumable = s["method"] not in ("zeroshot", "linear_probe")  # train.py: --resume needs epochs to resume
            seed = s["seed"] if s["shots"] else None  # zero-shot runs of a dataset (random prompts too) go together
            job = dict(id=p["run_id"], keys=keys, checkpoint=os.path.join(p["run_dir"], "checkpoint.pt") if resumable
                       else None, subset=(s["dataset"], s["subsample"], s["shots"], seed, s["backbone"]),
                       epochs=s["epochs"] or 0)
        if len(keys) != len(entry["columns"]):
            raise RecipeError(f"recipe {name}: {shlex.join(entry['argv'])} has {len(keys)} evaluation targets for "
                              f"{len(entry['columns'])} columns")
        job["command"] = ["python", entry["script"], *argv]
        if job["id"] in jobs and jobs[job["id"]]["keys"] != job["keys"]:
            raise RecipeError(f"recipe {name}: run {job['id']} appears with two sets of evaluation targets: "
                              f"{jobs[job['id']]['keys']} and {job['keys']}")
        jobs.setdefault(job["id"], job)
        cells.append((entry, keys))
    first = {}
    for job in jobs.values():
        first.setdefault(job["subset"], len(first))
    return sorted(jobs.values(), key=lambda j: (first[j["subset"]], -j["epochs"])), cells


ROW_FIELDS = {"train": dict(run_id=str, dataset=str, subsample=str, accuracy=float),  # what pending() and the report
              "variance": dict(dataset=str, backbone=str, split=str, var_v=float, var_t=float)}  # read of each row
NUMBERS = ["train_seconds"]  # read where present (a table of minutes)


def row_problem(row):
    """Why a parsed line is not a row the report can use (None if it is one): not an object, a missing field, a field
    of the wrong type (a number written as "87.5%")."""
    if not isinstance(row, dict):
        return f"{json.dumps(row)[:40]} is not a JSON object"
    kind = "variance" if row.get("kind") == "variance" else "train" if "kind" not in row else None
    if kind is None:
        return f"unknown kind {row['kind']!r}"
    fields = {**ROW_FIELDS[kind], **{k: float for k in NUMBERS if row.get(k) is not None}}  # None: not recorded
    for key, expected in fields.items():
        value = row.get(key)
        if key not in row:
            return f"no \"{key}\""
        if expected is str and not isinstance(value, str) or expected is float and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            return f"\"{key}\" is {json.dumps(value)[:40]}, not a {'string' if expected is str else 'finite number'}"
    return None


def read_results(output_dir):
    """results.jsonl -> {key: the last row}: (run_id, dataset, subsample) for train.py rows, ("variance", dataset,
    backbone, split) for variance.py rows. A bad line (cut by a killed writer, not UTF-8, not JSON, not a row, a field
    missing or of the wrong type) is skipped with one warning that gives the line numbers: its run counts as not
    done."""
    path, results, bad = os.path.join(output_dir, "results.jsonl"), {}, []
    if not os.path.exists(path):
        return results
    try:
        f = open(path, "rb")
    except OSError as e:  # a folder, unreadable
        raise RecipeError(f"cannot read {path} ({e.strerror or e}): make it a readable file or pass another "
                          "--output-dir") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad.append((number, "not UTF-8"))
                continue
            except json.JSONDecodeError:
                bad.append((number, "not JSON (cut by a killed writer?)"))
                continue
            problem = row_problem(row)
            if problem:
                bad.append((number, problem))
            elif row.get("kind") == "variance":
                results[("variance", row["dataset"], row["backbone"], row["split"])] = row
            else:
                results[(row["run_id"], row["dataset"], row["subsample"])] = row
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5])
        more = f"; {len(bad) - 5} more at lines {', '.join(str(n) for n, _ in bad[5:25])}" + \
            (", ..." if len(bad) > 25 else "") if len(bad) > 5 else ""
        print(f"warning: {path}: skipped {len(bad)} bad line{'s' * (len(bad) > 1)} ({shown}{more}): their runs count "
              "as not done", file=sys.stderr)
    return results


def pending(jobs, results):
    return [job for job in jobs if any(key not in results for key in job["keys"])]


def command_of(job):
    """The job's command; with --resume where its checkpoint exists (train.py refuses --resume without one)."""
    resume = job["checkpoint"] and os.path.isfile(job["checkpoint"])
    return job["command"] + (["--resume"] if resume else [])


# ----------------------------------------------------------------------------------------------------------------------
# Running: one process per GPU, each run's output in OUTPUT/logs/<run id>.log

def execute(command, env, log_path):
    """Run `command` (["python", "train.py", ...]) from the repository root, its output appended to log_path;
    -> its exit code. The one place a run is started (tests replace it)."""
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run([sys.executable, *command[1:]], cwd=HERE, env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode


def last_line(path):
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(empty log)"


def gpu_ids(count):
    """The CUDA device each worker is pinned to: the visible devices in order; [None] for one unpinned worker."""
    if count is None:
        count = torch.cuda.device_count()
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = visible if visible else [str(i) for i in range(count)]
    return ids[:count] if count else [None]


def run_all(jobs, gpus, output_dir):
    """Run the jobs, one worker per GPU (each taking the next job when its last ends); -> [(job, log, last line)] of
    those that failed. The others go on."""
    logs = os.path.join(output_dir, "logs")
    try:
        os.makedirs(logs, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"cannot create {logs} ({e.strerror or e}): choose another --output-dir") from None
    todo, failed, lock, stop = queue.SimpleQueue(), [], threading.Lock(), threading.Event()
    for i, job in enumerate(jobs, 1):
        todo.put((i, job))

    def worker(gpu):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **({} if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}))
        while not stop.is_set():
            try:
                i, job = todo.get_nowait()
            except queue.Empty:
                return
            command, log, start = command_of(job), os.path.join(logs, f"{job['id']}.log"), time.time()
            with lock:
                print(f"[{i}/{len(jobs)}]{'' if gpu is None else f' GPU {gpu}'}: {shlex.join(command)}", flush=True)
            code = execute(command, env, log)
            with lock:
                status = "done" if code == 0 else f"FAILED (exit {code})"
                seconds = time.time() - start
                took = f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
                print(f"[{i}/{len(jobs)}] {status} in {took} | log {log}", flush=True)
                if code != 0:
                    failed.append((job, log, last_line(log)))

    threads = [threading.Thread(target=worker, args=(gpu,), daemon=True) for gpu in gpus]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        raise
    return failed


# ----------------------------------------------------------------------------------------------------------------------
# Preflight: what every run needs, checked once before anything is launched (a cluster would fail task by task)

def preflight(jobs, output_dir):
    """-> one line per problem: a dataset train.py would refuse (its own up-front checks), a backbone that does not
    load (an official one is downloaded and cached here, once, so that tasks never race for it), an output folder that
    cannot be written."""
    problems = []
    try:
        os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
        with open(os.path.join(output_dir, f".preflight.{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(output_dir, f".preflight.{os.getpid()}"))
    except OSError as e:
        problems.append(f"cannot write under {output_dir} ({e.strerror or e}): choose another --output-dir")
    checked, failed, backbones = set(), set(), {}
    for job in jobs:
        argv, names = job["command"][2:], []
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # data.py's one line per dataset
                if job["command"][1] == "variance.py":
                    _, dataset, backbone, split = job["keys"][0]
                    names, check = [dataset], lambda: data.load_dataset(dataset, argv[argv.index("--root") + 1],
                                                                        check_splits=(split,))
                else:
                    args = runs.resolve(train.parse_args(argv))
                    backbone, names = args.backbone, [name for name, _ in runs.eval_targets(args)]
                    check = functools.partial(runs.load_data, args)
                backbones.setdefault(backbone, job)
                what = (tuple(names), job["subset"])
                if what in checked or failed & set(names):
                    continue
                checked.add(what)
                check()
        except (runs.RunError, data.DataError, ValueError, OSError) as e:
            failed.update(names)
            if str(e) not in problems:
                problems.append(str(e))
    for backbone in backbones:
        try:
            clip_model.load(backbone, "cpu")
        except (clip_model.CLIPError, OSError, RuntimeError, ValueError) as e:
            problems.append(f"--backbone {backbone}: {clip_model.one_line(e)}")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Slurm: one array task per training subset, in chunks that fit the cluster's MaxArraySize

def tasks_of(jobs):
    """Jobs in plan order -> array tasks: the runs of one training subset (dataset, subsample, shots, seed, backbone),
    in the plan's order (longest epoch budget first: one task builds the subset's feature bank, the others read it);
    a dataset's zero-shot runs (and its variance run) share one task."""
    tasks = {}
    for job in jobs:
        tasks.setdefault(job["subset"], []).append(job)
    return list(tasks.values())


def chunks(n_tasks, max_array):
    """-> [(first task, task count)]: array indices run from 0 to at most max_array - 1 (MaxArraySize caps the highest
    index, not the count), and the script adds the chunk's first task."""
    return [(start, min(max_array, n_tasks - start)) for start in range(0, n_tasks, max_array)]


def submit_lines(path, n_tasks, max_array, throttle=None):
    """The sbatch commands that submit every task: the script's own --array for the first chunk, then one per chunk."""
    limit = f"%{throttle}" if throttle else ""
    return [f"sbatch {shlex.quote(path)}" if start == 0 else
            f"sbatch --array=0-{count - 1}{limit} {shlex.quote(path)} {start}"
            for start, count in chunks(n_tasks, max_array)]


def sbatch_lines(name, n_tasks, output_dir, opts):
    """The #SBATCH directives: job name, the first chunk's array, resources, the log of each task."""
    lines = [f"--job-name={name}",
             f"--array=0-{min(n_tasks, opts.max_array) - 1}" + (f"%{opts.throttle}" if opts.throttle else "")]
    if opts.gres:
        lines.append(f"--gres={opts.gres}")
    elif opts.gpus_per_task:
        lines.append(f"--gres=gpu:{opts.gpus_per_task}")  # one task per job: --gres works on cons_res and cons_tres
    lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    lines += [f"--{key}={value}" for key, value in [("partition", opts.partition), ("time", opts.time),
                                                    ("account", opts.account)] if value]
    extra = []
    for token in shlex.split(opts.sbatch or ""):  # --sbatch "--qos=high --mem 64G": one directive per option
        if token.startswith("-") or not extra:
            extra.append(token)
        else:
            extra[-1] += f" {shlex.quote(token)}"
    lines += extra
    lines += [f"--output={os.path.join(output_dir, 'logs', 'slurm-%A_%a.log')}", "--open-mode=append"]
    return [f"#SBATCH {line}" for line in lines]


def write_slurm(path, name, tasks, output_dir, opts, again):
    """A Slurm array job: task i runs the runs of tasks[i] one after another with the Python that wrote the script,
    each appending to OUTPUT/logs/<run id>.log as the local runner does, and continuing from its checkpoint if one
    exists when the task starts (a requeue, a preemption, a rerun), from scratch otherwise."""
    n_runs = sum(map(len, tasks))
    lines = ["#!/bin/bash", *sbatch_lines(name, len(tasks), output_dir, opts),
             f"# {name}: {n_runs} runs still missing, in {len(tasks)} array tasks (a task: the runs of one training "
             "subset), written by:",
             f"#   {again}",
             "# Submit every task (array indices start at 0 in each chunk; the argument is the chunk's first task):",
             *(f"#   {line}" for line in submit_lines(path, len(tasks), opts.max_array, opts.throttle)),
             "# After failures, cancels or a time limit, run the command above again: it writes only what is missing.",
             f"cd {shlex.quote(HERE)} || exit 1",
             "export PYTHONUNBUFFERED=1",
             'TASK=$((SLURM_ARRAY_TASK_ID + ${1:-0}))',
             "FAILED=0",
             "run() {  # run LOG CHECKPOINT COMMAND...: output appended to LOG; --resume if CHECKPOINT exists now",
             '  local log=$1 checkpoint=$2',
             "  shift 2",
             '  if [ -n "$checkpoint" ] && [ -f "$checkpoint" ]; then set -- "$@" --resume; fi',
             '  echo "$(date "+%F %T") task $TASK: $(printf "%q " "$@")> $log"',
             '  echo "\\$ $(printf "%q " "$@")" >> "$log"',
             '  "$@" >> "$log" 2>&1',
             "  local code=$?",
             '  echo "$(date "+%F %T") exit $code"',
             '  [ $code -eq 0 ] || FAILED=1',
             "}",
             'case "$TASK" in']
    for i, task in enumerate(tasks):
        lines.append(f"{i})")
        for job in task:
            command = [sys.executable, *job["command"][1:]]
            log = os.path.join(output_dir, "logs", f"{job['id']}.log")
            lines.append(f"  run {shlex.quote(log)} {shlex.quote(job['checkpoint'] or '')} {shlex.join(command)}")
        lines.append("  ;;")
    lines += [f'*) echo "task $TASK: this script has tasks 0-{len(tasks) - 1}"; exit 2 ;;', "esac", 'exit $FAILED']
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)  # Slurm does not create the --output folder
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise RecipeError(f"cannot write {path} ({e.strerror or e}): choose another path") from None


# ----------------------------------------------------------------------------------------------------------------------
# Report: cells from results.jsonl, derived cells, the paper's numbers beside them

def stat(samples):
    """Mean, sample standard deviation (ddof=1; None for one sample) and count."""
    return dict(mean=statistics.mean(samples), std=statistics.stdev(samples) if len(samples) > 1 else None,
                n=len(samples))


def measured(found, wanted):
    """A cell from {choice: {sample: value}} found and {choice: {samples}} wanted. One choice: its mean ± std. A grid
    of choices: the choice with the best mean, once every choice has all its samples (Rethinking §5.1)."""
    complete = all(wanted[c] <= set(found.get(c, {})) for c in wanted)
    if len(wanted) > 1:
        if not complete:
            return None
        stats = {c: stat(list(found[c].values())) for c in wanted}
        best = max(stats, key=lambda c: stats[c]["mean"])
        return dict(stats[best], complete=True, selected=best)
    samples = [v for c in wanted for v in found.get(c, {}).values()]
    return dict(stat(samples), complete=complete, selected=None) if samples else None


def combine(op, cells):
    """A derived cell: mean, diff, hm or ratio of the cells' means; None unless every cell has a value."""
    if not cells or any(c is None for c in cells):
        return None
    m = [c["mean"] for c in cells]
    if op == "mean":
        value = sum(m) / len(m)
    elif op == "diff":
        value = m[0] - m[1]
    elif op == "hm":
        value = 2 * m[0] * m[1] / (m[0] + m[1]) if m[0] + m[1] else 0.0
    elif op == "ratio":
        value = m[0] / m[1] if m[1] else math.inf
    else:
        raise RecipeError(f"unknown derived cell {op!r}: use mean, diff, hm or ratio")
    return dict(mean=value, std=None, n=None, complete=all(c["complete"] for c in cells), selected=None)


def operands(op, args):
    return args[0] if op == "mean" else args


def compute(recipe, cells, results):
    """-> {table name: {(row, column): cell or None}} for every table of the recipe, and the missing base cells."""
    found, wanted = {}, {}
    for entry, keys in cells:
        for column, key, metric in zip(entry["columns"], keys, entry["metric"]):
            cell = (entry["table"], entry["row"], column)
            wanted.setdefault(cell, {}).setdefault(entry["choice"], set()).add(entry["sample"])
            if key in results and METRICS[metric](results[key]) is not None:  # None: not recorded, a missing cell
                found.setdefault(cell, {}).setdefault(entry["choice"], {})[entry["sample"]] = \
                    METRICS[metric](results[key])
    out, missing = {}, []
    for spec in sorted(recipe["tables"], key=lambda t: bool(t["mean_of"])):  # tables others average come first
        t = out[spec["name"]] = {}
        by = spec.get("select_by")
        for r in spec["rows"]:
            for c in sorted(spec["columns"], key=lambda c: c != by):  # the select_by column first
                if spec["mean_of"]:
                    t[r, c] = combine("mean", [out[name].get((r, c)) for name in spec["mean_of"]])
                    continue
                got, want = found.get((spec["name"], r, c), {}), wanted.get((spec["name"], r, c), {})
                if by and c != by and len(want) > 1:  # the grid choice the select_by column picked
                    chosen = (t.get((r, by)) or {}).get("selected")
                    t[r, c] = measured(got, {chosen: want[chosen]}) if chosen else None
                    if t[r, c]:
                        t[r, c]["selected"] = chosen
                else:
                    t[r, c] = measured(got, want)
                n_got, n_want = sum(len(got.get(choice, {})) for choice in want), sum(map(len, want.values()))
                if n_got < n_want:
                    missing.append(f"{spec['name']} | {r} | {c}: {n_got} of {n_want} runs")
        for r, (op, *args) in spec["derived_rows"].items():
            for c in spec["columns"]:
                t[r, c] = combine(op, [t.get((x, c)) for x in operands(op, args)])
        for c, (op, *args) in spec["derived_columns"].items():
            for r in spec["rows"] + list(spec["derived_rows"]):
                t[r, c] = combine(op, [t.get((r, x)) for x in operands(op, args)])
    return out, missing


def published_mean(value):
    return value[0] if isinstance(value, tuple) else value


def format_table(spec, cells):
    rows, columns = spec["rows"] + list(spec["derived_rows"]), spec["columns"] + list(spec["derived_columns"])
    base = set(spec["rows"]) if not spec["mean_of"] else set()
    digits = lambda c: spec["digits"].get(c, 2) if isinstance(spec["digits"], dict) else spec["digits"]

    def text(r, c):
        cell = cells.get((r, c))
        if cell is None:
            return "missing" if r in base and c in spec["columns"] else "-"
        std = "" if cell["std"] is None else f"±{cell['std']:.{digits(c)}f}"
        return f"{cell['mean']:.{digits(c)}f}{std}{'' if cell['complete'] else '*'}"

    def paper_text(r, c):
        value = spec["published"].get((r, c))
        if value is None:
            return ""
        return f"{value[0]}±{value[1]}" if isinstance(value, tuple) else f"{value:.{digits(c)}f}"

    def diff_text(r, c):
        value, cell = spec["published"].get((r, c)), cells.get((r, c))
        if value is None:
            return ""
        return "-" if cell is None else f"{cell['mean'] - published_mean(value):+.{digits(c)}f}"

    grid = [["", *columns]]
    for r in rows:
        grid.append([r, *(text(r, c) for c in columns)])
        if any((r, c) in spec["published"] for c in columns):
            grid.append(["  paper", *(paper_text(r, c) for c in columns)])
            grid.append(["  diff", *(diff_text(r, c) for c in columns)])
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    title = f"{spec['name']}" + (f" ({spec['title']})" if spec["title"] else "")
    lines = [title] + ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
                       .rstrip() for line in grid]
    chosen = {r: [f"{c}: {cells[r, c]['selected']}" for c in spec["columns"]
                  if (cells.get((r, c)) or {}).get("selected")] for r in spec["rows"]}
    lines += [f"selected for {r} ({', '.join(v)})" for r, v in chosen.items() if v]
    if spec["note"]:
        lines.append(f"note: {spec['note']}")
    return "\n".join(lines)


def report(name, recipe, cells, results, csv_path=None, limit=20, plot_dir=None, hint=None):
    tables, missing = compute(recipe, cells, results)
    print(f"{name}: {recipe['title']}")
    print("cells: mean±std over seeds (std: sample standard deviation, ddof=1; one seed: no std); * fewer runs than "
          "planned; missing/-: no value (never 0); paper: the published number; diff: measured - paper")
    if recipe.get("note"):
        print(f"note: {recipe['note']}")
    for spec in recipe["tables"]:
        print()
        print(format_table(spec, tables[spec["name"]]))
    print()
    if missing:
        print(f"missing: {len(missing)} cells lack runs ({hint or f'python reproduce.py {name} --dry-run'} lists "
              "them)")
        for line in missing[:limit]:
            print(f"  {line}")
        if len(missing) > limit:
            print(f"  ... and {len(missing) - limit} more")
    else:
        print("complete: every cell has all its runs")
    if csv_path:
        write_csv(csv_path, name, recipe, tables)
        print(f"wrote {csv_path}")
    if plot_dir:
        for path in write_figures(plot_dir, recipe, tables):
            print(f"wrote {path}")


def write_figures(directory, recipe, tables):
    """Each figure of the recipe as DIRECTORY/<figure name>.svg (figures.py); -> the paths written."""
    published = {t["name"]: {k: published_mean(v) for k, v in t["published"].items()} for t in recipe["tables"]}
    paths = []
    try:
        os.makedirs(directory, exist_ok=True)
        for figure in recipe["figures"]:
            paths.append(os.path.join(directory, f"{figure['name']}.svg"))
            figures.write_svg(paths[-1], figures.render(figure, tables, published))
    except OSError as e:
        raise RecipeError(f"cannot write under {directory} ({e.strerror or e}): choose another --plot folder") from None
    return paths


def write_csv(path, name, recipe, tables):
    """One line per cell, derived ones included: recipe, table, row, column, mean, std, n, published, diff, selected."""
    try:
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["recipe", "table", "row", "column", "mean", "std", "n", "published", "diff", "selected"])
            for spec in recipe["tables"]:
                t = tables[spec["name"]]
                for r in spec["rows"] + list(spec["derived_rows"]):
                    for c in spec["columns"] + list(spec["derived_columns"]):
                        cell, value = t.get((r, c)) or {}, spec["published"].get((r, c))
                        paper_mean = None if value is None else published_mean(value)
                        diff = None if not cell or paper_mean is None else cell["mean"] - paper_mean
                        blank = lambda x: "" if x is None else x
                        out.writerow([name, spec["name"], r, c, *map(blank, [cell.get("mean"), cell.get("std"),
                                      cell.get("n"), paper_mean, diff, cell.get("selected")])])
    except OSError as e:
        raise RecipeError(f"cannot write {path} ({e.strerror or e}): choose another --csv path") from None


# ----------------------------------------------------------------------------------------------------------------------
# Main

def listing():
    print("recipes (python reproduce.py RECIPE --root DATA [--dry-run | --slurm FILE | --report]):\n")
    width = max(map(len, RECIPES)) + 1
    print(f"{'recipe':<{width}}{'runs':>6}{'trained':>9}{'epochs':>10}  title")
    for name, recipe in RECIPES.items():
        jobs, _ = plan_recipe(name, recipe, "DATA", "output")
        trained = [j for j in jobs if j["epochs"]]
        print(f"{name:<{width}}{len(jobs):>6}{len(trained):>9}{sum(j['epochs'] for j in trained):>10,}  "
              f"{recipe['title']}")
    print("\nruns: distinct train.py/variance.py runs (shared cells count once); trained: runs with an epoch budget; "
          "epochs: their sum (a step count needs the datasets' sizes)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help=f"one of: {', '.join(RECIPES)} (none: list them)")
    p.add_argument("--root", help="folder holding the datasets (default $DATA, else DATA), passed to every run")
    p.add_argument("--output-dir", help="passed to every run: runs, logs/ and results.jsonl go here (default output; "
                   "both paths are made absolute, so the commands run from anywhere in the repository)")
    p.add_argument("--gpus", type=int, help="runs at once, each on one GPU (CUDA_VISIBLE_DEVICES=i); default: every "
                   "visible GPU, or one at a time on CPU")
    p.add_argument("--dry-run", action="store_true", help="print the commands still to run (with --resume where a "
                   "checkpoint exists), then their count")
    p.add_argument("--slurm", metavar="FILE", help="write a Slurm array job script: a task per training subset still "
                   "to do (see the Slurm options below)")
    p.add_argument("--report", action="store_true", help="print the recipe's tables from results.jsonl beside the "
                   "published numbers")
    p.add_argument("--list", action="store_true", help="list the recipes with their run and epoch counts")
    p.add_argument("--csv", metavar="FILE", help="with --report: also write one line per cell (recipe, table, row, "
                   "column, mean, std, n, published, diff, selected)")
    p.add_argument("--plot", metavar="DIR", help="with --report: also draw the recipe's figures, one SVG file each "
                   "(few-shot curves, base/new trade-off, variance scatter), in DIR")
    g = p.add_argument_group("the grid (default: the recipe's; a recipe that fixes a setting refuses the option)")
    g.add_argument("--datasets", help="comma-separated dataset names or folder:/path")
    g.add_argument("--shots", help="comma-separated shot counts, e.g. 1,16")
    g.add_argument("--seeds", help="comma-separated seeds, e.g. 1,2,3")
    g.add_argument("--backbone", help="OpenAI model name or checkpoint path (comma-separated for a recipe that "
                   "compares backbones)")
    t = p.add_argument_group("train.py options, given to every run that reads them (e.g. --epochs 1 for a smoke test)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--precision", choices=["amp", "fp32"])
    t.add_argument("--workers", type=int)
    t.add_argument("--compile", action="store_true", default=None)
    s = p.add_argument_group("with --slurm (defaults: a typical GPU cluster's)")
    s.add_argument("--partition", help="#SBATCH --partition (default: the cluster's)")
    s.add_argument("--time", help="#SBATCH --time of one task, e.g. 2-00:00:00 (default: the partition's)")
    s.add_argument("--account", help="#SBATCH --account")
    s.add_argument("--gpus-per-task", type=int, help="GPUs of each task (default 1, as --gres=gpu:1; 0: a CPU job)")
    s.add_argument("--gres", help="#SBATCH --gres instead of --gpus-per-task, e.g. gpu:a100:1")
    s.add_argument("--cpus-per-task", type=int, help="#SBATCH --cpus-per-task (default 8)")
    s.add_argument("--sbatch", help="any other sbatch options, e.g. \"--qos=high --mem=64G\"")
    s.add_argument("--max-array", type=int, help="most tasks in one array (default 1000, for Slurm's default "
                   "MaxArraySize of 1001: indices 0-999); more tasks are submitted in chunks")
    s.add_argument("--throttle", type=int, help="most tasks of an array running at once (--array=...%%N)")
    return p.parse_args(argv)


SLURM = {"partition": None, "time": None, "account": None, "gpus_per_task": 1, "gres": None, "cpus_per_task": 8,
         "sbatch": None, "max_array": 1000, "throttle": None}  # the --slurm options and their defaults


def check_options(args):
    """Options that do not go together, or that nothing reads, are an error naming them."""
    modes = [runs.option(m) for m in ("list", "dry_run", "slurm", "report") if getattr(args, m) not in (None, False)]
    given = [d for d, v in vars(args).items() if d != "recipe" and v not in (None, False)]
    if len(modes) > 1:
        raise RecipeError(f"{modes[0]} and {modes[1]} do not go together: pick one")
    for written in ("csv", "plot"):  # --csv and --plot are written by --report (alone, they imply it)
        if getattr(args, written) is not None and modes and modes[0] != "--report":
            raise RecipeError(f"--{written} and {modes[0]} do not go together: --{written} is written by --report")
    if args.list and args.recipe:
        raise RecipeError(f"--list lists every recipe: drop {args.recipe}, or --list")
    if not args.recipe and [d for d in given if d != "list"]:
        option = runs.option(next(d for d in given if d != "list"))
        raise RecipeError(f"{option} needs a recipe: python reproduce.py RECIPE {option} ... (python reproduce.py "
                          "lists them)")
    if args.gpus is not None and modes:
        raise RecipeError(f"--gpus and {modes[0]} do not go together: --gpus is for running here")
    for dest in SLURM:
        if getattr(args, dest) is not None and not args.slurm:
            raise RecipeError(f"{runs.option(dest)} is read by --slurm only: add --slurm FILE or drop it")
    if args.gres is not None and args.gpus_per_task is not None:
        raise RecipeError("--gres and --gpus-per-task do not go together: pick one")
    for dest, least in [("gpus", 0), ("gpus_per_task", 0), ("cpus_per_task", 1), ("max_array", 1), ("throttle", 1)]:
        if getattr(args, dest) is not None and getattr(args, dest) < least:
            raise RecipeError(f"{runs.option(dest)} must be {least} or more (got {getattr(args, dest)})")
    for dest in ("partition", "time", "account", "gres", "sbatch", "slurm"):
        if "\n" in (getattr(args, dest) or ""):
            raise RecipeError(f"{runs.option(dest)} holds a line break: give it on one line")


def again(args, *mode):
    """This command line for another mode: the recipe, its grid and train.py options, --root and --output-dir."""
    argv = ["python", "reproduce.py", args.recipe]
    for key in [*GRID, *PASSED]:
        value = getattr(args, key)
        argv += [] if value is None else [runs.option(key)] if value is True else [runs.option(key), str(value)]
    return shlex.join([*argv, "--root", args.root, "--output-dir", args.output_dir, *mode])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        check_options(args)
        if not args.recipe or args.list:
            return listing()
        if args.recipe not in RECIPES:
            close = difflib.get_close_matches(args.recipe, RECIPES, n=1)
            raise RecipeError(f"unknown recipe {args.recipe!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; choose from {', '.join(RECIPES)}")
        args.root = os.path.abspath(args.root or os.environ.get("DATA", "DATA"))
        args.output_dir = out = os.path.abspath(args.output_dir or "output")
        recipe = with_options(args.recipe, build(args.recipe, args), args)
        jobs, cells = plan_recipe(args.recipe, recipe, args.root, out)
        results = read_results(out)
        if args.plot and not recipe.get("figures"):
            with_figures = [n for n, r in RECIPES.items() if r.get("figures")]
            raise RecipeError(f"recipe {args.recipe} has no figure (the paper prints it as a table): drop --plot, or "
                              f"use --csv; recipes with figures: {', '.join(with_figures)}")
        if args.report or args.csv or args.plot:
            return report(args.recipe, recipe, cells, results, args.csv, plot_dir=args.plot,
                          hint=again(args, "--dry-run"))
        todo = pending(jobs, results)
        summary = f"{len(todo)} runs to do ({len(jobs) - len(todo)} of {len(jobs)} done)"
        if args.dry_run:
            for job in todo:
                print(shlex.join(command_of(job)))
            print(summary)
            return
        if args.slurm and not todo:
            print(f"nothing to do: all {len(jobs)} runs are done; no script written. Report: "
                  f"{again(args, '--report')}")
            return
        problems = preflight(todo, out)
        if problems:
            print("\n".join(f"error: {problem}" for problem in problems), file=sys.stderr)
            sys.exit(2)
        if args.slurm:
            opts = argparse.Namespace(**{d: default if getattr(args, d) is None else getattr(args, d)
                                         for d, default in SLURM.items()})
            if args.gres:
                opts.gpus_per_task = None
            tasks = tasks_of(todo)
            given = [(runs.option(d), str(getattr(args, d))) for d in SLURM if getattr(args, d) is not None]
            slurm = [x for o, v in given for x in ([f"{o}={v}"] if v.startswith("-") else [o, v])]  # --sbatch=--qos=x
            write_slurm(args.slurm, args.recipe, tasks, out, opts, again(args, "--slurm", args.slurm, *slurm))
            print(f"wrote {args.slurm}: {summary}, in {len(tasks)} array tasks (a task: the runs of one training "
                  "subset, one after another)\nsubmit it with:")
            print("\n".join(f"  {line}" for line in submit_lines(args.slurm, len(tasks), opts.max_array,
                                                                   opts.throttle)))
            print(f"then: {again(args, '--report')}\n(after failures, cancels or time limits, run the same --slurm "
                  "command again: it writes only what is missing, and runs continue from their checkpoints)")
            return
        print(summary)
        failed = run_all(todo, gpu_ids(args.gpus), out)
        left = pending(jobs, read_results(out))
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to do what is missing (trained runs resume from their "
              "checkpoints)", file=sys.stderr)
        sys.exit(130)
    for job, log, line in failed:
        print(f"FAILED {shlex.join(job['command'])}\n  log {log}\n  {line}", file=sys.stderr)
    print(f"{len(jobs) - len(left)} of {len(jobs)} runs done" + (f"; {len(failed)} failed" if failed else "")
          + (f"; run the same command again to retry the {len(left)} missing" if left else "")
          + (f". Report: {again(args, '--report')}" if not left else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
