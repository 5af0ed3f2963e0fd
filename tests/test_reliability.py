"""Nothing lost, nothing silent (issue 11): results do not depend on the worker count, kill -9 + --resume equals the
uninterrupted run, runs never share a folder, typos stop a run before training, corrupt caches are recomputed, files
survive concurrent writers, and every bad input of every entry point is one line (exit 2) that changes nothing.
Nothing silent, nothing wrong (issue 19): bad results lines are skipped with a warning, appends start on a fresh line,
caches follow rewritten images and weights, dead writers' temporary files go, a diverged run says what to do, and the
CLIP API says what it expected."""
import errno
import glob
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
from PIL import Image

import clip_model
import data
import features
import reproduce
import runs
import train
import variance
from conftest import make_tiny_clip, read_rows, save_state_dict, train_argv, write_colour_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs of every entry point: (id, argv builder, expected substring of the one stderr line). A builder takes the
# namespace of the `bad` fixture (c.folder, c.out, c.vit, checkpoints, datasets; c.mp: this case's monkeypatch) and
# returns a command line whose first word names the entry point. Every case must exit 2 with one line and leave every
# file written before (results.jsonl, checkpoints, feature cache and bank, inputs) byte-for-byte unchanged.

BAD_INPUTS = [
    # numbers that mean nothing
    ("epochs 0", lambda c: tr(c, "coop", "--epochs", "0"), "--epochs must be at least 1 (got 0)"),
    ("epochs -3", lambda c: tr(c, "upt", "--epochs", "-3"), "--epochs must be at least 1 (got -3)"),
    ("batch-size 0", lambda c: tr(c, "coop", "--batch-size", "0"), "--batch-size must be at least 1"),
    ("n-ctx 0 coop", lambda c: tr(c, "coop", "--n-ctx", "0"), "--n-ctx must be at least 1 (got 0)"),
    ("n-ctx -2 coop", lambda c: tr(c, "coop", "--n-ctx", "-2"), "--n-ctx must be at least 1 (got -2)"),
    ("n-ctx 0 vpt", lambda c: tr(c, "vpt_shallow", "--n-ctx", "0"), "--n-ctx must be at least 1 (got 0)"),
    ("n-ctx -2 vpt", lambda c: tr(c, "vpt_deep", "--n-ctx", "-2"), "--n-ctx must be at least 1 (got -2)"),
    ("lr 0", lambda c: tr(c, "coop", "--lr", "0"), "--lr must be positive (got 0.0)"),
    ("lr -1", lambda c: tr(c, "upt", "--lr", "-1"), "--lr must be positive (got -1.0)"),
    ("shots 0", lambda c: tr(c, "coop", "--shots", "0"), "--shots must be at least 1 (got 0)"),
    ("seed 2**64", lambda c: tr(c, "coop", "--seed", "18446744073709551616"),
     "--seed must be between 0 and 4294967295 (got 18446744073709551616)"),
    ("seed -1", lambda c: tr(c, "upt", "--seed", "-1"), "--seed must be between 0 and 4294967295 (got -1)"),
    ("depth 0", lambda c: tr(c, "upt", "--depth", "0"), "--depth must be at least 1"),
    ("random-length 0", lambda c: tr(c, "zeroshot", "--prompt", "randtoken", "--random-length", "0"),
     "--random-length must be at least 1"),
    ("workers -1", lambda c: tr(c, "coop", "--workers", "-1"), "--workers must be 0 or more"),
    ("more shots than images", lambda c: tr(c, "coop", "--shots", "50"), "use --shots 6 or fewer"),
    # options the method does not use
    ("csc with zeroshot", lambda c: tr(c, "zeroshot", "--csc"), "--csc is not used by zeroshot"),
    ("released-code with coop", lambda c: tr(c, "coop", "--released-code"), "--released-code is not used by coop"),
    ("depth with vpt_shallow", lambda c: tr(c, "vpt_shallow", "--depth", "2"), "--depth is not used by vpt_shallow"),
    ("prompt with upt", lambda c: tr(c, "upt", "--prompt", "basic"), "--prompt is not used by upt"),
    ("ctx-init with vpt_deep", lambda c: tr(c, "vpt_deep", "--ctx-init", "a photo of a"),
     "--ctx-init is not used by vpt_deep"),
    ("template with coop", lambda c: tr(c, "coop", "--template", "a {}."), "--template is not used by coop"),
    ("random-length with prompt basic", lambda c: tr(c, "zeroshot", "--prompt", "basic", "--random-length", "8"),
     "--random-length is read by --prompt randtoken or randembed only"),
    ("no-feature-bank with upt", lambda c: tr(c, "upt", "--no-feature-bank"), "--no-feature-bank is not used by upt"),
    ("csc with cocoop", lambda c: tr(c, "cocoop", "--csc"), "--csc is not used by cocoop"),
    ("class-token-position with upt", lambda c: tr(c, "upt", "--class-token-position", "front"),
     "--class-token-position is not used by upt"),
    ("epochs with linear_probe", lambda c: tr(c, "linear_probe", "--epochs", "5"),
     "--epochs is not used by linear_probe"),
    ("shots with zeroshot", lambda c: tr(c, "zeroshot", "--shots", "4"), "--shots is not used by zeroshot"),
    ("lr with zeroshot", lambda c: tr(c, "zeroshot", "--lr", "0.1"), "--lr is not used by zeroshot"),
    ("prompt and template", lambda c: tr(c, "zeroshot", "--prompt", "basic", "--template", "a {}."), "pass one"),
    ("template without {}", lambda c: tr(c, "vpt_shallow", "--template", "a photo"), "must hold {} once"),
    ("template with {} twice", lambda c: tr(c, "zeroshot", "--template", "{} and {}"), "must hold {} once"),
    # unknown names
    ("unknown method", lambda c: tr(c, "copo"), "unknown method 'copo' (did you mean 'coop'?)"),
    ("unknown dataset", lambda c: tr(c, "coop", dataset="dtdd"), "unknown dataset 'dtdd' (did you mean 'dtd'?)"),
    ("unknown prompt", lambda c: tr(c, "zeroshot", "--prompt", "basik"), "unknown --prompt 'basik'"),
    ("unknown backbone", lambda c: tr(c, "coop", backbone="ViT-X/99"), "unknown --backbone 'ViT-X/99'"),
    ("unknown class-token-position", lambda c: tr(c, "coop", "--class-token-position", "top"),
     "--class-token-position must be one of"),
    ("misspelt eval-datasets", lambda c: tr(c, "coop", *SMALL, "--lr", "0.3", "--eval-datasets", "dtdd"),
     "unknown dataset 'dtdd'"),
    ("eval-datasets folder missing", lambda c: tr(c, "coop", *SMALL, "--lr", "0.3", "--eval-datasets",
                                                  f"folder:{c.data}/nowhere"), "needs train/<class>/ and test/"),
    ("dataset not downloaded", lambda c: tr(c, "coop", "--root", c.data, dataset="eurosat"), "2750 not found"),
    # --eval-only, --resume and checkpoints
    ("resume zeroshot", lambda c: tr(c, "zeroshot", "--resume"), "zeroshot has no epochs to resume"),
    ("resume linear_probe", lambda c: tr(c, "linear_probe", "--resume"), "linear_probe has no epochs to resume"),
    ("checkpoint without eval-only", lambda c: tr(c, "coop", "--checkpoint", c.coop), "read by --eval-only only"),
    ("eval-only without checkpoint", lambda c: tr(c, "coop", "--eval-only"), "--eval-only needs --checkpoint"),
    ("eval-only and resume", lambda c: ev(c, "coop", c.coop, "--resume"), "exclude each other"),
    ("eval-only zeroshot", lambda c: ev(c, "zeroshot", c.coop), "zeroshot never trains"),
    ("eval-only with shots", lambda c: ev(c, "coop", c.coop, "--shots", "4"), "--shots comes from the checkpoint"),
    ("eval-only other method", lambda c: ev(c, "upt", c.coop), "trained with --method coop, not upt"),
    ("eval-only other backbone", lambda c: ev(c, "coop", c.coop, "--backbone", c.rn), "drop --backbone"),
    ("eval-only checkpoint missing", lambda c: ev(c, "coop", c.inputs + "/none.pt"), "none.pt not found"),
    ("eval-only garbage checkpoint", lambda c: ev(c, "coop", c.inputs + "/garbage.pt"), "is unreadable"),
    ("eval-only NaN checkpoint", lambda c: ev(c, "coop", c.inputs + "/nan.pt"), "ctx is not a finite tensor"),
    ("eval-only CLIP state dict", lambda c: ev(c, "coop", c.rn), "it holds CLIP weights"),
    ("eval-only list", lambda c: ev(c, "coop", c.inputs + "/list.pt"), "it holds a list"),
    ("eval-only without model", lambda c: ev(c, "coop", c.inputs + "/no_model.pt"), "not a train.py checkpoint"),
    ("eval-only without args", lambda c: ev(c, "coop", c.inputs + "/no_args.pt"), "not a train.py checkpoint"),
    ("eval-only wrong shape", lambda c: ev(c, "coop", c.inputs + "/wrong_shape.pt"),
     "does not fit this model: ctx is (15, 64) there and (16, 64) here"),
    ("resume nothing", lambda c: tr(c, "coop", *SMALL, "--lr", "0.3", "--resume"), "--resume: no checkpoint"),
    ("resume changed lr", lambda c: tr(c, "upt", *SMALL, "--lr", "0.3", "--resume"), "differs in --lr"),
    ("resume wrong shape", lambda c: tr(c, "coop", *SMALL, "--lr", "0.05", "--resume"),
     "does not fit this model: ctx is (15, 64) there"),
    # prompts over CLIP's 77 tokens: name the option or the class, never truncate=True
    ("n-ctx too long", lambda c: tr(c, "coop", *SMALL, "--lr", "0.3", "--n-ctx", "80"), "use a smaller --n-ctx"),
    ("ctx-init too long", lambda c: tr(c, "coop", "--ctx-init", "a photo " * 40),
     "--ctx-init is 82 tokens, over CLIP's 77"),
    ("class name too long", lambda c: tr(c, "coop", *SMALL, dataset=c.long_name), "shorten the class name 'x x x"),
    ("template too long", lambda c: tr(c, "zeroshot", "--template", "a photo " * 40 + "{}"),
     "use a smaller --template"),
    # folder: datasets
    ("folder missing", lambda c: tr(c, "coop", dataset=f"folder:{c.data}/nowhere"), "needs train/<class>/"),
    ("folder empty last class", lambda c: tr(c, "coop", *SMALL, dataset=c.empty_last), "zz_empty holds no images"),
    ("folder class without training images", lambda c: tr(c, "coop", *SMALL, dataset=c.test_only_class),
     "orange is a class missing from"),
    ("folder one class", lambda c: tr(c, "coop", *SMALL, dataset=c.one_class), "needs at least 2 classes"),
    ("folder empty test split", lambda c: tr(c, "coop", *SMALL, dataset=c.empty_test), "the test split is empty"),
    ("folder without test", lambda c: tr(c, "coop", *SMALL, dataset=c.no_test), "needs train/<class>/ and test/"),
    ("decompression bomb", lambda c: bomb(c), ".png: Image size (1536 pixels) exceeds limit"),
    ("unreadable test image", lambda c: tr(c, "zeroshot", dataset=c.bad_image), "cannot read image"),
    # CoOp's split files and raw layouts
    ("split not JSON", lambda c: tr(c, "coop", "--root", c.dtd["not_json"], dataset="dtd"),
     "split_zhou_DescribableTextures.json is not valid JSON"),
    ("split a list", lambda c: tr(c, "coop", "--root", c.dtd["a_list"], dataset="dtd"), "holds a JSON list"),
    ("split without test", lambda c: tr(c, "coop", "--root", c.dtd["no_test"], dataset="dtd"),
     "split_zhou_DescribableTextures.json has no \"test\" list"),
    ("split bad entry", lambda c: tr(c, "coop", "--root", c.dtd["bad_entry"], dataset="dtd"),
     "split_zhou_DescribableTextures.json: \"train\"[1] is"),
    ("test image missing", lambda c: tr(c, "coop", *SMALL, "--shots", "2", "--root", c.dtd["missing_test"],
                                        dataset="dtd"), "1 of the 4 test images are missing"),
    ("few-shot image missing", lambda c: tr(c, "coop", *SMALL, "--shots", "2", "--root", c.dtd["missing_train"],
                                            dataset="dtd"), "1 of the 4 train images are missing"),
    ("aircraft unknown variant", lambda c: tr(c, "coop", "--root", c.aircraft, dataset="fgvc_aircraft"),
     "has variant 'B747', not in"),
    # where results go
    ("output-dir is a file", lambda c: tr(c, "zeroshot", out=c.inputs + "/a_file"), "cannot write under"),
    ("output-dir under a file", lambda c: tr(c, "zeroshot", out=c.inputs + "/a_file/out"), "cannot write under"),
    ("output-dir not writable", lambda c: not_writable(c), "(Permission denied): choose another --output-dir"),
    ("results.jsonl a folder", lambda c: tr(c, "zeroshot", out=c.inputs + "/jsonl_is_dir"),
     "/in/jsonl_is_dir/results.jsonl (Is a directory): make it a writable file or choose another --output-dir"),
    ("results.jsonl immutable", lambda c: immutable_results(c),
     "/in/immutable/results.jsonl (Operation not permitted): make it a writable file or choose another"),
    ("a file in the way under output-dir", lambda c: tr(c, "coop", *SMALL, out=c.inputs + "/dataset_is_file"),
     "/dataset_is_file/folder_tiny_folder0/coop (Not a directory): choose another --output-dir"),
    ("disk full", lambda c: disk_full(c, OSError(errno.ENOSPC, "No space left on device")),
     "checkpoint.pt (No space left on device): free disk space"),
    ("disk full in torch.save", lambda c: disk_full(c, RuntimeError("PytorchStreamWriter failed writing file "
                                                                    "data/0: file write failed")),
     "(PytorchStreamWriter failed writing file data/0: file write failed): free disk space"),
    # data.py
    ("data n-px 0", lambda c: ["data.py", "--dataset", c.folder, "--n-px", "0"], "--n-px must be a positive"),
    ("data n-px -1", lambda c: ["data.py", "--dataset", c.folder, "--n-px", "-1"], "--n-px must be a positive"),
    ("data unknown dataset", lambda c: ["data.py", "--dataset", "imagenet_v2"], "unknown dataset 'imagenet_v2'"),
    ("data shots -1", lambda c: ["data.py", "--dataset", c.folder, "--shots", "-1"], "shots must be >= 1"),
    ("data subsample", lambda c: ["data.py", "--dataset", c.folder, "--subsample", "old"], "subsample must be all"),
    ("data split not JSON", lambda c: ["data.py", "--dataset", "dtd", "--root", c.dtd["not_json"]], "not valid JSON"),
    ("data one class", lambda c: ["data.py", "--dataset", c.one_class], "needs at least 2 classes"),
    ("data test image missing", lambda c: ["data.py", "--dataset", "dtd", "--root", c.dtd["missing_test"]],
     "test images are missing"),
    ("data aircraft unknown variant", lambda c: ["data.py", "--dataset", "fgvc_aircraft", "--root", c.aircraft],
     "has variant 'B747'"),
    # variance.py
    ("variance empty split", lambda c: va(c, c.folder, "--split", "val"), "val split is empty"),
    ("variance malformed split", lambda c: va(c, "dtd", "--root", c.dtd["bad_entry"]), "\"train\"[1] is"),
    ("variance incomplete split", lambda c: va(c, "dtd", "--root", c.dtd["no_test"]), "has no \"test\" list"),
    ("variance unknown dataset", lambda c: va(c, "eurosatt"), "unknown dataset 'eurosatt'"),
    ("variance one class", lambda c: va(c, c.one_class), "needs at least 2 classes"),
    ("variance unknown backbone", lambda c: va(c, c.folder, "--backbone", "ViT-X/99"), "ViT-X/99"),
]

