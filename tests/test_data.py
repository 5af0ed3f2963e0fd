"""data.py on tiny image folders in CoOp's exact layouts: class names, labels, Dassl's few-shot subsets (checked against
an independent re-implementation), base/new classes, transforms, the loader, the command line and every error message."""
import json
import os
import random
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from data import DataError, load_dataset, make_loader, train_transform  # noqa: E402


def quiet(msg):
    pass


def write_images(paths, size=(8, 8)):
    for i, path in enumerate(paths):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", size, (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(path)


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Dassl's procedure, re-implemented from REFERENCE-FACTS §4 (global random.seed + random.sample + defaultdict grouping)

def dassl_fewshot(items, num_shots):
    tracker = defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    dataset = []
    for label, group in tracker.items():
        dataset.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return dataset


def coop_fewshot(train, val, shots, seed):
    state = random.getstate()
    random.seed(seed)
    out = dassl_fewshot(train, shots), dassl_fewshot(val, min(shots, 4))
    random.setstate(state)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# DTD with a split JSON whose classes first appear in the order zigzagged (2), banded (0), blotchy (1);
# blotchy has 3 training images only, fewer than most shot counts below.

DTD_CLASSES = ["banded", "blotchy", "zigzagged"]


@pytest.fixture(scope="module")
def dtd_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    rng = random.Random(0)
    split = {}
    for s, counts in (("train", (10, 3, 12)), ("val", (5, 2, 6)), ("test", (4, 4, 4))):
        items = [[f"{c}/{c}_{s}_{i:02d}.jpg", y, c] for y, c in enumerate(DTD_CLASSES) for i in range(counts[y])]
        rng.shuffle(items)
        if s == "train":  # first appearances: zigzagged (2), banded (0), then blotchy (1); classes interleaved after
            first = [next(it for it in items if it[1] == y) for y in (2, 0)]
            items = first + [it for it in items if it not in first]
        split[s] = items
    write_images([os.path.join(root, "dtd", "images", p) for s in split.values() for p, _, _ in s])
    with open(os.path.join(root, "dtd", "split_zhou_DescribableTextures.json"), "w") as f:
        json.dump(split, f)
    return root


def dtd_split(root):
    with open(os.path.join(root, "dtd", "split_zhou_DescribableTextures.json")) as f:
        split = json.load(f)
    return {s: [(os.path.join(root, "dtd", "images", p), y) for p, y, _ in items] for s, items in split.items()}


def test_dtd_classnames_labels_and_order(dtd_root):
    split = dtd_split(dtd_root)
    assert list(dict.fromkeys(y for _, y in split["train"])) == [2, 0, 1]  # the fixture is what we claim
    d = load_dataset("dtd", dtd_root, log=quiet)
    assert d.classnames == DTD_CLASSES  # label order, not first-appearance order
    assert (d.train, d.val, d.test) == (split["train"], split["val"], split["test"])


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
@pytest.mark.parametrize("shots", [1, 2, 4, 16])
def test_fewshot_equals_dassl(dtd_root, seed, shots):
    split = dtd_split(dtd_root)
    random.seed(1234)  # neither the global Python stream nor torch's may change the subset
    torch.manual_seed(99)
    d = load_dataset("dtd", dtd_root, shots=shots, seed=seed, log=quiet)
    assert (d.train, d.val) == coop_fewshot(split["train"], split["val"], shots, seed)
    assert d.test == split["test"]
    per_class = [sum(y == c for _, y in d.train) for c in range(3)]
    assert per_class == [min(shots, 10), min(shots, 3), min(shots, 12)]  # blotchy keeps all 3 when shots > 3


def test_fewshot_depends_on_seed_and_is_repeatable(dtd_root):
    a, b = (load_dataset("dtd", dtd_root, shots=2, seed=s, log=quiet).train for s in (1, 2))
    assert a != b and a == load_dataset("dtd", dtd_root, shots=2, seed=1, log=quiet).train


