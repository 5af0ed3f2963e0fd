"""train.py end to end on a tiny image folder and a tiny real-format CLIP: every method, resume, eval-only, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOURS = {"red_apple": (220, 30, 30), "green_leaf": (30, 200, 40), "blue_sky": (40, 60, 230)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """folder:<path> dataset: 3 classes told apart by colour; 6 train and 4 test images each (32 x 48 px)."""
    root = tmp_path_factory.mktemp("tiny_folder")
    g = torch.Generator().manual_seed(0)
    for split, count in [("train", 6), ("test", 4)]:
        for name, rgb in COLOURS.items():
            os.makedirs(root / split / name)
            for i in range(count):
                noise = torch.randint(-40, 40, (32, 48, 3), generator=g)
                pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return f"folder:{root}"


def run(folder, checkpoint, out, *extra):
    argv = ["--dataset", folder, "--backbone", checkpoint, "--output-dir", str(out), "--shots", "4", "--epochs", "2",
            "--batch-size", "4", "--workers", "0", "--lr", "0.01", *extra]
    return train.run(train.parse_args(argv))


def read_results(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", ["zeroshot", "coop", "cocoop", "vpt_shallow", "vpt_deep", "upt", "upt_joint",
                                    "upt_shared", "upt_mlp", "linear_ft", "linear_probe"])
def test_every_method_trains_and_reports(method, folder, vit_checkpoint, tmp_path):
    results = run(folder, vit_checkpoint, tmp_path, "--method", method)
    line = read_results(tmp_path)[-1]
    assert line == results[-1]
    assert line["method"] == method and line["shots"] == 4 and line["seed"] == 1
    assert 0 <= line["accuracy"] <= 100 and 0 <= line["macro_f1"] <= 100
    assert (line["trainable_params"] == 0) == (method == "zeroshot")


def test_resume_after_interruption_matches_uninterrupted_run(folder, vit_checkpoint, tmp_path, monkeypatch):
    full = run(folder, vit_checkpoint, tmp_path / "full", "--method", "upt", "--epochs", "3")
    saves, save = [], train.save_atomic

    def interrupt_after_two_epochs(obj, path):
        save(obj, path)
        saves.append(path)
        if path.endswith("checkpoint.pt") and len([s for s in saves if s.endswith("checkpoint.pt")]) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_atomic", interrupt_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        run(folder, vit_checkpoint, tmp_path / "cut", "--method", "upt", "--epochs", "3")
    monkeypatch.setattr(train, "save_atomic", save)
    resumed = run(folder, vit_checkpoint, tmp_path / "cut", "--method", "upt", "--epochs", "3", "--resume")
    assert resumed[-1]["accuracy"] == full[-1]["accuracy"]
    [a] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "full") for f in fs if f == "checkpoint.pt"]
    [b] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cut") for f in fs if f == "checkpoint.pt"]
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_eval_only_reproduces_final_accuracy_and_checkpoint_is_trainable_params_only(folder, vit_checkpoint, tmp_path):
    trained = run(folder, vit_checkpoint, tmp_path, "--method", "coop", "--n-ctx", "4")
    [path] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "checkpoint.pt"]
    state = torch.load(path, weights_only=True)
    assert list(state["model"]) == ["ctx"] and state["args"]["method"] == "coop"
    evaluated = train.run(train.parse_args(["--method", "coop", "--dataset", folder, "--output-dir", str(tmp_path),
                                            "--eval-only", "--checkpoint", path, "--workers", "0", "--shots", "4"]))
    assert evaluated[-1]["accuracy"] == trained[-1]["accuracy"]
    assert read_results(tmp_path)[-1]["eval_only"] is True


def test_base_to_new_evaluates_the_base_checkpoint_on_new_classes(folder, vit_checkpoint, tmp_path):
    run(folder, vit_checkpoint, tmp_path, "--method", "upt", "--subsample", "base")
    [path] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "checkpoint.pt"]
    assert torch.load(path, weights_only=True)["classnames"] == ["blue sky", "green leaf"]
    new = train.run(train.parse_args(["--method", "upt", "--dataset", folder, "--output-dir", str(tmp_path),
                                      "--subsample", "new", "--eval-only", "--checkpoint", path, "--workers", "0"]))
    assert new[-1]["subsample"] == "new" and new[-1]["accuracy"] == 100.0  # one new class: always right


def main_error(capsys, *args):
    """Run train.main in-process; -> its stderr, which must be one line, after exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(args))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr


@pytest.mark.parametrize("args, message", [
    (["--method", "cop", "--dataset", "dtd"], "did you mean 'coop'"),
    (["--method", "coop", "--dataset", "dtdd"], "dtd"),
    (["--method", "coop", "--dataset", "dtd"], "dtd"),  # missing folder under --root
    (["--method", "coop", "--dataset", "dtd", "--shots", "0"], "--shots must be positive"),
    (["--method", "coop", "--dataset", "dtd", "--eval-only"], "--checkpoint"),
    (["--method", "coop", "--dataset", "dtd", "--eval-only", "--checkpoint", "/nonexistent/ck.pt"], "not found"),
    (["--method", "coop", "--dataset", "dtd", "--backbone", "ViT-B/17"], "ViT-B/16"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    assert message in main_error(capsys, *args, "--root", str(tmp_path), "--output-dir", str(tmp_path))


def test_visual_prompts_on_resnet_and_too_many_shots_are_clear_errors(folder, rn_checkpoint, vit_checkpoint, tmp_path,
                                                                        capsys):
    common = ["--dataset", folder, "--output-dir", str(tmp_path), "--workers", "0"]
    for method in ["vpt_shallow", "vpt_deep", "upt", "upt_joint", "upt_shared", "upt_mlp"]:
        assert "ViT" in main_error(capsys, "--method", method, "--backbone", rn_checkpoint, "--shots", "4", *common)
    assert "--shots 6" in main_error(capsys, "--method", "coop", "--backbone", vit_checkpoint, "--shots", "50", *common)


def test_command_line_errors_exit_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--method", "coop", "--dataset", "nope",
                             "--root", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "-h"], capture_output=True, text=True,
                               cwd=ROOT, timeout=120).stdout
    assert "--method" in help_text and "--shots" in help_text