SMALL = ["--shots", "4", "--epochs", "2", "--batch-size", "4"]


def tr(c, method, *options, dataset=None, backbone=None, out=None):
    """train.py with the fixture's tiny CLIP, folder and output dir unless told otherwise."""
    return ["train.py", "--method", method, "--dataset", dataset or c.folder, "--backbone", backbone or c.vit,
            "--output-dir", out or c.out, "--workers", "0", *options]


def ev(c, method, checkpoint, *options):
    return ["train.py", "--method", method, "--dataset", c.folder, "--output-dir", c.out, "--workers", "0",
            "--eval-only", "--checkpoint", checkpoint, *options]


def va(c, dataset, *options):
    return ["variance.py", "--dataset", dataset, "--backbone", c.vit, "--output-dir", c.out, "--workers", "0",
            *options]


def bomb(c):
    c.mp.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 48 x 32 training images are now decompression bombs
    return tr(c, "upt", *SMALL, "--lr", "0.3")


def not_writable(c):
    makedirs = os.makedirs

    def refuse(path, *args, **kwargs):
        if "read_only" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return makedirs(path, *args, **kwargs)
    c.mp.setattr(os, "makedirs", refuse)
    return tr(c, "zeroshot", out=c.inputs + "/read_only")


def immutable_results(c):
    """results.jsonl with chattr +i (open for appending fails with EPERM, even for root)."""
    def refuse(path, *args, **kwargs):
        if str(path).endswith(os.path.join("immutable", "results.jsonl")):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        return open(path, *args, **kwargs)
    c.mp.setattr(runs, "open", refuse, raising=False)
    return tr(c, "zeroshot", out=c.inputs + "/immutable")