@pytest.fixture(scope="module")
def fresh_process(dtd_root):
    """One new interpreter with another hash seed (imports cost seconds) for all that must not depend on the process:
    its stderr starts with a JSON line [transform_key(test_transform(224)), transform_key(train_transform(224))],
    then data.py's command line runs with --list-fewshot."""
    code = ("import json, sys, data; print(json.dumps([data.transform_key(data.test_transform(224)), "
            "data.transform_key(data.train_transform(224))]), file=sys.stderr); data.main()")
    cmd = [sys.executable, "-c", code, "--dataset", "dtd", "--root", dtd_root, "--shots", "4", "--seed", "2",
           "--list-fewshot"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.returncode == 0, out.stderr
    return out


def test_list_fewshot_identical_across_processes(dtd_root, fresh_process):
    out = fresh_process
    expected = [f"{os.path.relpath(p, os.path.join(dtd_root, 'dtd'))} {y}"
                for p, y in load_dataset("dtd", dtd_root, shots=4, seed=2, log=quiet).train]
    assert out.stdout.splitlines() == expected and expected[0].startswith("images/zigzagged/")
    assert "dtd: 3 classes" in out.stderr  # the summary goes to stderr, the list alone to stdout


def test_base_new_relabelling(dtd_root):
    full = load_dataset("dtd", dtd_root, shots=4, seed=1, log=quiet)
    base = load_dataset("dtd", dtd_root, shots=4, seed=1, subsample="base", log=quiet)
    new = load_dataset("dtd", dtd_root, shots=4, seed=1, subsample="new", log=quiet)
    assert base.classnames == ["banded", "blotchy"] and new.classnames == ["zigzagged"]  # ceil(3/2) = 2 base classes
    assert (full.class_ids, base.class_ids, new.class_ids) == (full.classnames, base.classnames, new.classnames)
    for split in ("train", "val", "test"):  # subsampled after sampling, from the same few-shot subset
        items = getattr(full, split)
        assert getattr(base, split) == [(p, y) for p, y in items if y < 2]
        assert getattr(new, split) == [(p, y - 2) for p, y in items if y == 2]


# ----------------------------------------------------------------------------------------------------------------------
# Raw layouts: splits built like CoOp's when the split file is absent, renames, and the readers without split files

def test_raw_split_without_json(tmp_path):
    root = str(tmp_path)
    write_images([os.path.join(root, "dtd", "images", c, f"{i}.jpg") for c in ("b", "a") for i in range(10)])
    logs = []
    d = load_dataset("dtd", root, log=logs.append)
    assert "NOT comparable" in logs[0] and "split_zhou_DescribableTextures.json" in logs[0]
    assert d.classnames == ["a", "b"]
    assert [len([1 for _, y in s if y == 0]) for s in (d.train, d.val, d.test)] == [5, 2, 3]  # 50 / 20 / 30 %
    assert not {p for p, _ in d.train} & {p for p, _ in d.val + d.test}
    again = load_dataset("dtd", root, log=quiet)
    assert (d.train, d.val, d.test) == (again.train, again.val, again.test)  # deterministic


def test_caltech101_ignored_and_renamed(tmp_path):
    folders = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "accordion", "airplanes"]
    write_images([os.path.join(tmp_path, "caltech-101", "101_ObjectCategories", f, f"{i}.jpg")
                  for f in folders for i in range(5)])
    d = load_dataset("caltech101", str(tmp_path), log=quiet)
    assert d.classnames == ["face", "leopard", "accordion", "airplane"]


def test_eurosat_renamed(tmp_path):
    write_images([os.path.join(tmp_path, "eurosat", "2750", f, f"{f}_{i}.jpg")
                  for f in ("AnnualCrop", "Forest", "SeaLake") for i in range(5)])
    assert load_dataset("eurosat", str(tmp_path), log=quiet).classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]


def test_oxford_pets_raw(tmp_path):
    d = os.path.join(tmp_path, "oxford_pets")
    names = [f"{b}_{i}" for b in ("Abyssinian", "american_bulldog") for i in range(1, 11)]
    write_images([os.path.join(d, "images", n + ".jpg") for n in names])
    write_lines(os.path.join(d, "annotations", "trainval.txt"),
                [f"{n} {1 + n.startswith('american')} 1 1" for n in names[:8] + names[10:18]])
    write_lines(os.path.join(d, "annotations", "test.txt"), [f"{n} {1 + n.startswith('american')} 1 1"
                                                          for n in names[8:10] + names[18:]])
    ds = load_dataset("oxford_pets", str(tmp_path), log=quiet)
    assert ds.classnames == ["abyssinian", "american bulldog"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 4)  # trainval 80 / 20 per class
    assert (os.path.join(d, "images", "american_bulldog_9.jpg"), 1) in ds.test


def test_sun397_raw(tmp_path):
    d = os.path.join(tmp_path, "sun397")
    classes = ["/a/abbey", "/a/apartment_building/outdoor"]
    paths = {c: [f"{c}/sun_{i}.jpg" for i in range(6)] for c in classes}
    write_images([os.path.join(d, "SUN397", p[1:]) for ps in paths.values() for p in ps])
    write_lines(os.path.join(d, "ClassName.txt"), classes)
    write_lines(os.path.join(d, "Training_01.txt"), [p for ps in paths.values() for p in ps[:5]])
    write_lines(os.path.join(d, "Testing_01.txt"), [p for ps in paths.values() for p in ps[5:]])
    logs = []
    ds = load_dataset("sun397", str(tmp_path), log=logs.append)
    assert ds.classnames == ["abbey", "outdoor apartment building"] and "NOT comparable" in logs[0]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 2, 2)


