"""Run records (issue 8): cross-dataset evaluation built from the trained state, class-specific rows matched by WordNet
id (ImageNet's duplicate names), complete rows, and run folders that never collide."""
import os

import pytest
import torch
from PIL import Image

import data
import runs
import train
from conftest import read_rows, train_argv

# Six ImageNet classes with both "missile" (657, 744) and both "sunglasses" (836, 837): tiny ImageNet, -Sketch, -A, -R
WNIDS = {i: data.IMAGENET_WNIDS[i] for i in (0, 1, 657, 744, 836, 837)}
SUBSETS = {"imagenet_sketch": ("imagenet-sketch", "images", (0, 657, 836, 837)),
           "imagenet_a": ("imagenet-adversarial", "imagenet-a", (1, 744, 836)),
           "imagenet_r": ("imagenet-rendition", "imagenet-r", (0, 657, 837))}


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_family")

    def images(folder, classes, n):
        for c in classes:
            os.makedirs(folder / WNIDS[c], exist_ok=True)
            for i in range(n):  # a colour per class, so a trained classifier tells them apart
                rgb = ((c * 37 + i) % 256, (c * 91) % 256, (c * 53 + 3 * i) % 256)
                Image.new("RGB", (24, 24), rgb).save(folder / WNIDS[c] / f"{i}.jpg")

    images(root / "imagenet" / "images" / "train", WNIDS, 3)
    images(root / "imagenet" / "images" / "val", WNIDS, 2)
    for folder, sub, classes in SUBSETS.values():
        images(root / folder / sub, classes, 2)
    return str(root)


def argv(method, root, backbone, out, **options):
    return train_argv(method, "imagenet", backbone, out, shots=2, epochs=2, batch_size=4, lr=0.5,
                      **options) + ["--root", root]



def test_imagenet_fixture_has_the_duplicate_names(imagenet_root):
    ds = data.load_dataset("imagenet", imagenet_root, log=lambda m: None)
    assert ds.classnames.count("missile") == 2 and ds.classnames.count("sunglasses") == 2
    assert ds.class_ids == sorted(WNIDS.values())


@pytest.mark.parametrize("method, options", [("linear_ft", {}), ("coop", {"csc": True, "n_ctx": 2}),
                                             ("linear_probe", {})])
def test_every_target_is_built_from_the_trained_state(method, options, imagenet_root, vit_checkpoint, tmp_path):
    """Bug 1: with several --eval-datasets, a class-specific method's second target was cut from the first target's
    rows (IndexError, or ImageNet-R scored with ImageNet-A's rows). Each target must equal its own --eval-only."""
    targets = "imagenet_sketch,imagenet_a,imagenet_r"
    trained = train.run(train.parse_args(argv(method, imagenet_root, vit_checkpoint, tmp_path, eval_datasets=targets,
                                              **options)))
    assert [r["dataset"] for r in trained] == ["imagenet", *targets.split(",")]
    [checkpoint] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "checkpoint.pt"]
    for row in trained:
        alone = train.run(train.parse_args(["--method", method, "--dataset", row["dataset"], "--root", imagenet_root,
                                            "--eval-only", "--checkpoint", checkpoint, "--workers", "0",
                                            "--output-dir", str(tmp_path / "alone")]))
        assert alone[0]["accuracy"] == row["accuracy"], row["dataset"]