def disk_full(c, error):
    """torch.save writes part of the file, then fails as on a full disk."""
    c.mp.setattr(torch, "save", partial_write(error))
    return tr(c, "coop", *SMALL, "--lr", "0.3")


def partial_write(error):
    def save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise error
    return save


def call(argv, monkeypatch):
    script, *args = argv
    if script == "train.py":
        train.main(args)
    elif script == "variance.py":
        variance.main(args)
    else:
        monkeypatch.setattr(sys, "argv", argv)
        data.main()


def snapshot(root):
    """sha256 of every file under root except lock files (which a failed run may create, empty)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f != "lock" and not f.endswith(".lock"):
                with open(os.path.join(d, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def find(root, name):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f == name)


def run(method, dataset, backbone, out, **options):
    return train.run(train.parse_args(train_argv(method, dataset, backbone, out, **options)))


def one_line_error(capsys, argv, monkeypatch=None):
    """Run an entry point in-process; -> its stderr, after checking: exit 2, one short 'error: ' line, no Traceback."""
    with pytest.raises(SystemExit) as exit_info:
        call(argv, monkeypatch)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and "truncate=True" not in err, err
    short = re.sub(r"/\S*?/pytest-\d+/[^/\s']+", "/tmp/dir", err)  # the message, not pytest's long folder names
    assert len(err.strip().splitlines()) == 1 and len(short) < 300, err
    return err


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: inputs for the bad cases, written once

def write_dtd(root, mutate=None):
    """dtd in CoOp's layout with a split file: 2 classes, 4 train / 2 val / 2 test images each; mutate(split) -> the
    split file's text instead of the split as it is; -> root."""
    split = {s: [[f"{c}/{s}_{i}.jpg", y, c] for y, c in enumerate(["banded", "blotchy"]) for i in range(n)]
             for s, n in (("train", 4), ("val", 2), ("test", 2))}
    for s in split.values():
        for p, y, _ in s:
            os.makedirs(os.path.join(root, "dtd", "images", os.path.dirname(p)), exist_ok=True)
            Image.new("RGB", (8, 8), (200 * y, 50, 100)).save(os.path.join(root, "dtd", "images", p))
    text = json.dumps(split)
    if mutate:
        text = mutate(split)
    with open(os.path.join(root, "dtd", "split_zhou_DescribableTextures.json"), "w") as f:
        f.write(text)
    return root


def without(root, path):
    os.remove(os.path.join(root, "dtd", "images", path))
    return root