def test_ucf101_raw(tmp_path):
    d = os.path.join(tmp_path, "ucf101")
    write_lines(os.path.join(d, "ucfTrainTestlist", "classInd.txt"), ["1 ApplyEyeMakeup", "2 Archery"])
    videos = {a: [f"{a}/v_{a}_g{i:02d}_c01.avi" for i in range(6)] for a in ("ApplyEyeMakeup", "Archery")}
    write_lines(os.path.join(d, "ucfTrainTestlist", "trainlist01.txt"),
                [f"{v} {y + 1}" for y, vs in enumerate(videos.values()) for v in vs[:5]])
    write_lines(os.path.join(d, "ucfTrainTestlist", "testlist01.txt"), [vs[5] for vs in videos.values()])
    write_images([os.path.join(d, "UCF-101-midframes", f, f"v_{a}_g{i:02d}_c01.jpg")
                  for a, f in (("ApplyEyeMakeup", "Apply_Eye_Makeup"), ("Archery", "Archery")) for i in range(6)])
    ds = load_dataset("ucf101", str(tmp_path), log=quiet)
    assert ds.classnames == ["Apply Eye Makeup", "Archery"]
    assert ds.test[0] == (os.path.join(d, "UCF-101-midframes", "Apply_Eye_Makeup", "v_ApplyEyeMakeup_g05_c01.jpg"), 0)


def test_fgvc_aircraft(tmp_path):
    d = os.path.join(tmp_path, "fgvc_aircraft")
    write_lines(os.path.join(d, "variants.txt"), ["707-320", "A300B4", "Cessna 172"])
    ids = {s: [f"{s[:2]}{i}" for i in range(6)] for s in ("train", "val", "test")}
    for s in ids:
        write_lines(os.path.join(d, f"images_variant_{s}.txt"),
                    [f"{i} {['Cessna 172', '707-320', 'A300B4'][k % 3]}" for k, i in enumerate(ids[s])])
    write_images([os.path.join(d, "images", i + ".jpg") for s in ids.values() for i in s])
    logs = []
    ds = load_dataset("fgvc_aircraft", str(tmp_path), shots=1, seed=1, log=logs.append)
    assert ds.classnames == ["707-320", "A300B4", "Cessna 172"] and "warning" not in " ".join(logs)
    assert ds.test[0] == (os.path.join(d, "images", "te0.jpg"), 2)
    assert sorted(y for _, y in ds.train) == [0, 1, 2]


@pytest.mark.parametrize("name", [n for n, spec in data.DATASETS.items() if "split" in spec])
def test_every_split_file_layout_loads(tmp_path, name):
    spec = data.DATASETS[name]
    d = os.path.join(tmp_path, spec["folder"])
    split = {s: [[f"c{y}/{s}{i}.jpg", y, f"class_{y}"] for y in range(2) for i in range(3)]
             for s in ("train", "val", "test")}
    if name == "stanford_cars":  # paths relative to the dataset folder
        split = {s: [[f"cars_{s}/{y}{i}.jpg", y, c] for (_, y, c), i in zip(items, range(9))]
                 for s, items in split.items()}
    write_images([os.path.join(d, spec["images"], p) for items in split.values() for p, _, _ in items])
    with open(os.path.join(d, spec["split"]), "w") as f:
        json.dump(split, f)
    ds = load_dataset(name, str(tmp_path), shots=2, seed=3, log=quiet)
    assert ds.classnames == ["class 0", "class 1"] and len(ds.train) == 4 and len(ds.test) == 6
    assert all(os.path.isfile(p) for p, _ in ds.train + ds.val + ds.test)


# ----------------------------------------------------------------------------------------------------------------------
# ImageNet and its test-only variants

WNIDS = ["n01443537", "n01440764", "n12267677"]  # goldfish, tench, acorn (created unsorted)
SUNGLASSES = ["n04355933", "n04356056"]  # ImageNet labels 836 and 837, both named "sunglasses"


def test_imagenet_builtin_names():
    assert len(data.IMAGENET_CLASSNAMES) == len(set(data.IMAGENET_WNIDS)) == 1000
    assert data.IMAGENET_WNIDS == sorted(data.IMAGENET_WNIDS)
    assert data.IMAGENET_CLASSNAMES[:3] == ["tench", "goldfish", "great white shark"]
    assert data.IMAGENET_CLASSNAMES[data.IMAGENET_WNIDS.index("n02123045")] == "tabby cat"
    assert [data.IMAGENET_WNIDS.index(w) for w in SUNGLASSES] == [836, 837]
    assert data.IMAGENET_CLASSNAMES[836] == data.IMAGENET_CLASSNAMES[837] == "sunglasses"