def test_class_specific_rows_follow_the_wordnet_id_not_the_name(imagenet_root):
    """Bug 2: by name, both 'sunglasses' (836, 837) took the last row; rows are matched by wnid in the ImageNet family,
    and a name given twice is an error where only names identify classes."""
    source = data.load_dataset("imagenet", imagenet_root, log=lambda m: None)
    state = {"weight": torch.arange(6.0)[:, None].expand(6, 3).clone()}  # row i holds i
    for name, (_, _, classes) in SUBSETS.items():
        target = data.load_dataset(name, imagenet_root, log=lambda m: None)
        cut = runs.restrict_to_classes(state, "linear_ft", None, source.class_ids, target.class_ids)
        expected = [source.class_ids.index(WNIDS[c]) for c in sorted(classes, key=lambda c: WNIDS[c])]
        assert cut["weight"][:, 0].tolist() == expected
    assert runs.restrict_to_classes(state, "linear_ft", None, source.classnames, source.classnames) == state  # same
    with pytest.raises(runs.RunError, match="'sunglasses' 2 times"):
        runs.restrict_to_classes(state, "linear_ft", None, source.classnames, ["sunglasses", "tench"])
    with pytest.raises(runs.RunError, match="was not one"):
        runs.restrict_to_classes(state, "linear_ft", None, source.class_ids, ["n99999999"])
    assert runs.restrict_to_classes(state, "upt", None, source.class_ids, ["x"]) == state  # class-agnostic


def test_eval_only_of_an_imagenet_checkpoint_keeps_every_row(imagenet_root, vit_checkpoint, tmp_path):
    trained = train.run(train.parse_args(argv("linear_ft", imagenet_root, vit_checkpoint, tmp_path)))
    [checkpoint] = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "checkpoint.pt"]
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["class_ids"] == sorted(WNIDS.values()) and saved["classnames"].count("sunglasses") == 2
    again = train.run(train.parse_args(["--method", "linear_ft", "--dataset", "imagenet", "--root", imagenet_root,
                                        "--eval-only", "--checkpoint", checkpoint, "--workers", "0",
                                        "--output-dir", str(tmp_path)]))
    assert again[0]["accuracy"] == trained[0]["accuracy"] and again[0]["macro_f1"] == trained[0]["macro_f1"]


def test_run_folders_are_readable_and_named_by_every_setting(tmp_path):
    """Bug 4: the folder was shots{S}_seed{s}_{subsample}, so runs differing in --lr, --epochs, --n-ctx, --prompt or
    --released-code overwrote one another."""
    base = ["--dataset", "dtd", "--output-dir", str(tmp_path)]
    plan = train.plan(["--method", "upt", *base])
    assert plan["run_dir"] == os.path.join(str(tmp_path), "dtd", "upt", "ViT-B-16", "s16_seed1_all", plan["run_id"])
    assert plan["settings"] == {**{k: None for k in runs.IDENTITY}, "method": "upt", "dataset": "dtd",
                                "subsample": "all", "backbone": "ViT-B/16", "precision": "amp", "shots": 16, "seed": 1,
                                "epochs": 200, "lr": 0.002, "batch_size": 32, "n_ctx": 4, "depth": 1,
                                "released_code": False}
    variants = [["--method", "upt"], ["--method", "upt", "--lr", "0.02"], ["--method", "upt", "--epochs", "50"],
                ["--method", "upt", "--n-ctx", "8"], ["--method", "upt", "--released-code"],
                ["--method", "upt", "--depth", "2"], ["--method", "upt", "--precision", "fp32"],
                ["--method", "upt", "--batch-size", "16"], ["--method", "coop"], ["--method", "coop", "--csc"],
                ["--method", "coop", "--ctx-init", "a photo of a"],
                ["--method", "coop", "--class-token-position", "middle"], ["--method", "coop", "--no-feature-bank"],
                ["--method", "zeroshot", "--prompt", "basic"], ["--method", "zeroshot", "--prompt", "negative"],
                ["--method", "zeroshot", "--template", "a photo of a {}."],
                ["--method", "zeroshot", "--prompt", "randtoken"],
                ["--method", "zeroshot", "--prompt", "randtoken", "--seed", "2"],
                ["--method", "zeroshot", "--prompt", "randtoken", "--random-length", "8"],
                ["--method", "vpt_deep"], ["--method", "vpt_deep", "--released-code"],
                ["--method", "vpt_deep", "--template", "a photo of a {}."]]
    plans = [train.plan(v + base) for v in variants]
    assert len({p["run_dir"] for p in plans}) == len({p["run_id"] for p in plans}) == len(variants)
    zeroshot = [p["settings"] for p in plans if p["settings"]["method"] == "zeroshot"]
    assert [z["template"] for z in zeroshot[:3]] == ["a photo of a {}.", "this is not a photo of a {}.",
                                                     "a photo of a {}."]
    assert zeroshot[0]["prompt"] == "basic" and zeroshot[2]["prompt"] is None  # basic and a free template: two runs
    assert train.plan(["--method", "coop", "--ctx-init", "a photo of a"] + base)["settings"]["n_ctx"] == 4
    assert train.plan(["--method", "cocoop"] + base)["settings"]["epochs"] == 10


