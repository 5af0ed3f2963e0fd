"""train.py end to end on a tiny image folder and a tiny real-format CLIP: every method, resume, eval-only, base-to-new,
the command line."""
import os
import subprocess
import sys
import time

import pytest
import torch

import runs
import train
from conftest import read_rows, train_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(method, folder, checkpoint, out, **options):
    return train.run(train.parse_args(train_argv(method, folder, checkpoint, out, **options)))



def checkpoint_of(out):
    [path] = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f == "checkpoint.pt"]
    return path


@pytest.mark.parametrize("method", runs.METHODS)
def test_every_method_trains_and_reports(method, folder, vit_checkpoint, tmp_path):
    results = run(method, folder, vit_checkpoint, tmp_path)
    row = read_rows(tmp_path)[-1]
    assert row == results[-1]
    assert set(runs.IDENTITY) < set(row) and row["run_id"] == runs.run_id({k: row[k] for k in runs.IDENTITY} |
                                                                              {"dataset": row["train_dataset"],
                                                                               "subsample": row["train_subsample"]})
    assert row["method"] == method and row["git"] and row["precision_used"] == "fp32"
    assert (row["shots"], row["seed"], row["epochs"]) == ((None, None, None) if method == "zeroshot" else
                                                          (4, 1, None) if method == "linear_probe" else (4, 1, 2))
    assert 0 <= row["accuracy"] <= 100 and 0 <= row["macro_f1"] <= 100
    assert (row["trainable_params"] == 0) == (method == "zeroshot")
    assert row["train_from"] == ("feature bank" if method in ("coop", "cocoop", "linear_ft") else
                                 "images" if method in runs.PROMPTED else None)


def test_resume_after_interruption_matches_uninterrupted_run(folder, vit_checkpoint, tmp_path, monkeypatch):
    full = run("upt", folder, vit_checkpoint, tmp_path / "full", epochs=3)
    saves, save = [], train.save_atomic

    def interrupt_after_two_epochs(obj, path):
        save(obj, path)
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_atomic", interrupt_after_two_epochs)
    with pytest.raises(runs.Interrupted, match=r"holds epoch 2; add --resume to the same command"):
        run("upt", folder, vit_checkpoint, tmp_path / "cut", epochs=3)
    monkeypatch.setattr(train, "save_atomic", save)
    cut = torch.load(checkpoint_of(tmp_path / "cut"), weights_only=True)
    assert 0 < cut["train_seconds"] and cut["epoch"] == 2
    torch.save(dict(cut, train_seconds=1000.0), checkpoint_of(tmp_path / "cut"))  # as if the first session took 1000 s
    began = time.time()
    resumed = run("upt", folder, vit_checkpoint, tmp_path / "cut", epochs=3, resume=True)
    session = time.time() - began
    assert 1000 <= resumed[-1]["train_seconds"] <= 1000 + session + 0.1  # Rethinking Table 3 times the whole training
    assert resumed[-1]["accuracy"] == full[-1]["accuracy"] and resumed[-1]["run_id"] == full[-1]["run_id"]
    a, b = (torch.load(checkpoint_of(tmp_path / d), weights_only=True) for d in ("full", "cut"))
    assert a["epoch"] == b["epoch"] == 3 and 1000 < b["train_seconds"] <= resumed[-1]["train_seconds"] + 0.1
    assert 0 < a["train_seconds"] <= full[-1]["train_seconds"] + 0.1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_linear_probe_says_how_c_was_chosen_and_records_it(folder, vit_checkpoint, tmp_path, capsys):
    trained = run("linear_probe", folder, vit_checkpoint, tmp_path)  # 4 shots, the folder has no val split
    assert "chosen by CoOp's lpclip search (7-point grid, 8 binary steps) on 2 of 4 training shots per class held out" \
        in capsys.readouterr().out
    path = checkpoint_of(tmp_path)
    fit = torch.load(path, weights_only=True)["fit"]
    assert trained[-1]["linear_probe_c"] == fit["linear_probe_c"] > 0 and "held out" in fit["linear_probe_c_search"]
    assert 0 <= trained[-1]["linear_probe_val_accuracy"] <= 1
    train.run(train.parse_args(["--method", "linear_probe", "--dataset", folder, "--output-dir", str(tmp_path),
                                "--eval-only", "--checkpoint", path, "--workers", "0"]))
    assert {k: v for k, v in read_rows(tmp_path)[-1].items() if k.startswith("linear_probe")} == fit


def test_eval_only_reproduces_accuracy_with_the_checkpoints_settings(folder, vit_checkpoint, tmp_path):
    trained = run("coop", folder, vit_checkpoint, tmp_path, n_ctx=4, seed=2, shots=2, epochs=3)
    path = checkpoint_of(tmp_path)
    state = torch.load(path, weights_only=True)
    assert list(state["model"]) == ["ctx"] and state["args"]["method"] == "coop"
    evaluated = train.run(train.parse_args(["--method", "coop", "--dataset", folder, "--output-dir", str(tmp_path),
                                            "--eval-only", "--checkpoint", path, "--workers", "0"]))
    row = read_rows(tmp_path)[-1]
    assert evaluated[-1]["accuracy"] == trained[-1]["accuracy"] and row["eval_only"] is True
    assert (row["seed"], row["shots"], row["epochs"], row["n_ctx"]) == (2, 2, 3, 4)  # from the checkpoint, not defaults
    assert row["run_id"] == trained[-1]["run_id"] and row["checkpoint"] == path


def test_base_to_new_with_a_checkpoint_or_in_one_run(folder, vit_checkpoint, tmp_path):
    run("upt", folder, vit_checkpoint, tmp_path, subsample="base")
    path = checkpoint_of(tmp_path)
    assert torch.load(path, weights_only=True)["classnames"] == ["blue sky", "green leaf"]
    new = train.run(train.parse_args(["--method", "upt", "--dataset", folder, "--output-dir", str(tmp_path),
                                      "--subsample", "new", "--eval-only", "--checkpoint", path, "--workers", "0"]))
    assert new[-1]["subsample"] == "new" and new[-1]["train_subsample"] == "base"
    assert new[-1]["accuracy"] == 100.0  # one new class: always right
    both = run("upt", folder, vit_checkpoint, tmp_path / "one", subsample="base", eval_datasets=f"{folder}:new")
    assert [(r["dataset"], r["subsample"]) for r in both] == [(folder, "base"),
                                                              (folder, "new")]
    assert both[1]["accuracy"] == 100.0 and both[0]["run_id"] == both[1]["run_id"]


def test_visual_prompts_on_resnet_and_too_many_shots_are_clear_errors(folder, rn_checkpoint, vit_checkpoint, tmp_path,
                                                                        capsys):
    for method in ["vpt_shallow", "vpt_deep", "upt", "upt_joint", "upt_shared", "upt_mlp"]:
        assert "ViT" in main_error(capsys, *train_argv(method, folder, rn_checkpoint, tmp_path))
    assert "--shots 6" in main_error(capsys, *train_argv("coop", folder, vit_checkpoint, tmp_path, shots=50))


def main_error(capsys, *args):
    """Run train.main in-process; -> its stderr, which must be one line, after exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(args))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def test_command_line_errors_exit_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--method", "coop", "--dataset", "nope",
                             "--root", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "-h"], capture_output=True, text=True,
                               cwd=ROOT, timeout=120).stdout
    assert "--method" in help_text and "--shots" in help_text