def test_imagenet_class_ids_tell_duplicate_names_apart(tmp_path):
    images = os.path.join(tmp_path, "imagenet", "images")
    write_images([os.path.join(images, s, w, f"{i}.JPEG") for s in ("train", "val") for w in WNIDS + SUNGLASSES
                  for i in range(2)])
    ds = load_dataset("imagenet", str(tmp_path), log=quiet)
    assert ds.classnames == ["tench", "goldfish", "sunglasses", "sunglasses", "acorn"]
    assert ds.class_ids == ["n01440764", "n01443537", *SUNGLASSES, "n12267677"]  # the wnid folders, label order
    base = load_dataset("imagenet", str(tmp_path), subsample="base", log=quiet)  # ceil(5/2) = 3 base classes
    new = load_dataset("imagenet", str(tmp_path), subsample="new", log=quiet)
    assert base.class_ids == ds.class_ids[:3] and base.classnames == ds.classnames[:3]
    assert new.class_ids == [SUNGLASSES[1], "n12267677"] and new.classnames == ["sunglasses", "acorn"]


def test_imagenet(tmp_path):
    images = os.path.join(tmp_path, "imagenet", "images")
    write_images([os.path.join(images, s, w, f"{w}_{i}.JPEG") for s in ("train", "val") for w in WNIDS for i in range(3)])
    ds = load_dataset("imagenet", str(tmp_path), shots=2, seed=1, log=quiet)
    assert ds.classnames == ["tench", "goldfish", "acorn"] and ds.val == []
    assert ds.test[0] == (os.path.join(images, "val", "n01440764", "n01440764_0.JPEG"), 0)
    assert len(ds.train) == 6 and len(ds.test) == 9
    write_lines(os.path.join(tmp_path, "imagenet", "classnames.txt"),
                ["n01440764 tench fish", "n01443537 gold fish", "n12267677 acorn"])
    assert load_dataset("imagenet", str(tmp_path), log=quiet).classnames == ["tench fish", "gold fish", "acorn"]


def test_imagenet_flat_val_folder(tmp_path):
    images = os.path.join(tmp_path, "imagenet", "images")
    write_images([os.path.join(images, "train", w, "a.JPEG") for w in WNIDS])
    write_images([os.path.join(images, "val", f"ILSVRC2012_val_0000000{i}.JPEG") for i in range(1, 4)])
    with pytest.raises(DataError, match="valprep.sh") as e:
        load_dataset("imagenet", str(tmp_path), log=quiet)
    assert os.path.join(images, "val") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,folder,images", [("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                                                ("imagenet_r", "imagenet-rendition", "imagenet-r"),
                                                ("imagenet_sketch", "imagenet-sketch", "images")])
def test_imagenet_wnid_test_sets(tmp_path, name, folder, images):
    image_dir = os.path.join(tmp_path, folder, images)
    write_images([os.path.join(image_dir, w, f"{i}.jpg") for w in WNIDS for i in range(2)])
    write_lines(os.path.join(image_dir, "README.txt"), ["not a class"])
    ds = load_dataset(name, str(tmp_path), shots=16, seed=1, log=quiet)
    assert ds.classnames == ["tench", "goldfish", "acorn"]  # own labels 0..k-1 over the sorted wnid folders
    assert ds.train == [] and ds.val == [] and [y for _, y in ds.test] == [0, 0, 1, 1, 2, 2]
    assert ds.class_ids == sorted(WNIDS)  # their folders' wnids