def test_runs_differing_in_one_setting_keep_their_own_checkpoints(folder, vit_checkpoint, tmp_path, capsys):
    a = train.run(train.parse_args(train_argv("coop", folder, vit_checkpoint, tmp_path, n_ctx=2)))
    b = train.run(train.parse_args(train_argv("coop", folder, vit_checkpoint, tmp_path, n_ctx=2, lr=0.002)))
    assert a[0]["run_id"] != b[0]["run_id"] and (a[0]["lr"], b[0]["lr"]) == (0.01, 0.002)
    checkpoints = sorted(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "checkpoint.pt")
    assert len(checkpoints) == 2 and {os.path.basename(os.path.dirname(c)) for c in checkpoints} == {
        a[0]["run_id"], b[0]["run_id"]}
    assert {r["run_id"] for r in read_rows(tmp_path)} == {a[0]["run_id"], b[0]["run_id"]}
    with pytest.raises(SystemExit):
        train.main(train_argv("coop", folder, vit_checkpoint, tmp_path, n_ctx=2, lr=0.02, resume=True))
    error = capsys.readouterr().err
    assert "--resume: no checkpoint with these settings" in error and "differs in --lr" in error


# Run ids of existing settings, pinned: output folders and reproduce.py's "already done" depend on them never changing.
GOLDEN_RUN_IDS = [
    ("--method upt --dataset dtd --shots 8", "ff71ce7b66eb"),
    ("--method coop --dataset imagenet", "08727b59c284"),
    ("--method coop --dataset dtd --shots 4 --seed 2 --csc --class-token-position middle --ctx-init a_photo_of_a",
     "fae84f5ea38e"),
    ("--method cocoop --dataset dtd --subsample base", "48249e374081"),
    ("--method vpt_deep --dataset eurosat --shots 1 --released-code --backbone RN50", "587096ede6f0"),
    ("--method zeroshot --dataset dtd --prompt randtoken", "ba253baa8995"),
    ("--method zeroshot --dataset oxford_pets --prompt ensemble", "dbc974d8841c"),
    ("--method linear_ft --dataset dtd --lr 0.2 --epochs 50 --no-feature-bank", "60c06dd55d14"),
    ("--method linear_probe --dataset caltech101 --shots 2", "0a6884b57ce1"),
    ("--method upt_mlp --dataset dtd --depth 3 --precision fp32", "602031129cab"),
]


@pytest.mark.parametrize("command, golden", GOLDEN_RUN_IDS)
def test_golden_run_ids(command, golden):
    argv = [word.replace("_", " ") if word == "a_photo_of_a" else word for word in command.split()]
    plan = train.plan(argv)
    assert plan["run_id"] == golden
    assert os.path.basename(plan["run_dir"]) == golden
    assert plan["run_dir"].startswith(os.path.join("output", argv[3], argv[1], ""))


def test_golden_run_dir():
    assert train.plan(GOLDEN_RUN_IDS[0][0].split())["run_dir"] == os.path.join("output", "dtd", "upt", "ViT-B-16",
                                                                               "s8_seed1_all", "ff71ce7b66eb")