@pytest.fixture(scope="module")
def bad(tmp_path_factory, folder, vit_checkpoint, rn_checkpoint):
    """One good coop and one good upt run in c.out, then every input the bad cases read."""
    base = str(tmp_path_factory.mktemp("bad"))
    c = types.SimpleNamespace(base=base, out=f"{base}/out", inputs=f"{base}/in", data=f"{base}/data", folder=folder,
                              vit=vit_checkpoint, rn=rn_checkpoint)
    run("coop", folder, vit_checkpoint, c.out)
    run("upt", folder, vit_checkpoint, c.out)
    [c.coop] = [path for path in find(c.out, "checkpoint.pt") if f"{os.sep}coop{os.sep}" in path]
    os.makedirs(c.inputs)
    state = torch.load(c.coop, weights_only=True)
    assert state["model"]["ctx"].shape == (16, 64)
    torch.save({**state, "model": {"ctx": torch.full((16, 64), float("nan"))}}, f"{c.inputs}/nan.pt")
    torch.save([1, 2, 3], f"{c.inputs}/list.pt")
    torch.save({k: v for k, v in state.items() if k != "model"}, f"{c.inputs}/no_model.pt")
    torch.save({k: v for k, v in state.items() if k != "args"}, f"{c.inputs}/no_args.pt")
    torch.save({**state, "model": {"ctx": state["model"]["ctx"][:15]}}, f"{c.inputs}/wrong_shape.pt")
    with open(f"{c.inputs}/garbage.pt", "wb") as f:
        f.write(b"\x00garbage" * 100)
    open(f"{c.inputs}/a_file", "w").close()
    os.makedirs(f"{c.inputs}/jsonl_is_dir/results.jsonl")
    os.makedirs(f"{c.inputs}/immutable")
    shutil.copy(f"{c.out}/results.jsonl", f"{c.inputs}/immutable/results.jsonl")
    os.makedirs(f"{c.inputs}/dataset_is_file")
    in_the_way = train.plan(train_argv("coop", folder, vit_checkpoint, f"{c.inputs}/dataset_is_file"))["run_dir"]
    open(os.path.join(f"{c.inputs}/dataset_is_file", os.path.relpath(in_the_way, f"{c.inputs}/dataset_is_file")
                      .split(os.sep)[0]), "w").close()  # OUT/folder_tiny_folder0 is a file
    # --resume into a run folder whose checkpoint has this run's settings but a ctx of another shape
    directory = train.plan(train_argv("coop", folder, vit_checkpoint, c.out, lr=0.05))["run_dir"]
    os.makedirs(directory)
    torch.save({**state, "model": {"ctx": state["model"]["ctx"][:15]}, "args": {**state["args"], "lr": 0.05}},
               os.path.join(directory, "checkpoint.pt"))
    two = {"red": (220, 30, 30), "blue": (40, 60, 230)}
    c.long_name = write_colour_folder(f"{c.data}/long_name", colours={"x_" * 60: (9, 9, 9), **two}, size=(8, 8))
    c.empty_last = write_colour_folder(f"{c.data}/empty_last", colours=two, size=(8, 8))
    os.makedirs(f"{c.data}/empty_last/train/zz_empty")
    c.test_only_class = write_colour_folder(f"{c.data}/test_only", colours=two, size=(8, 8))
    write_colour_folder(f"{c.data}/test_only", counts=(("test", 2),), colours={"orange": (250, 150, 0)}, size=(8, 8))
    c.one_class = write_colour_folder(f"{c.data}/one_class", colours={"red": (220, 30, 30)}, size=(8, 8))
    c.empty_test = write_colour_folder(f"{c.data}/empty_test", counts=(("train", 6), ("test", 0)), colours=two,
                                       size=(8, 8))
    c.no_test = write_colour_folder(f"{c.data}/no_test", counts=(("train", 6),), colours=two, size=(8, 8))
    c.bad_image = write_colour_folder(f"{c.data}/bad_image", colours=two, size=(8, 8))
    with open(f"{c.data}/bad_image/test/red/0.png", "wb") as f:
        f.write(b"not a png")
    sampled = data.load_dataset("dtd", write_dtd(f"{c.data}/dtd_sampled"), shots=2, seed=1, log=lambda m: None).train
    c.dtd = {"not_json": write_dtd(f"{c.data}/dtd_not_json", lambda s: "{\"train\": [[\"banded/train_0.jpg\", 0,"),
             "a_list": write_dtd(f"{c.data}/dtd_a_list", lambda s: json.dumps(s["train"])),
             "no_test": write_dtd(f"{c.data}/dtd_no_test", lambda s: json.dumps({**s, "test": None})),
             "bad_entry": write_dtd(f"{c.data}/dtd_bad_entry", lambda s: json.dumps(
                 {**s, "train": [s["train"][0], ["banded/train_1.jpg", "0", "banded"], *s["train"][2:]]})),
             "missing_test": without(write_dtd(f"{c.data}/dtd_missing_test"), "blotchy/test_1.jpg"),
             "missing_train": without(write_dtd(f"{c.data}/dtd_missing_train"),
                                      os.path.relpath(sampled[-1][0], f"{c.data}/dtd_sampled/dtd/images"))}
    c.aircraft = f"{c.data}/aircraft"
    os.makedirs(f"{c.aircraft}/fgvc_aircraft/images")
    for name, lines in [("variants", ["707-320", "A300B4"]), ("images_variant_train", ["0001 707-320", "0002 B747"]),
                        ("images_variant_val", ["0003 A300B4"]), ("images_variant_test", ["0004 A300B4"])]:
        with open(f"{c.aircraft}/fgvc_aircraft/{name}.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    return c


def test_the_bad_input_table_covers_the_issue():
    assert len(BAD_INPUTS) >= 60 and len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("name, argv_of, expected", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(name, argv_of, expected, bad, capsys, monkeypatch):
    before = snapshot(bad.base)
    assert sum(f.endswith("checkpoint.pt") for f in before) >= 3 and "out/results.jsonl" in before
    assert any(f.startswith("out/feature_cache/") for f in before) and any("feature_bank" in f for f in before)
    argv = argv_of(types.SimpleNamespace(**vars(bad), mp=monkeypatch))
    err = one_line_error(capsys, argv, monkeypatch)
    assert expected in err, err
    monkeypatch.undo()
    assert snapshot(bad.base) == before


# ----------------------------------------------------------------------------------------------------------------------
# Results do not depend on the worker count; kill -9 + --resume equals the uninterrupted run

def assert_same_checkpoint(a, b):
    """Every tensor (trainable parameters, optimizer momentum) equal, and the same epoch, settings and classes."""
    def same(x, y, where):
        if torch.is_tensor(x):
            assert torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert isinstance(y, dict) and x.keys() == y.keys(), where
            for key in x:
                same(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where
    assert a["optimizer"]["state"], "no optimizer state: nothing was trained"
    for key in ("model", "optimizer", "scaler", "epoch", "classnames", "run_id"):
        same(a[key], b[key], key)
    assert runs.settings_of(a["args"]) == runs.settings_of(b["args"])


def checkpoint_in(out):
    [path] = find(out, "checkpoint.pt")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("method, options", [("upt", {}), ("coop", {"no_feature_bank": True})])
def test_the_worker_count_does_not_change_the_result(method, options, folder, vit_checkpoint, tmp_path):
    """upt has dropout; coop without the feature bank augments images in the loader: shuffle, augmentation and dropout
    are functions of (seed, epoch, index), so 0, 1 or 2 workers give the same checkpoint, tensor for tensor."""
    results = {w: run(method, folder, vit_checkpoint, tmp_path / f"w{w}", workers=w, epochs=3, **options)
               for w in (0, 1, 2)}
    assert results[0][0]["train_from"] == "images"
    reference = checkpoint_in(tmp_path / "w0")
    for w in (1, 2):
        assert_same_checkpoint(checkpoint_in(tmp_path / f"w{w}"), reference)
        assert results[w][0]["accuracy"] == results[0][0]["accuracy"]
        assert results[w][0]["macro_f1"] == results[0][0]["macro_f1"]


EPOCH_LINE = re.compile(r"epoch \d+/\d+ \|")


def launch(argv):
    """`python train.py ARGV`, unbuffered, on one thread (two at once fit two cores without oversubscription)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def killed_and_resumed(argv, rng, span, kills):
    """Start `python train.py ARGV`; `kills` times: kill -9 a random delay (up to `span` s) after the launch's first
    epoch line, then start it again with --resume (without, if the kill came before the first checkpoint); finally
    let a --resume run to the end. -> [return code of each killed launch] (-9: killed while running)."""
    codes, resume = [], []
    while True:
        process = launch(argv + resume)
        if len(codes) < kills:
            line = next((line for line in process.stdout if EPOCH_LINE.match(line)), None)
            if line is not None:  # still running: kill it; its orphaned loader workers may keep the pipes open
                time.sleep(rng.uniform(0, span))
                process.kill()
                codes.append(process.wait())
                process.stdout.close()
                process.stderr.close()
                resume = ["--resume"]
                continue
        out, err = process.communicate(timeout=120)
        if process.returncode == 2 and "--resume: no checkpoint" in err:
            resume = []  # killed before its first checkpoint
            continue
        assert process.returncode == 0, err
        if len(codes) >= kills:
            return codes
        codes.append(0)  # it ended before the kill: what follows resumes a finished run


def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(vit_checkpoint, tmp_path):
    dataset = write_colour_folder(str(tmp_path / "data"), counts=(("train", 16), ("test", 2)), size=(16, 16))
    argv = {w: train_argv("upt", dataset, vit_checkpoint, tmp_path / f"killed{w}", shots=16, epochs=6)
            + ["--workers", str(w)] for w in (0, 2)}
    reference, span, threads = {}, {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes: the same kernels, the same sums
    try:
        for w in (0, 2):
            whole = train.run(train.parse_args(train_argv("upt", dataset, vit_checkpoint, tmp_path / f"whole{w}",
                                                          shots=16, epochs=6) + ["--workers", str(w)]))
            reference[w] = whole[0]["accuracy"], checkpoint_in(tmp_path / f"whole{w}")
            span[w] = max(whole[0]["train_seconds"], 0.1)  # 6 epochs: a kill within that after epoch 1 lands mid-run
    finally:
        torch.set_num_threads(threads)
    codes, failures = {}, []

    def chain(w):
        try:
            codes[w] = killed_and_resumed(argv[w], random.Random(w), span[w], kills=2)
        except BaseException as e:
            failures.append(e)
    threads = [threading.Thread(target=chain, args=(w,)) for w in (0, 2)]  # both chains at once: half the time
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    for w in (0, 2):
        assert -signal.SIGKILL in codes[w], codes  # at least one kill landed while it ran
        with open(tmp_path / f"killed{w}" / "results.jsonl") as f:
            last = json.loads(f.readlines()[-1])
        accuracy, state = reference[w]
        assert last["accuracy"] == accuracy and state["epoch"] == 6
        assert_same_checkpoint(checkpoint_in(tmp_path / f"killed{w}"), state)
    assert_same_checkpoint(reference[0][1], reference[2][1])


# ----------------------------------------------------------------------------------------------------------------------
# Results are never lost nor overwritten


def test_resuming_a_finished_run_evaluates_it_and_writes_a_lost_row_again(folder, vit_checkpoint, tmp_path):
    first = run("upt", folder, vit_checkpoint, tmp_path)
    [path] = find(tmp_path, "checkpoint.pt")
    with open(path, "rb") as f:
        saved = f.read()
    again = run("upt", folder, vit_checkpoint, tmp_path, resume=True)  # was: UnboundLocalError: accuracy
    assert again[0]["accuracy"] == first[0]["accuracy"] and again[0]["run_id"] == first[0]["run_id"]
    assert [r["accuracy"] for r in read_rows(tmp_path)] == [first[0]["accuracy"]] * 2
    os.remove(tmp_path / "results.jsonl")  # as if killed after the last checkpoint, before the row
    run("upt", folder, vit_checkpoint, tmp_path, resume=True)
    assert [(r["run_id"], r["accuracy"]) for r in read_rows(tmp_path)] == [(first[0]["run_id"], first[0]["accuracy"])]
    with open(path, "rb") as f:
        assert f.read() == saved  # nothing trained again


def test_runs_never_share_a_folder_nor_resume_across_settings(folder, vit_checkpoint, tmp_path, capsys):
    variants = [("coop", {}), ("coop", {"lr": 0.002}), ("coop", {"n_ctx": 2}), ("coop", {"csc": True}),
                ("upt", {}), ("upt", {"released_code": True})]
    rows = [run(method, folder, vit_checkpoint, tmp_path, **options)[0] for method, options in variants]
    zeroshot = [run("zeroshot", folder, vit_checkpoint, tmp_path, prompt=p)[0] for p in ("basic", "negative")]
    assert len({r["run_id"] for r in rows + zeroshot}) == len(variants) + 2
    checkpoints = find(tmp_path, "checkpoint.pt")
    assert len(checkpoints) == len(variants)
    for row in rows:  # each run's checkpoint is in its own folder and holds its own settings
        [path] = [c for c in checkpoints if os.path.basename(os.path.dirname(c)) == row["run_id"]]
        assert runs.settings_of(torch.load(path, weights_only=True)["args"]) == {k: row[k] for k in runs.IDENTITY}
    before = snapshot(tmp_path)
    err = one_line_error(capsys, ["train.py", *train_argv("coop", folder, vit_checkpoint, tmp_path, lr=0.05,
                                                          resume=True)])
    assert "--resume: no checkpoint with these settings" in err and "differs in --lr" in err
    one_line_error(capsys, ["train.py", *train_argv("coop", folder, vit_checkpoint, tmp_path, n_ctx=3, resume=True)])
    assert snapshot(tmp_path) == before


def test_folder_datasets_whose_paths_flatten_alike_keep_their_own_runs(vit_checkpoint, tmp_path, capsys):
    """a/b and a_b (and another .../b) were all one folder: a run on one resumed or overwrote the others."""
    make = lambda path: write_colour_folder(str(tmp_path / path), counts=(("train", 3), ("test", 1)), size=(8, 8))
    a_slash_b, a_underscore_b, other_b = make("a/b"), make("a_b"), make("c/b")
    out = tmp_path / "out"
    rows = [run("coop", d, vit_checkpoint, out, shots=2)[0] for d in (a_slash_b, a_underscore_b)]
    assert rows[0]["run_id"] != rows[1]["run_id"] and len(find(out, "checkpoint.pt")) == 2
    assert [r["dataset"] for r in read_rows(out)] == [a_slash_b, a_underscore_b]
    err = one_line_error(capsys, ["train.py", *train_argv("coop", other_b, vit_checkpoint, out, shots=2, resume=True)])
    assert "--resume: no checkpoint" in err and len(find(out, "checkpoint.pt")) == 2


TYPOS = [("misspelt eval dataset", lambda c: tr(c, "coop", *SMALL, "--eval-datasets", "dtd,eurosatt", "--root",
                                                c.dtd["missing_train"]), "unknown dataset 'eurosatt'"),
         ("test image listed but absent", lambda c: tr(c, "upt", *SMALL, "--shots", "2", "--root",
                                                      c.dtd["missing_test"], dataset="dtd"), "test images are missing"),
         ("few-shot image absent", lambda c: tr(c, "coop", *SMALL, "--shots", "2", "--root", c.dtd["missing_train"],
                                               dataset="dtd"), "train images are missing")]


@pytest.mark.parametrize("name, argv_of, expected", TYPOS, ids=[t[0] for t in TYPOS])
def test_typos_stop_a_run_before_training(name, argv_of, expected, bad, tmp_path, capsys):
    argv = argv_of(types.SimpleNamespace(**{**vars(bad), "out": str(tmp_path)}))
    assert expected in one_line_error(capsys, argv)
    assert find(tmp_path, "checkpoint.pt") == [] and not glob.glob(str(tmp_path / "**" / "epoch*.pt"), recursive=True)


def damage(path, how):
    if how == "garbage":
        with open(path, "wb") as f:
            f.write(b"\x00\xffgarbage")
    elif how == "truncated":
        with open(path, "rb") as f:
            content = f.read()
        with open(path, "wb") as f:
            f.write(content[:len(content) // 2])
    else:  # valid files with other values (checksum kept) or another shape (checksum fits)
        stored = torch.load(path, weights_only=True)
        changed = stored["features"].clone()
        if how == "altered":
            changed[0, 0] += 1
        else:
            changed = changed[1:]
            stored["sha256"] = features.tensor_sha256(changed)
        torch.save({**stored, "features": changed}, path)


@pytest.mark.parametrize("how", ["garbage", "truncated", "altered", "other shape"])
def test_a_corrupt_feature_cache_or_bank_is_recomputed_with_a_warning(how, folder, vit_checkpoint, tmp_path, capsys):
    first = run("coop", folder, vit_checkpoint, tmp_path)
    [cached] = glob.glob(str(tmp_path / "feature_cache" / "*.pt"))
    [banked] = glob.glob(str(tmp_path / "feature_bank" / "*" / "epoch0001.pt"))
    trained, good = checkpoint_in(tmp_path), {p: torch.load(p, weights_only=True) for p in (cached, banked)}
    for path in (cached, banked):
        damage(path, how)
    capsys.readouterr()
    again = run("coop", folder, vit_checkpoint, tmp_path)
    out = capsys.readouterr().out
    for path in (cached, banked):
        assert f"warning: {path} is corrupt or stale: computing it again" in out
        assert torch.equal(torch.load(path, weights_only=True)["features"], good[path]["features"])  # rewritten
    assert again[0]["accuracy"] == first[0]["accuracy"]
    assert_same_checkpoint(checkpoint_in(tmp_path), trained)
    run("coop", folder, vit_checkpoint, tmp_path)
    assert "warning" not in capsys.readouterr().out  # intact again


# ----------------------------------------------------------------------------------------------------------------------
# Concurrent writers

def save_many(path, n):
    for i in range(n):
        runs.save_atomic({"pid": os.getpid(), "i": i, "x": torch.arange(1000.0)}, path)


def append_many(path, n):
    for i in range(n):
        runs.append_rows(path, [{"pid": os.getpid(), "i": i, "pad": "x" * 20000}])


def start_all(target, args, n=8):
    fork = multiprocessing.get_context("fork")
    processes = [fork.Process(target=target, args=args) for _ in range(n)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    return processes


def test_concurrent_checkpoint_writes_never_fail_nor_leave_temporary_files(tmp_path):
    path = str(tmp_path / "run" / "checkpoint.pt")
    processes = start_all(save_many, (path, 30))
    assert [p.exitcode for p in processes] == [0] * 8
    assert os.listdir(tmp_path / "run") == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True)["i"] == 29


def test_concurrent_appends_keep_every_row_whole(tmp_path):
    path = str(tmp_path / "results.jsonl")
    processes = start_all(append_many, (path, 25))
    assert [p.exitcode for p in processes] == [0] * 8
    with open(path) as f:
        rows = [json.loads(line) for line in f]  # each line whole
    assert sorted((r["pid"], r["i"]) for r in rows) == sorted((p.pid, i) for p in processes for i in range(25))


def hold_lock(path, held, release):
    with runs.locked(path):
        held.set()
        release.wait(60)


def test_a_second_run_of_the_same_settings_says_one_is_running(folder, vit_checkpoint, tmp_path, capsys):
    argv = train_argv("upt", folder, vit_checkpoint, tmp_path)
    fork = multiprocessing.get_context("fork")
    held, release = fork.Event(), fork.Event()
    holder = fork.Process(target=hold_lock, args=(os.path.join(train.plan(argv)["run_dir"], "lock"), held, release))
    holder.start()
    try:
        assert held.wait(60)
        err = one_line_error(capsys, ["train.py", *argv])
        assert "a run with these settings is already running in" in err
        assert find(tmp_path, "checkpoint.pt") == []
    finally:
        release.set()
        holder.join(60)
    assert run("upt", folder, vit_checkpoint, tmp_path)[0]["accuracy"] >= 0  # the lock went with its holder


def hold_lock_and_fork(path, held, child):
    with runs.locked(path):
        pid = os.fork()  # as a DataLoader worker: it inherits the open lock file
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        child.put(pid)
        held.set()
        time.sleep(60)


def test_the_lock_of_a_killed_run_is_not_held_by_its_orphaned_children(tmp_path):
    """kill -9 of a run leaves its loader workers alive for a few seconds: they must not keep the run's lock, or
    --resume right after the kill says that the run is still running."""
    path = str(tmp_path / "lock")
    fork = multiprocessing.get_context("fork")
    held, child = fork.Event(), fork.Queue()
    holder = fork.Process(target=hold_lock_and_fork, args=(path, held, child))
    holder.start()
    assert held.wait(60)
    orphan = child.get(timeout=60)
    try:
        with pytest.raises(runs.RunError, match="busy"), runs.locked(path, "busy"):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()  # waitpid: the orphan holds the pipe that join(timeout) would wait on
        with runs.locked(path, "busy"):  # the orphan still lives, and the lock is free
            os.kill(orphan, 0)
    finally:
        os.kill(orphan, signal.SIGKILL)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
                                   KeyboardInterrupt()], ids=["ENOSPC", "RuntimeError", "Ctrl-C"])
def test_a_failing_save_keeps_the_last_checkpoint_and_no_temporary_file(error, tmp_path, monkeypatch):
    path = str(tmp_path / "run" / "checkpoint.pt")
    runs.save_atomic({"epoch": 1}, path)
    monkeypatch.setattr(torch, "save", partial_write(error))
    with pytest.raises(KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else runs.RunError) as info:
        runs.save_atomic({"epoch": 2}, path)
    if not isinstance(error, KeyboardInterrupt):
        assert str(info.value).startswith(f"cannot write {path} (") and "\n" not in str(info.value)
        assert "free disk space or choose another --output-dir" in str(info.value)
    monkeypatch.undo()
    assert os.listdir(tmp_path / "run") == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


# ----------------------------------------------------------------------------------------------------------------------
# What a person sees: Ctrl-C, progress, the warm-up epoch

@pytest.mark.parametrize("sent, code, said", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated (SIGTERM)")], ids=["Ctrl-C", "SIGTERM"])
def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(sent, code, said, folder, vit_checkpoint, tmp_path):
    """SIGTERM (scancel, preemption, a Slurm time limit) as Ctrl-C, with its own exit code."""
    process = launch(train_argv("upt", folder, vit_checkpoint, tmp_path, epochs=500))
    assert next((line for line in process.stdout if line.startswith("epoch 2/500 |")), None), process.stderr.read()
    process.send_signal(sent)  # epoch 1's checkpoint is written before epoch 2's line
    _, err = process.communicate(timeout=60)
    [path] = find(tmp_path, "checkpoint.pt")
    epoch = torch.load(path, weights_only=True)["epoch"]
    assert process.returncode == code and 1 <= epoch < 500
    assert err == f"{said}: {path} holds epoch {epoch}; add --resume to the same command to continue\n"
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)


def fake_clock(step):
    now = [0.0]

    def clock():
        now[0] += step
        return now[0]
    return types.SimpleNamespace(time=clock)


def test_progress_prints_a_few_plain_lines_to_a_file_and_nothing_for_a_fast_loop(monkeypatch, capsys):
    monkeypatch.setattr(runs, "time", fake_clock(0.1))  # 10 s for 100 items
    assert list(runs.progress(range(100), 100, "epoch 1/2")) == list(range(100))
    lines = capsys.readouterr().out.splitlines()
    assert 3 <= len(lines) <= 4 and lines[-1].startswith("epoch 1/2: 100/100 | ")
    assert all(re.fullmatch(r"epoch 1/2: \d+/100 \| [\d.]+/s \| eta \d+s", line) for line in lines), lines
    monkeypatch.setattr(runs, "time", fake_clock(0.001))  # 0.1 s
    assert list(runs.progress(range(100), 100, "epoch 1/2")) == list(range(100))
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(runs, "time", fake_clock(0.1))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # a terminal: one line, updated in place
    list(runs.progress(range(100), 100, "epoch 1/2"))
    out = capsys.readouterr().out
    assert out.count("\r") > 4 and out.count("\n") == 1 and out.endswith("\n")


def test_one_epoch_is_the_warm_up_and_the_log_says_so(folder, vit_checkpoint, tmp_path, capsys):
    run("upt", folder, vit_checkpoint, tmp_path, epochs=1)
    out = capsys.readouterr().out
    assert "note: --epochs 1 trains only Dassl's warm-up epoch, at lr 1e-5" in out
    assert re.search(r"^epoch 1/1 \|.* lr 1\.00e-05 \|", out, re.M)


# ----------------------------------------------------------------------------------------------------------------------
# Nothing silent, nothing wrong (issue 19): results.jsonl and the report, caches that can go stale, divergence, the API

GOOD_ROW = dict(run_id="abc", dataset="dtd", subsample="all", accuracy=87.5, train_seconds=60.0)
BAD_LINES = [  # (id, the line's bytes, what the warning says about it)
    ("cut by a killed writer", b'{"run_id": "abc", "dataset": "dt', "not JSON (cut by a killed writer?)"),
    ("not UTF-8", b'{"run_id": "abc", "dataset": "dtd\xff\xfe", "subsample": "all", "accuracy": 1}\n', "not UTF-8"),
    ("a list", b"[1, 2]\n", "[1, 2] is not a JSON object"),
    ("null", b"null\n", "null is not a JSON object"),
    ("a row without fields", b"{}\n", 'no "run_id"'),
    ("accuracy a string", json.dumps({**GOOD_ROW, "accuracy": "87.5%"}).encode() + b"\n",
     '"accuracy" is "87.5%", not a finite number'),
    ("accuracy NaN", json.dumps({**GOOD_ROW, "accuracy": float("nan")}).encode() + b"\n",
     '"accuracy" is NaN, not a finite number'),
    ("train_seconds a list", json.dumps({**GOOD_ROW, "train_seconds": [1]}).encode() + b"\n",
     '"train_seconds" is [1], not a finite number'),
    ("run_id a number", json.dumps({**GOOD_ROW, "run_id": 7}).encode() + b"\n", '"run_id" is 7, not a string'),
    ("variance without var_t", json.dumps(dict(kind="variance", dataset="dtd", backbone="RN50", split="test",
                                               var_v=0.1)).encode() + b"\n", 'no "var_t"'),
    ("unknown kind", b'{"kind": "bench"}\n', "unknown kind 'bench'"),
]


@pytest.mark.parametrize("name, line, why", BAD_LINES, ids=[case[0] for case in BAD_LINES])
def test_a_bad_results_line_is_skipped_with_one_warning_and_the_rest_is_read(name, line, why, tmp_path, capsys):
    other = {**GOOD_ROW, "dataset": "eurosat"}
    content = json.dumps(GOOD_ROW).encode() + b"\n" + line + (b"" if line.endswith(b"\n") else b"\n") + \
        json.dumps(other).encode() + b"\n"
    (tmp_path / "results.jsonl").write_bytes(content)
    results = reproduce.read_results(str(tmp_path))
    assert results == {("abc", "dtd", "all"): GOOD_ROW, ("abc", "eurosat", "all"): other}
    err = capsys.readouterr().err
    assert err == f"warning: {tmp_path}/results.jsonl: skipped 1 bad line (line 2: {why}): their runs count as not " \
                  "done\n"
    assert (tmp_path / "results.jsonl").read_bytes() == content


def test_a_row_whose_train_seconds_were_not_recorded_is_read(tmp_path, capsys):
    row = {**GOOD_ROW, "train_seconds": None}  # train.py resumed from a checkpoint older than that record
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    assert reproduce.read_results(str(tmp_path)) == {("abc", "dtd", "all"): row} and not capsys.readouterr().err
    assert reproduce.METRICS["minutes"](row) is None and reproduce.METRICS["minutes"](GOOD_ROW) == 1.0


def test_the_report_goes_on_over_every_kind_of_bad_line(tmp_path, capsys):
    lines = [line if line.endswith(b"\n") else line + b"\n" for _, line, _ in BAD_LINES]
    (tmp_path / "results.jsonl").write_bytes(b"".join(lines))
    before = snapshot(tmp_path)
    reproduce.main(["upt-table2", "--output-dir", str(tmp_path), "--report", "--csv", str(tmp_path / "t.csv")])
    out, err = capsys.readouterr()
    assert "upt-table2" in out and "missing" in out and os.path.isfile(tmp_path / "t.csv")
    assert len(err.splitlines()) == 1 and err.startswith(f"warning: {tmp_path}/results.jsonl: skipped "
                                                         f"{len(BAD_LINES)} bad lines (line 1: not JSON")
    assert f"{len(BAD_LINES) - 5} more at lines 6, 7, 8, 9, 10, 11)" in err
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "t.csv"} == before


@pytest.mark.parametrize("mode", [["--report"], ["--dry-run"]])
def test_a_results_jsonl_that_cannot_be_read_is_one_line_for_reproduce(mode, tmp_path, capsys):
    os.makedirs(tmp_path / "results.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["upt-table2", "--output-dir", str(tmp_path), *mode])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: cannot read {tmp_path}/results.jsonl (Is a directory): make " \
                                                "it a readable file or pass another --output-dir\n"
    assert os.listdir(tmp_path) == ["results.jsonl"] and os.listdir(tmp_path / "results.jsonl") == []


def test_an_append_after_a_cut_row_starts_on_a_fresh_line(folder, vit_checkpoint, tmp_path, capsys):
    """A writer killed mid-row (or a full disk) leaves a last line without a newline: the next row stays whole."""
    runs.append_rows(str(tmp_path / "results.jsonl"), [GOOD_ROW])
    with open(tmp_path / "results.jsonl", "ab") as f:
        f.write(b'{"run_id": "dead", "dataset": "dt')  # cut
    [row] = run("zeroshot", folder, vit_checkpoint, tmp_path)
    runs.append_rows(str(tmp_path / "results.jsonl"), [GOOD_ROW])  # after a whole row: no blank line
    lines = (tmp_path / "results.jsonl").read_bytes().split(b"\n")
    assert lines[1] == b'{"run_id": "dead", "dataset": "dt' and json.loads(lines[2]) == row and lines[4] == b""
    capsys.readouterr()
    assert reproduce.read_results(str(tmp_path))[row["run_id"], row["dataset"], "all"] == row  # done, not glued
    assert "skipped 1 bad line (line 2: not JSON" in capsys.readouterr().err


def rewrite_images(dataset):
    """Every image rewritten at its path with other pixels (a re-extracted or re-downloaded dataset)."""
    for path in glob.glob(os.path.join(dataset.removeprefix("folder:"), "*", "*", "*.png")):
        image = Image.open(path).convert("RGB")
        Image.eval(image, lambda v: 255 - v).save(path)


def test_images_rewritten_at_the_same_paths_are_never_served_stale_features(vit_checkpoint, tmp_path):
    """The test-feature cache and the feature bank key each image's size and mtime: after a rewrite, the run equals
    a run on the new images in a fresh folder, tensor for tensor."""
    dataset = write_colour_folder(str(tmp_path / "data"), size=(16, 16))
    run("coop", dataset, vit_checkpoint, tmp_path / "out")
    assert len(glob.glob(str(tmp_path / "out" / "feature_bank" / "*"))) == 1
    rewrite_images(dataset)
    stale = run("coop", dataset, vit_checkpoint, tmp_path / "out")
    fresh = run("coop", dataset, vit_checkpoint, tmp_path / "fresh")
    assert stale[0]["train_from"] == "feature bank" and stale[0]["accuracy"] == fresh[0]["accuracy"]
    assert_same_checkpoint(checkpoint_in(tmp_path / "out"), checkpoint_in(tmp_path / "fresh"))
    assert len(glob.glob(str(tmp_path / "out" / "feature_bank" / "*"))) == 2  # the old bank stays for the old images
    assert len(glob.glob(str(tmp_path / "out" / "feature_cache" / "*.pt"))) == 2


def test_weights_replaced_between_two_runs_of_one_process_are_hashed_again(folder, tmp_path):
    backbone = str(tmp_path / "tiny.pt")
    save_state_dict(make_tiny_clip("vit"), backbone)
    first = run("coop", folder, backbone, tmp_path / "out")
    save_state_dict(make_tiny_clip("vit", seed=1), backbone)  # the same path, other weights, the same process
    again = run("coop", folder, backbone, tmp_path / "out")
    fresh = run("coop", folder, backbone, tmp_path / "fresh")
    assert again[0]["accuracy"] == fresh[0]["accuracy"] and first[0]["run_id"] == again[0]["run_id"]
    assert_same_checkpoint(checkpoint_in(tmp_path / "out"), checkpoint_in(tmp_path / "fresh"))
    assert len(glob.glob(str(tmp_path / "out" / "feature_bank" / "*"))) == 2


@pytest.mark.parametrize("how", ["a file", "permission denied"])
def test_a_feature_store_that_cannot_be_written_warns_once_and_the_run_goes_on(how, folder, vit_checkpoint, tmp_path,
                                                                               monkeypatch, capsys):
    reference = run("coop", folder, vit_checkpoint, tmp_path / "reference", no_feature_bank=True)  # from images
    out = tmp_path / "out"
    os.makedirs(out)
    if how == "a file":
        for store in ("feature_bank", "feature_cache"):
            (out / store).write_text("in the way")
    else:
        makedirs = os.makedirs

        def refuse(path, *args, **kwargs):
            if str(path).startswith(str(out / "feature_")):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return makedirs(path, *args, **kwargs)
        monkeypatch.setattr(os, "makedirs", refuse)
    capsys.readouterr()
    [row] = run("coop", folder, vit_checkpoint, out)
    printed = capsys.readouterr().out
    assert row["train_from"] == "images" and row["accuracy"] == reference[0]["accuracy"]
    assert printed.count("warning: feature bank ") == 1 and printed.count("warning: the test-feature cache ") == 1
    assert re.search(r"warning: feature bank \S+ cannot be written \((Not a directory|Permission denied)\): training "
                     r"from images", printed), printed
    ours, theirs = checkpoint_in(out)["model"], checkpoint_in(tmp_path / "reference")["model"]  # both from images
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_failed_feature_write_is_said_once_and_the_run_goes_on(folder, vit_checkpoint, tmp_path, monkeypatch, capsys):
    def full_disk(features_, path, budget=None):  # what save_atomic raises on a full disk
        raise runs.RunError(f"cannot write {path} (No space left on device): free disk space or choose another "
                            "--output-dir")
    monkeypatch.setattr(features, "write_features", full_disk)
    [row] = run("coop", folder, vit_checkpoint, tmp_path / "out")  # 2 bank epochs and one test set not stored
    printed = capsys.readouterr().out
    assert printed.count("warning: feature bank: cannot write ") == 1, printed
    assert printed.count("warning: the test-feature cache: cannot write ") == 1, printed
    assert row["train_from"] == "feature bank" and not find(tmp_path / "out", "epoch0000.pt")

def die_mid_write(path):
    with open(runs.temporary_name(path), "wb") as f:
        f.write(b"PK\x03\x04 half a file")
    os._exit(0)  # as kill -9: no cleanup


def test_temporary_files_of_dead_writers_are_removed_and_those_of_live_ones_kept(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    fork = multiprocessing.get_context("fork")
    for _ in range(3):
        writer = fork.Process(target=die_mid_write, args=(path,))
        writer.start()
        writer.join(60)
    live = runs.temporary_name(path)  # this process: alive, mid-write
    other_host = f"{path}.elsewhere.1.1.tmp"
    old_other_host = f"{path}.elsewhere.2.2.tmp"
    for name in (live, other_host, old_other_host):
        open(name, "w").close()
    os.utime(old_other_host, (time.time() - 2 * 86400,) * 2)
    assert len(glob.glob(path + ".*.tmp")) == 6
    runs.save_atomic({"epoch": 1}, path)
    assert sorted(os.listdir(tmp_path)) == sorted(["checkpoint.pt", *(os.path.basename(p) for p in (live, other_host))])
    cache = tmp_path / "feature_cache"
    writer = fork.Process(target=die_mid_write, args=(str(cache / "0123.pt"),))
    os.makedirs(cache)
    writer.start()
    writer.join(60)
    features.write_features(torch.zeros(4, 2), str(cache / "4567.pt"), budget=10 ** 6)  # budgeted: sees the dead .tmp
    assert os.listdir(cache) == ["4567.pt"]


def nan_loss_from(call):
    cross_entropy, calls = torch.nn.functional.cross_entropy, []

    def loss(logits, labels):
        calls.append(1)
        return cross_entropy(logits, labels) * (float("nan") if len(calls) >= call else 1.0)
    return loss


@pytest.mark.parametrize("case", ["lr 1e30", "nan in epoch 3", "nan in epoch 1"])
def test_a_diverged_run_says_to_restart_with_a_lower_lr_and_never_calls_a_useless_checkpoint_good(
        case, folder, vit_checkpoint, tmp_path, monkeypatch, capsys):
    if case == "lr 1e30":  # one step per epoch: epoch 2's step sends the parameters to 1e30, epoch 3's loss is nan
        argv = train_argv("upt", folder, vit_checkpoint, tmp_path, epochs=5, lr=1e30, batch_size=12)
    else:  # three steps per epoch: step 7 is epoch 3's first, step 1 epoch 1's
        argv = train_argv("upt", folder, vit_checkpoint, tmp_path, epochs=5)
        monkeypatch.setattr(train.F, "cross_entropy", nan_loss_from(7 if case == "nan in epoch 3" else 1))
    err = one_line_error(capsys, ["train.py", *argv])
    assert "start the run from scratch with a lower --lr than " in err and "(--resume would diverge again)" in err
    path = os.path.join(train.plan(argv)["run_dir"], "checkpoint.pt")
    if case == "nan in epoch 1":
        assert err.startswith("error: loss became nan in epoch 1: ") and err.endswith("; nothing was saved\n")
        assert not os.path.exists(path)
        return
    assert err.startswith("error: loss became nan in epoch 3: ")
    assert torch.load(path, weights_only=True)["epoch"] == 2
    if case == "lr 1e30":
        assert re.search(rf"; {re.escape(path)} \(epoch 2\) is no good either: its parameters reach \d\.\de\+\d\d\n$",
                         err), err
    else:
        assert err.endswith(f"; {path} holds epoch 2, before the loss diverged (evaluate it with --eval-only)\n")


CLIP_API = [  # (id, call, what the CLIPError says)
    ("tokenize bytes", lambda p: clip_model.tokenize(b"dog"), "takes a str or a list of str, not bytes: decode it"),
    ("tokenize None in a list", lambda p: clip_model.tokenize(["a dog", None]), "item 1 is a NoneType"),
    ("tokenize an int", lambda p: clip_model.tokenize(5), "takes a str or a list of str, not int"),
    ("context_length 0", lambda p: clip_model.tokenize("dog", context_length=0, truncate=True),
     "context_length must be an int of at least 2, room for [SOS] and [EOT] (got 0)"),
    ("context_length 2.5", lambda p: clip_model.tokenize("dog", context_length=2.5), "(got 2.5)"),
    ("load non-string keys", lambda p: clip_model.load(p["int_keys"], "cpu"), "key 1 is a int, not a str"),
    ("load a value not a tensor", lambda p: clip_model.load(p["str_value"], "cpu"),
     "not a CLIP state dict (visual.proj is a str, not a tensor)"),
    ("build_model of a list", lambda p: clip_model.build_model([1, 2]), "not a CLIP state dict (a list"),
    ("build_model of a 0-d tensor", lambda p: clip_model.build_model({"visual.proj": torch.zeros(()),
                                                                       "visual.conv1.weight": torch.zeros(())}),
     "not a CLIP state dict (IndexError"),
]


@pytest.mark.parametrize("name, call, expected", CLIP_API, ids=[case[0] for case in CLIP_API])
def test_the_clip_api_says_what_it_expected(name, call, expected, tmp_path):
    paths = {"int_keys": str(tmp_path / "int_keys.pt"), "str_value": str(tmp_path / "str_value.pt")}
    torch.save({1: torch.zeros(2), "visual.proj": torch.zeros(2)}, paths["int_keys"])
    torch.save({"visual.proj": "a string"}, paths["str_value"])
    before = snapshot(tmp_path)
    with pytest.raises(clip_model.CLIPError) as info:
        call(paths)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert snapshot(tmp_path) == before