def test_imagenetv2(tmp_path):
    image_dir = os.path.join(tmp_path, "imagenetv2", "imagenetv2-matched-frequency-format-val")
    write_images([os.path.join(image_dir, str(y), f"{i}.jpeg") for y in (999, 0, 1) for i in range(2)])
    with pytest.raises(DataError, match="imagenetv2: no image has label 2 "):  # a partial download
        load_dataset("imagenetv2", str(tmp_path), log=quiet)
    write_images([os.path.join(image_dir, str(y), "0.jpeg") for y in range(2, 999)])
    ds = load_dataset("imagenetv2", str(tmp_path), log=quiet)
    assert [y for _, y in ds.test[:5]] == [0, 0, 1, 1, 2] and ds.test[-1][1] == 999  # label = folder number
    assert ds.classnames == data.IMAGENET_CLASSNAMES
    assert ds.class_ids == data.IMAGENET_WNIDS and ds.class_ids[836:838] == SUNGLASSES  # ImageNet's id of each label
    new = load_dataset("imagenetv2", str(tmp_path), subsample="new", log=quiet)  # base/new from the test labels
    assert new.classnames == data.IMAGENET_CLASSNAMES[500:] and (new.test[0][1], new.test[-1][1]) == (0, 499)
    assert new.class_ids == data.IMAGENET_WNIDS[500:]
    names = [f"{w} class {i}" for i, w in enumerate(data.IMAGENET_WNIDS[::-1])]  # classnames.txt: its order rules
    write_lines(os.path.join(tmp_path, "imagenetv2", "classnames.txt"), names)
    ds = load_dataset("imagenetv2", str(tmp_path), log=quiet)
    assert ds.class_ids == data.IMAGENET_WNIDS[::-1] and ds.classnames[:2] == ["class 0", "class 1"]


# ----------------------------------------------------------------------------------------------------------------------
# Custom folders

def test_custom_folder(tmp_path):
    write_images([os.path.join(tmp_path, s, c, f"{i}.png") for s in ("train", "test")
                  for c in ("golden_retriever", "cat") for i in range(5)])
    ds = load_dataset(f"folder:{tmp_path}", None, shots=2, seed=1, log=quiet)
    assert ds.classnames == ["cat", "golden retriever"] and ds.val == []
    assert len(ds.train) == 4 and len(ds.test) == 10
    write_images([os.path.join(tmp_path, "val", "cat", "v.png"), os.path.join(tmp_path, "test", "dog", "d.png")])
    with pytest.raises(DataError, match="dog.*missing from"):
        load_dataset(f"folder:{tmp_path}", None, log=quiet)


# ----------------------------------------------------------------------------------------------------------------------
# Transforms and the loader

def test_transforms_shapes_and_normalisation():
    image = Image.new("RGB", (64, 48), (255, 128, 0))
    x = data.test_transform(32)(image)
    mean, std = torch.tensor(data.CLIP_MEAN)[:, None, None], torch.tensor(data.CLIP_STD)[:, None, None]
    expected = (torch.tensor([255, 128, 0.])[:, None, None] / 255 - mean) / std
    assert x.shape == (3, 32, 32) and torch.allclose(x, expected.expand(3, 32, 32), atol=1e-5)
    torch.manual_seed(0)
    y = train_transform(32)(image)
    assert y.shape == (3, 32, 32) and torch.allclose(y, expected.expand(3, 32, 32), atol=1e-5)
    assert "RandomResizedCrop" in repr(train_transform(32)) and "scale=(0.08, 1.0)" in repr(train_transform(32))


@pytest.fixture(scope="module")
def noise_items(tmp_path_factory):
    """11 images of random pixels (so that every crop and flip shows), each labelled with its index: the labels of a
    batch say which items it holds."""
    folder = tmp_path_factory.mktemp("noise")
    items = [(os.path.join(folder, f"{i}.png"), i) for i in range(11)]
    for path, i in items:
        Image.frombytes("RGB", (12, 12), random.Random(i).randbytes(12 * 12 * 3)).save(path)
    return items


def run_epochs(loader, epochs, global_seeds):
    """[[(images, labels) per batch] per epoch], with the global torch RNG seeded to something else before each epoch;
    asserts that loading leaves the global RNG as it found it."""
    out = []
    for epoch, global_seed in zip(epochs, global_seeds):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        loader.sampler.set_epoch(epoch)
        out.append([(x, y) for x, y in loader])
        assert torch.equal(torch.get_rng_state(), state)  # neither read nor advanced
    return out


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_loader_batches_and_cache_equality(noise_items):
    logs = []
    cached = make_loader(noise_items, train_transform(8), 4, train=True, seed=5, workers=0, log=logs.append)
    assert cached.dataset.images is not None and "decoded once into RAM" in logs[0]
    disk = make_loader(noise_items, train_transform(8), 4, train=True, seed=5, workers=0, cache_images=False)
    assert disk.dataset.images is None
    a, b = run_epochs(cached, [0], [0])[0], run_epochs(disk, [0], [1])[0]
    assert len(a) == 2 and a[0][0].shape == (4, 3, 8, 8) and same_batches(a, b)  # drop_last: 11 // 4
    seeded = make_loader(noise_items, train_transform(8), 4, train=False, seed=5, workers=0, log=quiet)
    assert seeded.dataset.images is not None  # any seeded loader is decoded once
    test = make_loader(noise_items, data.test_transform(8), 4, train=False, workers=0)
    assert test.dataset.images is None and [ys.tolist() for _, ys in test] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    with pytest.raises(ValueError, match="needs a seed"):
        make_loader(noise_items, train_transform(8), 4, train=True, workers=0)


