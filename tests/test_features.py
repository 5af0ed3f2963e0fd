"""Frozen work paid once (issue 10): the test-feature cache is reused by other processes and invalidated by other
weights; the feature bank gives the same logits per step as images, is shared by runs on the same subset (epoch
budgets share a prefix); UPT's prompt side runs once per evaluation."""
import copy
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import features
import runs
import train
from conftest import make_tiny_clip, save_state_dict, train_argv
from upt import UPT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(method, folder, backbone, out, **options):
    return train.run(train.parse_args(train_argv(method, folder, backbone, out, **options)))


def no_encoding(*args, **kwargs):
    raise AssertionError("features were computed again instead of read from disk")


# ----------------------------------------------------------------------------------------------------------------------
# Test-feature cache

def test_feature_cache_is_reused_by_another_process_and_not_after_new_weights(folder, tmp_path, monkeypatch):
    backbone = str(tmp_path / "tiny.pt")
    save_state_dict(make_tiny_clip("vit"), backbone)
    argv = train_argv("zeroshot", folder, backbone, tmp_path / "out")
    done = subprocess.run([sys.executable, "-c", f"import train; train.main({argv!r})"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [cached] = glob.glob(str(tmp_path / "out" / "feature_cache" / "*.pt"))
    monkeypatch.setattr(features, "encode_all", no_encoding)
    with open(tmp_path / "out" / "results.jsonl") as f:
        first = json.loads(f.readline())
    assert train.run(train.parse_args(argv))[0]["accuracy"] == first["accuracy"]
    save_state_dict(make_tiny_clip("vit", seed=1), backbone)  # the same path, other weights
    features.backbone_weights.cache_clear()
    with pytest.raises(AssertionError, match="computed again"):
        train.run(train.parse_args(argv))


def test_feature_cache_stays_under_its_budget(tmp_path):
    paths = [str(tmp_path / f"{i}.pt") for i in range(4)]
    for i, path in enumerate(paths):
        features.write_features(torch.full((100, 8), float(i)), path, budget=None)
        os.utime(path, (i, i))  # 0 is the least recently used
    size = os.path.getsize(paths[0])
    features.write_features(torch.zeros(100, 8), str(tmp_path / "new.pt"), budget=3 * size + 100)  # zip entries carry the file name: sizes differ slightly
    assert sorted(os.listdir(tmp_path)) == ["2.pt", "3.pt", "new.pt"]


# ----------------------------------------------------------------------------------------------------------------------
# Feature bank

@pytest.mark.parametrize("method, options", [("coop", {"n_ctx": 2}), ("coop", {"csc": True, "n_ctx": 2,
                                                                             "class_token_position": "middle"}),
                                             ("cocoop", {"batch_size": 2}), ("linear_ft", {})])
def test_bank_and_images_give_the_same_logits_every_step(method, options, folder, vit_checkpoint, tmp_path,
                                                          monkeypatch):
    steps = {}
    cross_entropy = F.cross_entropy

    def record(name):
        def loss(logits, labels):
            steps.setdefault(name, []).append((logits.detach().clone(), labels.clone()))
            return cross_entropy(logits, labels)
        return loss

    for name, extra in [("images", {"no_feature_bank": True}), ("bank", {})]:
        monkeypatch.setattr(F, "cross_entropy", record(name))
        rows = run(method, folder, vit_checkpoint, tmp_path / name, epochs=3, **options, **extra)
        assert rows[0]["train_from"] == ("images" if name == "images" else "feature bank")
    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    assert len(steps["images"]) == len(steps["bank"]) == 3 * (12 // (options.get("batch_size", 4)))
    for (a, y), (b, z) in zip(steps["images"], steps["bank"]):
        assert torch.equal(y, z)  # the same batches, in the same order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bank_epochs_are_shared_by_runs_on_the_same_subset(folder, vit_checkpoint, tmp_path, monkeypatch, capsys):
    run("coop", folder, vit_checkpoint, tmp_path, epochs=3, n_ctx=2)
    assert "0 epochs reused, 3 built" in capsys.readouterr().out
    [bank] = glob.glob(str(tmp_path / "feature_bank" / "*"))
    assert sorted(os.listdir(bank)) == ["epoch0000.pt", "epoch0001.pt", "epoch0002.pt", "lock"]
    monkeypatch.setattr(features, "encode_all", no_encoding)  # other methods, lr and budgets read the same epochs
    run("linear_ft", folder, vit_checkpoint, tmp_path, epochs=2, lr=0.1)
    run("cocoop", folder, vit_checkpoint, tmp_path, epochs=3, batch_size=4)
    assert capsys.readouterr().out.count("epochs reused, 0 built") == 2
    monkeypatch.undo()
    run("coop", folder, vit_checkpoint, tmp_path, epochs=4, n_ctx=2)  # a longer budget adds only its last epoch
    assert "3 epochs reused, 1 built" in capsys.readouterr().out
    run("coop", folder, vit_checkpoint, tmp_path, epochs=2, n_ctx=2, seed=2)  # another subset: another bank
    assert len(glob.glob(str(tmp_path / "feature_bank" / "*"))) == 2


def test_bank_off_or_over_budget_trains_from_images(folder, vit_checkpoint, tmp_path, monkeypatch, capsys):
    assert run("coop", folder, vit_checkpoint, tmp_path, n_ctx=2, no_feature_bank=True)[0]["train_from"] == "images"
    assert not os.path.exists(tmp_path / "feature_bank")
    monkeypatch.setattr(features, "BANK_BUDGET", 1000)
    assert run("linear_ft", folder, vit_checkpoint, tmp_path)[0]["train_from"] == "images"
    assert "is over the budget" in capsys.readouterr().out and not os.path.exists(tmp_path / "feature_bank")


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: UPT's θ and text features once per evaluation

def test_upt_prompt_side_runs_once_per_evaluation(folder, tiny_vit, tmp_path, monkeypatch):
    import data
    ds = data.load_dataset(folder, "", log=lambda m: None)
    model = UPT(copy.deepcopy(tiny_vit), ds.classnames).eval()
    calls = []
    model.theta.register_forward_hook(lambda *a: calls.append(1))
    args = runs.resolve(train.parse_args(train_argv("upt", folder, "ViT-B/16", tmp_path)))
    monkeypatch.setattr(data, "make_loader", lambda items, transform, batch_size, **kw: torch.utils.data.DataLoader(
        data.ImageList(items, transform), batch_size=3))  # 4 batches of the 12 test images
    accuracy = train.evaluate(model, ds.test, len(ds.classnames), args,
                              train.Compute("cpu", torch.autocast("cpu", enabled=False), None, "fp32"))
    assert len(calls) == 1  # not once per batch
    with torch.no_grad():
        images = torch.stack([data.test_transform(32)(data.load_image(p)) for p, _ in ds.test])
        prepared = model.prepare()
        logits = torch.cat([model(b, prepared) for b in images.split(3)])
        assert torch.equal(logits, torch.cat([model(b) for b in images.split(3)]))  # θ per batch: the same logits
        labels = torch.tensor([y for _, y in ds.test])
        assert accuracy[0] == 100 * (logits.argmax(-1) == labels).sum().item() / len(labels)