def test_epochs_are_pure_functions_of_seed_and_epoch_whatever_the_workers(noise_items):
    """Epochs 0 and 1 are the same batches, bit for bit, with 0, 1 or 2 workers and whatever the global RNG holds
    (it is seeded differently before every epoch of every run), which it leaves untouched."""
    runs = []
    for workers in (0, 1, 2):
        loader = make_loader(noise_items, train_transform(8), 4, train=True, seed=5, workers=workers, log=quiet)
        runs.append(run_epochs(loader, [0, 1], [10 * workers, 10 * workers + 1]))
    for run in runs[1:]:
        assert same_batches(run[0], runs[0][0]) and same_batches(run[1], runs[0][1])


def test_order_and_augmentation_change_with_epoch_and_seed(noise_items):
    assert data.augmentation_seed(1, 0, 0) == 9176422400804903422  # blake2b: the same on every platform and Python
    seeds = {data.augmentation_seed(s, e, i) for s in (5, 6) for e in (0, 1) for i in range(11)}
    assert len(seeds) == 44 and all(0 <= x < 2**63 for x in seeds)
    order = data.epoch_order(11, 5, 0)
    assert sorted(order) == list(range(11)) and order == data.epoch_order(11, 5, 0)
    assert order != data.epoch_order(11, 5, 1) and order != data.epoch_order(11, 6, 0)

    def images(seed, epoch):  # (11, 3, 8, 8) in index order
        loader = make_loader(noise_items, train_transform(8), 11, train=False, seed=seed, workers=0, log=quiet)
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))[0]
    x = images(5, 0)
    assert torch.equal(x, images(5, 0))
    for other in (images(5, 1), images(6, 0)):  # every image augmented differently
        assert (x != other).flatten(1).any(1).all()


def test_seeded_eval_loader_yields_the_training_images_by_index(noise_items):
    """train=False, seed=s: item i is, bit for bit, the image the train loader yields for item i in that epoch."""
    train = make_loader(noise_items, train_transform(8), 4, train=True, seed=5, workers=0, log=quiet)
    by_index = make_loader(noise_items, train_transform(8), 4, train=False, seed=5, workers=2, log=quiet)
    for epoch in (0, 1):
        (batches,), (indexed,) = run_epochs(train, [epoch], [0]), run_epochs(by_index, [epoch], [1])
        x_train = torch.cat([x for x, _ in batches])  # (8, 3, 8, 8): items epoch_order[:8], the last 3 dropped
        x_all, y_all = (torch.cat(t) for t in zip(*indexed))  # (11, 3, 8, 8), (11,): every item, in index order
        assert y_all.tolist() == list(range(11))
        assert torch.equal(x_train, x_all[data.epoch_order(11, 5, epoch)[:8]])


def test_batches_are_chunks_of_epoch_order_with_dassl_drop_last(noise_items):
    order = data.epoch_order(11, 5, 3)
    for batch_size, expected in ((4, [order[:4], order[4:8]]), (11, [order]), (32, [order])):  # 32 > 11: keep all
        loader = make_loader(noise_items, train_transform(8), batch_size, train=True, seed=5, workers=0, log=quiet)
        loader.sampler.set_epoch(3)
        assert [ys.tolist() for _, ys in loader] == expected
    loader = make_loader(noise_items, train_transform(8), 4, train=False, seed=5, workers=0, log=quiet)
    loader.sampler.set_epoch(3)
    assert [ys.tolist() for _, ys in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]  # in order, none dropped


def test_transform_key_is_the_same_in_every_process(fresh_process):
    keys = [data.transform_key(data.test_transform(224)), data.transform_key(data.train_transform(224))]
    assert json.loads(fresh_process.stderr.splitlines()[0]) == keys
    assert "<function _to_rgb>" in keys[0] and " at 0x" not in keys[0] + keys[1]
    assert data.transform_key(data.test_transform(32)) != keys[0]
    assert data.transform_key(data.train_transform(32)) != keys[1]


# ----------------------------------------------------------------------------------------------------------------------
# Errors: one line each, naming the path and what to do

def test_error_messages(tmp_path, dtd_root):
    def error(**kwargs):
        with pytest.raises(DataError) as e:
            load_dataset(**{"root": str(tmp_path), "log": quiet, **kwargs})
        assert "\n" not in str(e.value)
        return str(e.value)
    msg = error(name="dtdd")
    assert "did you mean 'dtd'?" in msg and "imagenet_r" in msg and "folder:/path" in msg
    msg = error(name="dtd")
    assert os.path.join(str(tmp_path), "dtd", "images") in msg and "--download" in msg
    assert "hendrycks" in error(name="imagenet_a") and "--download" not in error(name="imagenet_a")
    write_images([os.path.join(tmp_path, "stanford_cars", "cars_train", "1.jpg")])
    assert "split_zhou_StanfordCars.json not found" in error(name="stanford_cars")
    write_images([os.path.join(tmp_path, "oxford_flowers", "jpg", "image_00001.jpg")])
    assert ".mat" in error(name="oxford_flowers")
    assert "shots" in error(name="dtd", root=dtd_root, shots=-1)
    assert "subsample" in error(name="dtd", root=dtd_root, subsample="old")
    assert "train/<class>/" in error(name=f"folder:{tmp_path}")


def test_corrupt_images_are_named(tmp_path, dtd_root):
    bad = os.path.join(tmp_path, "bad.jpg")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg at all")
    truncated = os.path.join(tmp_path, "truncated.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated, quality=95)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    for path in (bad, truncated):
        with pytest.raises(DataError, match=f"cannot read image {path}"):
            data.load_image(path)
    items = dtd_split(dtd_root)["test"][:3] + [(bad, 0)]
    for workers in (0, 1):  # a worker's re-raised error is still one line
        with pytest.raises(DataError) as e:
            list(make_loader(items, data.test_transform(8), 4, train=False, workers=workers))
        assert str(e.value).startswith(f"cannot read image {bad}") and "\n" not in str(e.value)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        make_loader(items, train_transform(8), 2, train=True, seed=1, workers=0, log=quiet)  # decoded up front


def load_error(*args, **kwargs):
    """The DataError load_dataset raises, checked to be one line."""
    with pytest.raises(DataError) as e:
        load_dataset(*args, log=quiet, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def write_split(root, split, images=True):
    """A DTD split file (paths relative to dtd/images/) and, if asked, its images."""
    os.makedirs(os.path.join(root, "dtd", "images"), exist_ok=True)
    path = os.path.join(root, "dtd", "split_zhou_DescribableTextures.json")
    with open(path, "w") as f:
        f.write(split if isinstance(split, str) else json.dumps(split))
    if images:
        write_images([os.path.join(root, "dtd", "images", e[0]) for s in split.values() for e in s])
    return path


def small_split(n=4):
    return {s: [[f"c{y}/{s}{i}.jpg", y, f"c{y}"] for y in range(2) for i in range(n)] for s in ("train", "val", "test")}


def test_every_returned_image_is_checked(tmp_path):
    root, split = str(tmp_path), small_split()
    write_split(root, split)
    image = os.path.join(root, "dtd", "images", "c1", "test{}.jpg")
    os.remove(image.format(2)), os.remove(image.format(3))  # neither is the first test image (all CoOp checked)
    msg = load_error("dtd", root)
    assert msg.startswith(f"dtd: 2 of the 8 test images are missing, the first is {image.format(2)}: ")
    assert len(load_dataset("dtd", root, check_splits=(), log=quiet).test) == 8
    assert len(load_dataset("dtd", root, check_splits=("train", "val"), log=quiet).test) == 8  # test unchecked
    one_shot = load_dataset("dtd", root, shots=1, check_splits=(), log=quiet).train
    for path, _ in set(load_dataset("dtd", root, check_splits=(), log=quiet).train) - set(one_shot):
        os.remove(path)  # images outside the few-shot subset are not needed
    write_images([image.format(2), image.format(3)])
    assert load_dataset("dtd", root, shots=1, log=quiet).train == one_shot
    assert "dtd: 6 of the 8 train images are missing" in load_error("dtd", root)


@pytest.mark.parametrize("content,expected", [
    ("{not json", "is not valid JSON"),
    ([["a.jpg", 0, "a"]], "holds a JSON list"),
    ({"train": [], "test": []}, 'has no "val" list'),
    ({"train": [["c0/a.jpg", 0, "c0"], ["c0/b.jpg", "1", "c0"]], "val": [], "test": []}, '"train"[1] is ["c0/b.jpg"'),
    ({"train": [], "val": [], "test": [["c0/a.jpg", 0]]}, '"test"[0] is ["c0/a.jpg", 0], not [path, label'),
    ({"train": [], "val": [], "test": [["c0/a.jpg", -1, "c0"]]}, '"test"[0] is'),
])
def test_malformed_split_file(tmp_path, content, expected):
    path = write_split(str(tmp_path), json.dumps(content) if not isinstance(content, str) else content, images=False)
    msg = load_error("dtd", str(tmp_path))
    assert msg.startswith(path) and expected in msg and "DATASETS.md" in msg


def test_empty_test_split_and_untrained_class(tmp_path):
    split = small_split()
    write_split(str(tmp_path), {**split, "test": []})
    assert load_error("dtd", str(tmp_path)).startswith("dtd: the test split is empty")
    write_split(str(tmp_path), {**split, "train": split["train"][:4]})  # class 1 in val and test only
    assert load_error("dtd", str(tmp_path)).startswith("dtd: class 1 ('c1') has no training images")


def write_raw(d, files, images):
    for name, lines in files.items():
        write_lines(os.path.join(d, name), lines)
    write_images([os.path.join(d, images, "x.jpg")])


@pytest.mark.parametrize("name,files,images,bad,expected", [
    ("fgvc_aircraft", {"variants.txt": ["707-320", "A300B4"], "images_variant_train.txt": ["1 707-320", "2 A380"]},
     "images", "images_variant_train.txt", "line '2 A380' has variant 'A380', not in "),
    ("oxford_pets", {"annotations/trainval.txt": ["Abyssinian_1 1 1 1", "Abyssinian_2 one 1 1"]}, "images",
     "annotations/trainval.txt", "line 'Abyssinian_2 one 1 1' is not"),
    ("sun397", {"ClassName.txt": ["/a/abbey"], "Training_01.txt": ["/a/abbey/sun_1.jpg", "/b/bar/sun_2.jpg"]},
     "SUN397", "Training_01.txt", "line '/b/bar/sun_2.jpg' has class '/b/bar', not in "),
    ("ucf101", {"ucfTrainTestlist/classInd.txt": ["1 Archery"],
                "ucfTrainTestlist/trainlist01.txt": ["Archery/v_Archery_g01_c01.avi 1",
                                                     "Bowling/v_Bowling_g01_c01.avi 2"]},
     "UCF-101-midframes", "ucfTrainTestlist/trainlist01.txt",
     "line 'Bowling/v_Bowling_g01_c01.avi 2' has action 'Bowling', not in "),
])
def test_raw_files_with_unknown_classes(tmp_path, name, files, images, bad, expected):
    d = os.path.join(tmp_path, data.DATASETS[name]["folder"])
    write_raw(d, files, images)
    msg = load_error(name, str(tmp_path))
    assert msg.startswith(f"{os.path.join(d, bad)}: {expected}")


def test_custom_folder_errors(tmp_path):
    write_images([os.path.join(tmp_path, s, "cat", "0.png") for s in ("train", "test")])
    assert "needs at least 2 classes" in load_error(f"folder:{tmp_path}", None)
    os.makedirs(os.path.join(tmp_path, "train", "zebra"))  # the last class: labels used to come from the images
    write_images([os.path.join(tmp_path, "test", "zebra", "0.png")])
    msg = load_error(f"folder:{tmp_path}", None)
    assert msg.startswith(f"{os.path.join(tmp_path, 'train', 'zebra')} holds no images")


def test_decompression_bombs_are_named(tmp_path, monkeypatch):
    path = os.path.join(tmp_path, "bomb.png")
    write_images([path])  # 64 pixels, over 2 * MAX_IMAGE_PIXELS below: PIL raises DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    for fn in (data.load_image, data.rgb_bytes):
        with pytest.raises(DataError, match=f"cannot read image {path}: .*MAX_IMAGE_PIXELS") as e:
            fn(path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("args,expected", [(["--n-px", "0"], "--n-px must be a positive"),
                                           (["--n-px", "-32"], "--n-px must be a positive"),
                                           (["--shots", "-1"], "shots must be >= 1"),
                                           (["--subsample", "old"], "subsample must be all, base or new")])
def test_cli_rejects_bad_arguments(dtd_root, monkeypatch, capsys, args, expected):
    monkeypatch.setattr(sys, "argv", ["data.py", "--dataset", "dtd", "--root", dtd_root, *args])
    with pytest.raises(SystemExit) as e:
        data.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1


def test_cli_summary_and_error_exit(dtd_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["data.py", "--dataset", "dtd", "--root", dtd_root, "--shots", "2",
                                      "--subsample", "base", "--n-px", "32"])
    data.main()
    out = capsys.readouterr().out
    assert "dtd: 2 classes, train 4 / val 4 / test 8" in out and "classes: banded, blotchy" in out
    assert "RandomResizedCrop(size=(32, 32)" in out and "CenterCrop(size=(32, 32))" in out
    monkeypatch.setattr(sys, "argv", ["data.py", "--dataset", "food-101", "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        data.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: unknown dataset 'food-101' (did you mean 'food101'?)")
    assert err.count("\n") == 1
