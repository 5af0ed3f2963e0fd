"""Datasets of CoOp/CoCoOp and UPT read from CoOp's on-disk layout, Dassl's few-shot sampling (the same subset for the
same dataset, shots and seed), CLIP's transforms and one fast DataLoader. `python data.py --dataset dtd --root DATA`
prints what train.py will see; `--list-fewshot` prints the sampled training images.
"""
import argparse
import difflib
import hashlib
import http.client
import json
import math
import os
import random
import re
import sys
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from clip_model import CLIP_MEAN, CLIP_STD, image_transform

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
RAW_SPLIT_SEED = 0  # seeds the split built from raw files when CoOp's split file is absent (CoOp: the run's seed)
CACHE_BUDGET = 4 * 2**30  # bytes of decoded RGB pixels a training set may keep in RAM (make_loader, cache_images=None)


class DataError(Exception):
    """A one-line, user-facing data problem: train.py and `python data.py` print it and exit with code 2."""

    def __init__(self, msg):
        # a DataLoader worker re-raises it with the worker's traceback in the message: keep the last line only
        super().__init__(re.sub(r"^[\w.]*DataError: ", "", str(msg).strip().splitlines()[-1]))


@dataclass
class Dataset:
    """What train.py needs: items are (absolute image path, label), classnames[label] is the text CLIP reads and
    class_ids[label] names the class uniquely (ImageNet's names are not unique: two 'missile', two 'sunglasses')."""
    name: str
    classnames: list[str]
    class_ids: list[str]  # the WordNet id for ImageNet and its variants, else the class name
    train: list[tuple[str, int]]  # the few-shot subset when shots > 0; empty for the test-only ImageNet variants
    val: list[tuple[str, int]]    # min(shots, 4) per class when shots > 0; empty for ImageNet (CoOp evaluates on test)
    test: list[tuple[str, int]]


# ----------------------------------------------------------------------------------------------------------------------
# Readers of CoOp's layouts. Each takes (dataset folder d, its image folder, a seeded random.Random) and returns
# train, val, test as lists of (absolute path, label, classname), in the order CoOp lists them; the readers of
# ImageNet and its variants add the class's wnid: (absolute path, label, classname, wnid).

def listdir(path, dirs):
    """Sorted non-hidden sub-folders (dirs=True) or files (dirs=False): Dassl's listdir_nohidden, sorted on every OS."""
    return sorted(e.name for e in os.scandir(path) if not e.name.startswith(".") and e.is_dir() == dirs)


def read_lines(path, hint):
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: {hint}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def bad_line(file, line, why):
    return DataError(f"{file}: line '{line}' {why}: damaged or mismatched files? (layouts: {COOP_DATASETS_MD})")


def split_entry_ok(entry):
    return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and type(entry[1]) is int
            and entry[1] >= 0 and isinstance(entry[2], str))


def read_split_json(path, image_dir):
    """CoOp's split_zhou_<Name>.json: {"train"|"val"|"test": [[path relative to image_dir, label, classname], ...]}."""
    fix = f"delete it and pass --download, or get it again from CoOp's DATASETS.md ({COOP_DATASETS_MD})"
    try:
        with open(path, encoding="utf-8") as f:
            split = json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(split, dict):
        raise DataError(f"{path} holds a JSON {type(split).__name__}, not {{\"train\", \"val\", \"test\"}}: {fix}")
    for s in ("train", "val", "test"):
        if not isinstance(split.get(s), list):
            raise DataError(f"{path} has no \"{s}\" list: {fix}")
        for k, entry in enumerate(split[s]):
            if not split_entry_ok(entry):
                raise DataError(f"{path}: \"{s}\"[{k}] is {json.dumps(entry)[:80]}, not [path, label >= 0, "
                                f"classname]: {fix}")
    return [[(os.path.join(image_dir, p), y, c) for p, y, c in split[s]] for s in ("train", "val", "test")]


def split_class_folders(d, image_dir, rng, ignored=(), renames={}, p_train=0.5, p_val=0.2):
    """CoOp's DTD.read_and_split_data: each <class>/ folder shuffled, first 50% train, next 20% val, the rest test."""
    train, val, test = [], [], []
    for label, folder in enumerate(f for f in listdir(image_dir, dirs=True) if f not in ignored):
        paths = [os.path.join(image_dir, folder, f) for f in listdir(os.path.join(image_dir, folder), dirs=False)]
        rng.shuffle(paths)
        n_train, n_val = round(len(paths) * p_train), round(len(paths) * p_val)
        name = renames.get(folder, folder)
        train += [(p, label, name) for p in paths[:n_train]]
        val += [(p, label, name) for p in paths[n_train:n_train + n_val]]
        test += [(p, label, name) for p in paths[n_train + n_val:]]
    return train, val, test


def split_trainval(trainval, rng, p_val=0.2):
    """CoOp's OxfordPets.split_trainval: each class shuffled, the first 20% go to val, the rest to train."""
    by_label = defaultdict(list)
    for item in trainval:
        by_label[item[1]].append(item)
    train, val = [], []
    for items in by_label.values():
        rng.shuffle(items)
        n_val = round(len(items) * p_val)
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def read_pets(d, image_dir, rng):
    hint = f"get annotations.tar.gz (robots.ox.ac.uk/~vgg/data/pets) or split_zhou_OxfordPets.json ({COOP_DATASETS_MD})"

    def read(file):  # "Abyssinian_100 1 1 1": image, 1-based class id, species, breed id; class = lowercased breed
        path, items = os.path.join(d, "annotations", file), []
        for line in read_lines(path, hint):
            image, label = (line.split() + ["", ""])[:2]
            if not label.isdigit() or int(label) < 1:
                raise bad_line(path, line, "is not '<image> <class id from 1> <species> <breed id>'")
            items.append((os.path.join(image_dir, image + ".jpg"), int(label) - 1, image.rsplit("_", 1)[0].lower()))
        return items
    train, val = split_trainval(read("trainval.txt"), rng)
    return train, val, read("test.txt")


def read_sun397(d, image_dir, rng):
    hint = f"get Partitions.zip (vision.princeton.edu/projects/2010/SUN) or split_zhou_SUN397.json ({COOP_DATASETS_MD})"
    class_file = os.path.join(d, "ClassName.txt")
    label_of = {c[1:]: i for i, c in enumerate(read_lines(class_file, hint))}  # "/a/abbey"

    def read(file):  # "/a/apartment_building/outdoor/sun_x.jpg" -> class "outdoor apartment_building"
        items = []
        for line in read_lines(os.path.join(d, file), hint):
            c = os.path.dirname(line[1:])
            if c not in label_of:
                raise bad_line(os.path.join(d, file), line, f"has class '/{c}', not in {class_file}")
            items.append((os.path.join(image_dir, line[1:]), label_of[c], " ".join(c.split("/")[1:][::-1])))
        return items
    train, val = split_trainval(read("Training_01.txt"), rng)
    return train, val, read("Testing_01.txt")


def read_ucf101(d, image_dir, rng):
    hint = f"get UCF101's ucfTrainTestlist/ or split_zhou_UCF101.json ({COOP_DATASETS_MD})"
    lists = os.path.join(d, "ucfTrainTestlist")
    class_file = os.path.join(lists, "classInd.txt")
    label_of = {}
    for line in read_lines(class_file, hint):  # "1 ApplyEyeMakeup"
        y, action = (line.split() + ["", ""])[:2]
        if not y.isdigit() or int(y) < 1 or not action:
            raise bad_line(class_file, line, "is not '<class id from 1> <Action>'")
        label_of[action] = int(y) - 1

    def read(file):  # "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1" -> UCF-101-midframes/Apply_Eye_Makeup/<video>.jpg
        items = []
        for line in read_lines(os.path.join(lists, file), hint):
            action, _, video = line.split()[0].partition("/")
            if action not in label_of or not video:
                raise bad_line(os.path.join(lists, file), line, f"has action '{action}', not in {class_file}")
            folder = "_".join(re.findall("[A-Z][^A-Z]*", action))
            items.append((os.path.join(image_dir, folder, video.replace(".avi", ".jpg")), label_of[action], folder))
        return items
    train, val = split_trainval(read("trainlist01.txt"), rng)
    return train, val, read("testlist01.txt")


def read_aircraft(d, image_dir, rng):
    """FGVCAircraft's own split: label = line of variants.txt, images_variant_<split>.txt = "1025794 707-320" lines."""
    hint = "fgvc_aircraft/ is the data/ folder of fgvc-aircraft-2013b.tar.gz (robots.ox.ac.uk/~vgg/data/fgvc-aircraft)"
    variants = os.path.join(d, "variants.txt")
    label_of = {v: i for i, v in enumerate(read_lines(variants, hint))}

    def read(split):
        path, items = os.path.join(d, f"images_variant_{split}.txt"), []
        for line in read_lines(path, hint):
            image, _, variant = line.partition(" ")
            if variant not in label_of:
                raise bad_line(path, line, f"has variant '{variant}', not in {variants}")
            items.append((os.path.join(image_dir, image + ".jpg"), label_of[variant], variant))
        return items
    return read("train"), read("val"), read("test")


def imagenet_names(d):
    """wnid -> class name: CoOp's classnames.txt ("n01440764 tench" per line) when present, else CLIP's list below."""
    path = os.path.join(d, "classnames.txt")
    if not os.path.isfile(path):
        return dict(zip(IMAGENET_WNIDS, IMAGENET_CLASSNAMES))
    return dict(line.split(" ", 1) for line in read_lines(path, ""))


def read_wnid_folders(image_dir, names):
    """<wnid>/<image> folders (ImageNet, -Sketch, -A, -R): label = index of the wnid among the sorted folders."""
    wnids = listdir(image_dir, dirs=True)
    for wnid in wnids:
        if wnid not in names:
            raise DataError(f"{os.path.join(image_dir, wnid)} is not an ImageNet class folder (no such wnid)")
    return [(os.path.join(image_dir, wnid, f), label, names[wnid], wnid)
            for label, wnid in enumerate(wnids) for f in listdir(os.path.join(image_dir, wnid), dirs=False)]


def read_imagenet(d, image_dir, rng):
    train_dir, val_dir = os.path.join(image_dir, "train"), os.path.join(image_dir, "val")
    for folder in (train_dir, val_dir):
        if not os.path.isdir(folder):
            raise DataError(f"{folder} not found: extract ILSVRC2012 into imagenet/images/{{train,val}}/<wnid>/")
    if listdir(val_dir, dirs=False) and not listdir(val_dir, dirs=True):
        raise DataError(f"{val_dir} is flat (no <wnid>/ folders): run valprep.sh inside it to sort the images "
                        "(https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh)")
    if listdir(train_dir, dirs=True) != listdir(val_dir, dirs=True):
        raise DataError(f"{train_dir} and {val_dir} hold different <wnid>/ class folders")
    names = imagenet_names(d)
    return read_wnid_folders(train_dir, names), [], read_wnid_folders(val_dir, names)


def read_imagenet_test_set(d, image_dir, rng):  # ImageNet-Sketch (1000 classes), -A and -R (200 classes, labels 0..199)
    return [], [], read_wnid_folders(image_dir, imagenet_names(d))


def read_imagenetv2(d, image_dir, rng):  # <0..999>/: label = folder number, wnid and name = that line of classnames.txt
    wnids, names = zip(*imagenet_names(d).items())
    return [], [], [(os.path.join(image_dir, str(y), f), y, names[y], wnids[y])
                    for y in sorted(map(int, listdir(image_dir, dirs=True)))
                    for f in listdir(os.path.join(image_dir, str(y)), dirs=False)]


def read_custom_folder(path):
    """`folder:/path`: train/<class>/*, test/<class>/* and optional val/<class>/*; classes = sorted train folders."""
    if not (os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test"))):
        raise DataError(f"{path} needs train/<class>/ and test/<class>/ image folders (val/<class>/ is optional)")
    train_dir = os.path.join(path, "train")
    label_of = {c: i for i, c in enumerate(listdir(train_dir, dirs=True))}
    if len(label_of) < 2:
        raise DataError(f"{path} needs at least 2 classes: {train_dir} holds {len(label_of)} <class>/ folder(s)")
    for c in label_of:
        if not listdir(os.path.join(train_dir, c), dirs=False):
            raise DataError(f"{os.path.join(train_dir, c)} holds no images: add some or remove the class folder")

    def read(split):
        split_dir = os.path.join(path, split)
        classes = listdir(split_dir, dirs=True) if os.path.isdir(split_dir) else []
        for c in classes:
            if c not in label_of:
                raise DataError(f"{os.path.join(split_dir, c)} is a class missing from {os.path.join(path, 'train')}")
        return [(os.path.join(split_dir, c, f), label_of[c], c)
                for c in classes for f in listdir(os.path.join(split_dir, c), dirs=False)]
    return read("train"), read("val"), read("test")


# ----------------------------------------------------------------------------------------------------------------------
# The datasets: CoOp config name -> folder under --root, its image folder, CoOp's split file, the reader used without
# it (or always, if there is none), where to get the files, and (torchvision class, its sub-folder) for --download

CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_RENAMES = {"AnnualCrop": "Annual Crop Land", "HerbaceousVegetation": "Herbaceous Vegetation Land",
                   "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
                   "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
                   "SeaLake": "Sea or Lake"}
DATASETS = {
    "imagenet": dict(folder="imagenet", images="images", read=read_imagenet,
                     get="ILSVRC2012 (image-net.org) as images/train/<wnid>/ and images/val/<wnid>/"),
    "caltech101": dict(folder="caltech-101", images="101_ObjectCategories", split="split_zhou_Caltech101.json",
                       read=partial(split_class_folders, ignored=("BACKGROUND_Google", "Faces_easy"),
                                    renames=CALTECH_RENAMES),
                       tv=("Caltech101", "caltech101"), get="101_ObjectCategories.tar.gz (data.caltech.edu)"),
    "oxford_pets": dict(folder="oxford_pets", images="images", split="split_zhou_OxfordPets.json", read=read_pets,
                        tv=("OxfordIIITPet", "oxford-iiit-pet"),
                        get="images.tar.gz and annotations.tar.gz (robots.ox.ac.uk/~vgg/data/pets)"),
    "stanford_cars": dict(folder="stanford_cars", images="", split="split_zhou_StanfordCars.json", read=None,
                          get="cars_train/, cars_test/ (the Stanford Cars mirror linked in CoOp's DATASETS.md)"),
    "oxford_flowers": dict(folder="oxford_flowers", images="jpg", split="split_zhou_OxfordFlowers.json", read=None,
                           tv=("Flowers102", "flowers-102"), get="102flowers.tgz (robots.ox.ac.uk/~vgg/data/flowers)"),
    "food101": dict(folder="food-101", images="images", split="split_zhou_Food101.json", read=split_class_folders,
                    tv=("Food101", "food-101"), get="food-101.tar.gz (data.vision.ee.ethz.ch/cvl/datasets_extra)"),
    "fgvc_aircraft": dict(folder="fgvc_aircraft", images="images", read=read_aircraft,
                          tv=("FGVCAircraft", "fgvc-aircraft-2013b/data"),
                          get="fgvc-aircraft-2013b.tar.gz (robots.ox.ac.uk/~vgg/data/fgvc-aircraft), its data/ folder"),
    "sun397": dict(folder="sun397", images="SUN397", split="split_zhou_SUN397.json", read=read_sun397,
                   tv=("SUN397", ""),
                   get="SUN397.tar.gz (vision.princeton.edu/projects/2010/SUN)"),
    "dtd": dict(folder="dtd", images="images", split="split_zhou_DescribableTextures.json", read=split_class_folders,
                tv=("DTD", "dtd/dtd"), get="dtd-r1.0.1.tar.gz (robots.ox.ac.uk/~vgg/data/dtd)"),
    "eurosat": dict(folder="eurosat", images="2750", split="split_zhou_EuroSAT.json",
                    read=partial(split_class_folders, renames=EUROSAT_RENAMES), tv=("EuroSAT", "eurosat"),
                    get="EuroSAT.zip, RGB (github.com/phelber/EuroSAT)"),
    "ucf101": dict(folder="ucf101", images="UCF-101-midframes", split="split_zhou_UCF101.json", read=read_ucf101,
                   get=f"UCF-101-midframes.zip (CoOp's DATASETS.md: {COOP_DATASETS_MD})"),
    "imagenetv2": dict(folder="imagenetv2", images="imagenetv2-matched-frequency-format-val", read=read_imagenetv2,
                       get="imagenetv2-matched-frequency.tar.gz (github.com/modestyachts/ImageNetV2)"),
    "imagenet_sketch": dict(folder="imagenet-sketch", images="images", read=read_imagenet_test_set,
                            get="ImageNet-Sketch (github.com/HaohanWang/ImageNet-Sketch), sketch/ renamed images/"),
    "imagenet_a": dict(folder="imagenet-adversarial", images="imagenet-a", read=read_imagenet_test_set,
                       get="imagenet-a.tar (github.com/hendrycks/natural-adv-examples)"),
    "imagenet_r": dict(folder="imagenet-rendition", images="imagenet-r", read=read_imagenet_test_set,
                       get="imagenet-r.tar (github.com/hendrycks/imagenet-r)"),
}


# CoOp's split files sit behind Google Drive (CoOp#29); nine of them are in a public, MIT-licensed GitHub repository,
# pinned here at one commit and checked by git blob id: sha1(b"blob <size>\0" + bytes), what `git hash-object` prints.
SPLITS_URL = ("https://raw.githubusercontent.com/linzhiqiu/cross_modal_adaptation/"
              "ac9077ee4e422f768c9b9109551468605e33ec9a/splits")
SPLIT_BLOB_IDS = {"split_zhou_Caltech101.json": "8be694a80de04a39fb159c462bea9696aa47ccf1",
                  "split_zhou_DescribableTextures.json": "8dd197a94b598fa44ee3c9e35c486dd017ab00a7",
                  "split_zhou_EuroSAT.json": "6bdc847a5d5c49dcc78e8cb8707b87198cbfa5a4",
                  "split_zhou_Food101.json": "39557040ee6501bd32aa8b5dfd75f7941a32f0a7",
                  "split_zhou_OxfordFlowers.json": "8d10037b0690b6c65e307a354b039efb0f42404c",
                  "split_zhou_OxfordPets.json": "fa821d9f9e7d32fdf3640bf74fa7491ed04f37da",
                  "split_zhou_SUN397.json": "8d5725db8f70bcf02245665304f863e68f96a24c",
                  "split_zhou_StanfordCars.json": "dcdb8264712e9940e74cfb0f06ddb8f9cc239b81",
                  "split_zhou_UCF101.json": "ea87e3de7b4f6f00fdd77618e34a23508b4c5590"}


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download_split(path, log):
    """Fetch CoOp's split file `path` (its name) from the pinned copy, check its git blob id, rename it into place."""
    name, folder = os.path.basename(path), os.path.dirname(path)
    url = f"{SPLITS_URL}/{name}"
    log(f"downloading {url} -> {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise DataError(f"could not download {name} from {url} ({e}): fetch it elsewhere and put it in {folder}") \
            from None
    if git_blob_id(data) != SPLIT_BLOB_IDS[name]:
        raise DataError(f"{url} is not the pinned {name} (git blob id {git_blob_id(data)}, expected "
                        f"{SPLIT_BLOB_IDS[name]}): nothing written; fetch it elsewhere and put it in {folder}")
    partial = f"{path}.{os.getpid()}-{os.urandom(4).hex()}.part"  # unique: concurrent runs never share it
    try:
        os.makedirs(folder, exist_ok=True)
        with open(partial, "xb") as f:
            f.write(data)
        os.replace(partial, path)
    except OSError as e:
        raise DataError(f"cannot write {path} ({e.strerror or e}): make {folder} writable or free disk space") from None
    finally:  # also on Ctrl-C: no partial file left behind
        if os.path.exists(partial):
            os.remove(partial)


def download_with_torchvision(d, tv_class, sub_folder, log):
    """Fetch with torchvision.datasets.<tv_class> into d, then move its files from d/sub_folder up to CoOp's place."""
    log(f"downloading with torchvision.datasets.{tv_class} into {d}")
    try:
        getattr(tv_datasets, tv_class)(d, download=True)
    except ImportError:  # Flowers102 parses its .mat labels with scipy once downloaded; data.py reads the split file
        pass
    except (OSError, RuntimeError) as e:
        raise DataError(f"download into {d} failed: {e}") from None
    for entry in os.listdir(os.path.join(d, sub_folder)) if sub_folder else []:
        os.replace(os.path.join(d, sub_folder, entry), os.path.join(d, entry))


def read_coop_dataset(name, root, download, log):
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"unknown dataset '{name}'{hint}; choose from {', '.join(DATASETS)}, folder:/path")
    spec = DATASETS[name]
    d = os.path.join(os.path.abspath(root), spec["folder"])
    image_dir = os.path.join(d, spec["images"])
    if download and "tv" in spec and not os.path.isdir(image_dir):
        download_with_torchvision(d, *spec["tv"], log)
    if not os.path.isdir(image_dir):
        how = " or pass --download" if "tv" in spec else ""
        raise DataError(f"{name}: {image_dir} not found: get {spec['get']}{how} (layouts: {COOP_DATASETS_MD})")
    split = os.path.join(d, spec["split"]) if "split" in spec else None
    if download and split and not os.path.isfile(split):
        download_split(split, log)
    if split and os.path.isfile(split):
        train, val, test = read_split_json(split, image_dir)
    elif split and spec["read"] is None:
        raise DataError(f"{split} not found: pass --download to fetch it ({SPLITS_URL}); {name}'s raw labels are "
                        f".mat files, which data.py does not read")
    else:
        if split:
            log(f"warning: {split} not found: splitting the raw files as CoOp does (seed {RAW_SPLIT_SEED}); results "
                f"are NOT comparable with published numbers (pass --download to fetch the split file)")
        train, val, test = spec["read"](d, image_dir, random.Random(RAW_SPLIT_SEED))
    return train, val, test


# ----------------------------------------------------------------------------------------------------------------------
# Few-shot subsets (Dassl) and base-to-new classes (CoCoOp), then load_dataset

def sample_fewshot(items, shots, rng):
    """Dassl's generate_fewshot_dataset: per label in order of first appearance, rng.sample(shots), or all if fewer."""
    by_label = defaultdict(list)
    for item in items:
        by_label[item[1]].append(item)
    return [x for group in by_label.values() for x in (rng.sample(group, shots) if len(group) >= shots else group)]


def subsample_classes(subsample, *splits):
    """CoCoOp's base-to-new split: base = the first ceil(n/2) labels of the train set, new = the rest. Returns the
    kept old labels (new label = position in it) and the splits keeping only those, relabelled."""
    labels = sorted({y for _, y in splits[0] or splits[-1]})  # test-only sets: the test labels
    m = math.ceil(len(labels) / 2)
    kept = labels[:m] if subsample == "base" else labels[m:]
    new_label = {y: i for i, y in enumerate(kept)}
    return kept, *[[(p, new_label[y]) for p, y in s if y in new_label] for s in splits]


def check_images_exist(name, splits):
    """Every image of every split is a file, else one error naming the first missing one (stat in threads)."""
    for split, items in splits.items():
        missing = [path for (path, _), ok in zip(items, threaded(os.path.isfile, [p for p, _ in items])) if not ok]
        if missing:
            raise DataError(f"{name}: {len(missing)} of the {len(items)} {split} images are missing, the first is "
                            f"{missing[0]}: incomplete download, or files not in CoOp's layout? "
                            f"(layouts: {COOP_DATASETS_MD})")


def load_dataset(name, root, shots=0, seed=1, subsample="all", download=False, check_splits=("train", "val", "test"),
                 log=print):
    """Read `name` (a DATASETS key or "folder:/path") under `root`; take Dassl's few-shot subset for (shots, seed)
    (shots=0: everything), then keep the base or new half of the classes (subsample="base"/"new"). check_splits: the
    splits whose every image must exist (one stat each), so that a missing file stops a run before any work."""
    if shots < 0:
        raise DataError(f"shots must be >= 1 (or 0 for the full training set), got {shots}")
    if subsample not in ("all", "base", "new"):
        raise DataError(f"subsample must be all, base or new, got '{subsample}'")
    if name.startswith("folder:"):
        train, val, test = read_custom_folder(os.path.abspath(name.removeprefix("folder:")))
    else:
        train, val, test = read_coop_dataset(name, root, download, log)
    names = {}  # label -> (classname, wnid or None)
    for _, label, classname, *wnid in train + val + test:
        names.setdefault(label, (classname, wnid[0] if wnid else None))
    if not names:
        raise DataError(f"{name}: no images found")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataError(f"{name}: no image has label {missing[0]} ({len(missing)} of 0..{max(names)} missing): "
                        "incomplete download or split file?")
    if not test:
        raise DataError(f"{name}: the test split is empty, nothing to evaluate: check its split file or test/ folder")
    untrained = sorted(set(names) - {item[1] for item in train}) if train else []
    if untrained:
        raise DataError(f"{name}: class {untrained[0]} ('{names[untrained[0]][0]}') has no training images "
                        f"({len(untrained)} of {len(names)} classes have none): incomplete download or split file?")
    classnames = [names[y][0].replace("_", " ") for y in range(len(names))]  # CoOp's prompt learner also replaces "_"
    class_ids = [names[y][1] or classnames[y] for y in range(len(names))]  # the wnid, else the class name
    train, val, test = ([item[:2] for item in items] for items in (train, val, test))  # -> (path, label)
    if shots > 0:  # one private stream seeded once, train then val, as Dassl does after random.seed(seed)
        rng = random.Random(seed)
        train = sample_fewshot(train, shots, rng)
        val = sample_fewshot(val, min(shots, 4), rng)
    if subsample != "all":
        kept, train, val, test = subsample_classes(subsample, train, val, test)
        classnames, class_ids = [classnames[y] for y in kept], [class_ids[y] for y in kept]
    check_images_exist(name, {split: items for split, items in [("train", train), ("val", val), ("test", test)]
                              if split in check_splits})
    log(f"{name}: {len(classnames)} classes, train {len(train)} / val {len(val)} / test {len(test)} images "
        f"(shots={shots}, seed={seed}, subsample={subsample})")
    return Dataset(name, classnames, class_ids, train, val, test)


# ----------------------------------------------------------------------------------------------------------------------
# Transforms (CoOp's configs: Dassl's augmentation for training, CLIP's preprocessing for testing) and the loader

def train_transform(n_px):
    """Random resized crop of the full image (scale 0.08-1, bicubic) to n_px, horizontal flip, CLIP mean/std."""
    return T.Compose([T.RandomResizedCrop(n_px, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def test_transform(n_px):
    """CLIP's preprocessing: bicubic resize of the short side to n_px, center crop, CLIP mean/std."""
    return image_transform(n_px)


def transform_key(transform):
    """repr(transform) without memory addresses ('<function _to_rgb at 0x7f..>' -> '<function _to_rgb>'): the same
    text in every process, for cache keys."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def bomb_error(path, e):
    return DataError(f"cannot read image {path}: {e} If the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS")


def load_image(path):
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:  # also PIL.UnidentifiedImageError and truncated files
        raise DataError(f"cannot read image {path}: {e}") from None
    except Image.DecompressionBombError as e:  # more than 2 * MAX_IMAGE_PIXELS pixels; not an OSError
        raise bomb_error(path, e) from None


def rgb_bytes(path):
    """Size of the decoded RGB image from the file header alone (0 if unreadable: load_image names the file later)."""
    try:
        with Image.open(path) as image:
            return image.width * image.height * 3
    except OSError:
        return 0
    except Image.DecompressionBombError as e:
        raise bomb_error(path, e) from None


def threaded(fn, paths):
    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:  # PIL releases the GIL while decoding
        return list(pool.map(fn, paths))


class ImageList(torch.utils.data.Dataset):
    """(path, label) items -> (image (3, n_px, n_px), label); `images`: decoded in advance, else read every time.
    A key (i, seed) from EpochSampler runs the random transform under its own seed."""

    def __init__(self, items, transform, images=None):
        self.items, self.transform, self.images = items, transform, images

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.items[i]
        image = self.images[i] if self.images is not None else load_image(path)
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG untouched
            torch.manual_seed(seed)
            return self.transform(image), label


def stable_hash(*parts):
    """A 63-bit integer from the parts' text, the same on every platform and in every process (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def augmentation_seed(seed, epoch, index):
    """The torch seed under which image `index` is augmented in `epoch`, in [0, 2**63)."""
    return stable_hash(seed, epoch, index)


def epoch_order(n, seed, epoch):
    """The order in which the training loader visits the n images in `epoch`: a permutation fixed by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(stable_hash(seed, epoch))).tolist()


class EpochSampler(torch.utils.data.Sampler):
    """Keys (index, augmentation_seed(seed, epoch, index)) in epoch_order (shuffle=True) or in index order: an epoch
    is a pure function of (seed, epoch), whatever the workers or the global RNG. Call set_epoch(epoch) before each."""

    def __init__(self, n, seed, shuffle):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch) if self.shuffle else range(self.n)
        return ((i, augmentation_seed(self.seed, self.epoch, i)) for i in order)


def make_loader(items, transform, batch_size, *, train, seed=None, workers=4, cache_images=None, log=print):
    """Batches (images (B, 3, n_px, n_px), labels (B,)) of (path, label) items; call loader.sampler.set_epoch(epoch)
    before each epoch when `seed` is given. train=True: epoch_order, image i augmented under
    augmentation_seed(seed, epoch, i), drop_last when there is at least one full batch (Dassl). train=False, seed=s:
    the same augmented images in index order, none dropped (features of a training epoch, by index). train=False,
    seed=None: in order, plain. The global torch RNG is never read. cache_images: decode every image once, before the
    workers fork (None = for seeded loaders that fit CACHE_BUDGET); transforms then see the images decoded from disk."""
    if train and not items:
        raise DataError("no training images: this dataset is test-only")
    if train and seed is None:
        raise ValueError("make_loader(train=True) needs a seed: an epoch's order and augmentation derive from it")
    if cache_images is None and seed is not None:
        size = sum(threaded(rgb_bytes, [path for path, _ in items]))
        cache_images = size <= CACHE_BUDGET
        log(f"{len(items)} training images, {size / 2**30:.2f} GiB decoded: " + ("decoded once into RAM" if cache_images
            else f"read from disk every epoch (over the {CACHE_BUDGET / 2**30:.0f} GiB CACHE_BUDGET)"))
    images = threaded(load_image, [path for path, _ in items]) if cache_images else None
    return torch.utils.data.DataLoader(ImageList(items, transform, images), batch_size=batch_size,
                                       sampler=EpochSampler(len(items), seed, train) if seed is not None else None,
                                       drop_last=train and len(items) >= batch_size, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(0))  # its base seed: not global


# ----------------------------------------------------------------------------------------------------------------------
# Command line: python data.py --dataset dtd --root DATA [--shots 16 --seed 1 --subsample base] [--list-fewshot]

def main():
    parser = argparse.ArgumentParser(description="Summarise a dataset as train.py reads it, or list its training set.")
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(DATASETS)}, or folder:/path")
    parser.add_argument("--root", default="data", help="folder holding the datasets in CoOp's layout ($DATA in CoOp)")
    parser.add_argument("--shots", type=int, default=0, help="training images per class (Dassl sampling); 0 = all")
    parser.add_argument("--seed", type=int, default=1, help="few-shot sampling seed (the papers average seeds 1, 2, 3)")
    parser.add_argument("--subsample", default="all", help="all, or base / new: first / second half of the classes")
    parser.add_argument("--n-px", type=int, default=224, help="model input resolution shown in the transforms")
    parser.add_argument("--download", action="store_true",
                        help="fetch the dataset with torchvision where it can, and CoOp's split file")
    parser.add_argument("--list-fewshot", action="store_true",
                        help="print the training images in order, one 'relative/path label' a line")
    args = parser.parse_args()
    try:
        if args.n_px < 1:
            raise DataError(f"--n-px must be a positive resolution in pixels (e.g. 224), got {args.n_px}")
        data = load_dataset(args.dataset, args.root, args.shots, args.seed, args.subsample, args.download,
                            log=partial(print, file=sys.stderr) if args.list_fewshot else print)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.list_fewshot:
        base = args.dataset.removeprefix("folder:") if args.dataset.startswith("folder:") else \
            os.path.join(args.root, DATASETS[args.dataset]["folder"])
        for path, label in data.train:
            print(os.path.relpath(path, base), label)
        return
    print(f"classes: {', '.join(data.classnames[:10])}{', ...' if len(data.classnames) > 10 else ''}")
    print(f"train transform: {transform_key(train_transform(args.n_px))}\n"
          f"test transform: {transform_key(test_transform(args.n_px))}")


# ----------------------------------------------------------------------------------------------------------------------
# CLIP's 1000 ImageNet class names (OpenAI's Prompt_Engineering_for_ImageNet.ipynb, the names in CoOp's classnames.txt),
# in label order; 'missile' and 'sunglasses' appear twice, as in CLIP and CoOp.
IMAGENET_CLASSNAMES = [
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray", "rooster",
    "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting", "American robin", "bulbul",
    "jay", "magpie", "chickadee", "American dipper", "kite (bird of prey)", "bald eagle", "vulture", "great grey owl",
    "fire salamander", "smooth newt", "newt", "spotted salamander", "axolotl", "American bullfrog", "tree frog",
    "tailed frog", "loggerhead sea turtle", "leatherback sea turtle", "mud turtle", "terrapin", "box turtle",
    "banded gecko", "green iguana", "Carolina anole", "desert grassland whiptail lizard", "agama",
    "frilled-necked lizard", "alligator lizard", "Gila monster", "European green lizard", "chameleon", "Komodo dragon",
    "Nile crocodile", "American alligator", "triceratops", "worm snake", "ring-necked snake", "eastern hog-nosed snake",
    "smooth green snake", "kingsnake", "garter snake", "water snake", "vine snake", "night snake", "boa constrictor",
    "African rock python", "Indian cobra", "green mamba", "sea snake", "Saharan horned viper",
    "eastern diamondback rattlesnake", "sidewinder rattlesnake", "trilobite", "harvestman", "scorpion",
    "yellow garden spider", "barn spider", "European garden spider", "southern black widow", "tarantula", "wolf spider",
    "tick", "centipede", "black grouse", "ptarmigan", "ruffed grouse", "prairie grouse", "peafowl", "quail",
    "partridge", "african grey parrot", "macaw", "sulphur-crested cockatoo", "lorikeet", "coucal", "bee eater",
    "hornbill", "hummingbird", "jacamar", "toucan", "duck", "red-breasted merganser", "goose", "black swan", "tusker",
    "echidna", "platypus", "wallaby", "koala", "wombat", "jellyfish", "sea anemone", "brain coral", "flatworm",
    "nematode", "conch", "snail", "slug", "sea slug", "chiton", "chambered nautilus", "Dungeness crab", "rock crab",
    "fiddler crab", "red king crab", "American lobster", "spiny lobster", "crayfish", "hermit crab", "isopod",
    "white stork", "black stork", "spoonbill", "flamingo", "little blue heron", "great egret", "bittern bird",
    "crane bird", "limpkin", "common gallinule", "American coot", "bustard", "ruddy turnstone", "dunlin",
    "common redshank", "dowitcher", "oystercatcher", "pelican", "king penguin", "albatross", "grey whale",
    "killer whale", "dugong", "sea lion", "Chihuahua", "Japanese Chin", "Maltese", "Pekingese", "Shih Tzu",
    "King Charles Spaniel", "Papillon", "toy terrier", "Rhodesian Ridgeback", "Afghan Hound", "Basset Hound", "Beagle",
    "Bloodhound", "Bluetick Coonhound", "Black and Tan Coonhound", "Treeing Walker Coonhound", "English foxhound",
    "Redbone Coonhound", "borzoi", "Irish Wolfhound", "Italian Greyhound", "Whippet", "Ibizan Hound",
    "Norwegian Elkhound", "Otterhound", "Saluki", "Scottish Deerhound", "Weimaraner", "Staffordshire Bull Terrier",
    "American Staffordshire Terrier", "Bedlington Terrier", "Border Terrier", "Kerry Blue Terrier", "Irish Terrier",
    "Norfolk Terrier", "Norwich Terrier", "Yorkshire Terrier", "Wire Fox Terrier", "Lakeland Terrier",
    "Sealyham Terrier", "Airedale Terrier", "Cairn Terrier", "Australian Terrier", "Dandie Dinmont Terrier",
    "Boston Terrier", "Miniature Schnauzer", "Giant Schnauzer", "Standard Schnauzer", "Scottish Terrier",
    "Tibetan Terrier", "Australian Silky Terrier", "Soft-coated Wheaten Terrier", "West Highland White Terrier",
    "Lhasa Apso", "Flat-Coated Retriever", "Curly-coated Retriever", "Golden Retriever", "Labrador Retriever",
    "Chesapeake Bay Retriever", "German Shorthaired Pointer", "Vizsla", "English Setter", "Irish Setter",
    "Gordon Setter", "Brittany dog", "Clumber Spaniel", "English Springer Spaniel", "Welsh Springer Spaniel",
    "Cocker Spaniel", "Sussex Spaniel", "Irish Water Spaniel", "Kuvasz", "Schipperke", "Groenendael dog", "Malinois",
    "Briard", "Australian Kelpie", "Komondor", "Old English Sheepdog", "Shetland Sheepdog", "collie", "Border Collie",
    "Bouvier des Flandres dog", "Rottweiler", "German Shepherd Dog", "Dobermann", "Miniature Pinscher",
    "Greater Swiss Mountain Dog", "Bernese Mountain Dog", "Appenzeller Sennenhund", "Entlebucher Sennenhund", "Boxer",
    "Bullmastiff", "Tibetan Mastiff", "French Bulldog", "Great Dane", "St. Bernard", "husky", "Alaskan Malamute",
    "Siberian Husky", "Dalmatian", "Affenpinscher", "Basenji", "pug", "Leonberger", "Newfoundland dog",
    "Great Pyrenees dog", "Samoyed", "Pomeranian", "Chow Chow", "Keeshond", "brussels griffon", "Pembroke Welsh Corgi",
    "Cardigan Welsh Corgi", "Toy Poodle", "Miniature Poodle", "Standard Poodle",
    "Mexican hairless dog (xoloitzcuintli)", "grey wolf", "Alaskan tundra wolf", "red wolf or maned wolf", "coyote",
    "dingo", "dhole", "African wild dog", "hyena", "red fox", "kit fox", "Arctic fox", "grey fox", "tabby cat",
    "tiger cat", "Persian cat", "Siamese cat", "Egyptian Mau", "cougar", "lynx", "leopard", "snow leopard", "jaguar",
    "lion", "tiger", "cheetah", "brown bear", "American black bear", "polar bear", "sloth bear", "mongoose", "meerkat",
    "tiger beetle", "ladybug", "ground beetle", "longhorn beetle", "leaf beetle", "dung beetle", "rhinoceros beetle",
    "weevil", "fly", "bee", "ant", "grasshopper", "cricket insect", "stick insect", "cockroach", "praying mantis",
    "cicada", "leafhopper", "lacewing", "dragonfly", "damselfly", "red admiral butterfly", "ringlet butterfly",
    "monarch butterfly", "small white butterfly", "sulphur butterfly", "gossamer-winged butterfly", "starfish",
    "sea urchin", "sea cucumber", "cottontail rabbit", "hare", "Angora rabbit", "hamster", "porcupine", "fox squirrel",
    "marmot", "beaver", "guinea pig", "common sorrel horse", "zebra", "pig", "wild boar", "warthog", "hippopotamus",
    "ox", "water buffalo", "bison", "ram (adult male sheep)", "bighorn sheep", "Alpine ibex", "hartebeest",
    "impala (antelope)", "gazelle", "arabian camel", "llama", "weasel", "mink", "European polecat",
    "black-footed ferret", "otter", "skunk", "badger", "armadillo", "three-toed sloth", "orangutan", "gorilla",
    "chimpanzee", "gibbon", "siamang", "guenon", "patas monkey", "baboon", "macaque", "langur",
    "black-and-white colobus", "proboscis monkey", "marmoset", "white-headed capuchin", "howler monkey", "titi monkey",
    "Geoffroy's spider monkey", "common squirrel monkey", "ring-tailed lemur", "indri", "Asian elephant",
    "African bush elephant", "red panda", "giant panda", "snoek fish", "eel", "silver salmon", "rock beauty fish",
    "clownfish", "sturgeon", "gar fish", "lionfish", "pufferfish", "abacus", "abaya", "academic gown", "accordion",
    "acoustic guitar", "aircraft carrier", "airliner", "airship", "altar", "ambulance", "amphibious vehicle",
    "analog clock", "apiary", "apron", "trash can", "assault rifle", "backpack", "bakery", "balance beam", "balloon",
    "ballpoint pen", "Band-Aid", "banjo", "baluster / handrail", "barbell", "barber chair", "barbershop", "barn",
    "barometer", "barrel", "wheelbarrow", "baseball", "basketball", "bassinet", "bassoon", "swimming cap", "bath towel",
    "bathtub", "station wagon", "lighthouse", "beaker", "military hat (bearskin or shako)", "beer bottle", "beer glass",
    "bell tower", "baby bib", "tandem bicycle", "bikini", "ring binder", "binoculars", "birdhouse", "boathouse",
    "bobsleigh", "bolo tie", "poke bonnet", "bookcase", "bookstore", "bottle cap", "hunting bow", "bow tie",
    "brass memorial plaque", "bra", "breakwater", "breastplate", "broom", "bucket", "buckle", "bulletproof vest",
    "high-speed train", "butcher shop", "taxicab", "cauldron", "candle", "cannon", "canoe", "can opener", "cardigan",
    "car mirror", "carousel", "tool kit", "cardboard box / carton", "car wheel", "automated teller machine", "cassette",
    "cassette player", "castle", "catamaran", "CD player", "cello", "mobile phone", "chain", "chain-link fence",
    "chain mail", "chainsaw", "storage chest", "chiffonier", "bell or wind chime", "china cabinet",
    "Christmas stocking", "church", "movie theater", "cleaver", "cliff dwelling", "cloak", "clogs", "cocktail shaker",
    "coffee mug", "coffeemaker", "spiral or coil", "combination lock", "computer keyboard", "candy store",
    "container ship", "convertible", "corkscrew", "cornet", "cowboy boot", "cowboy hat", "cradle", "construction crane",
    "crash helmet", "crate", "infant bed", "Crock Pot", "croquet ball", "crutch", "cuirass", "dam", "desk",
    "desktop computer", "rotary dial telephone", "diaper", "digital clock", "digital watch", "dining table",
    "dishcloth", "dishwasher", "disc brake", "dock", "dog sled", "dome", "doormat", "drilling rig", "drum", "drumstick",
    "dumbbell", "Dutch oven", "electric fan", "electric guitar", "electric locomotive", "entertainment center",
    "envelope", "espresso machine", "face powder", "feather boa", "filing cabinet", "fireboat", "fire truck",
    "fire screen", "flagpole", "flute", "folding chair", "football helmet", "forklift", "fountain", "fountain pen",
    "four-poster bed", "freight car", "French horn", "frying pan", "fur coat", "garbage truck",
    "gas mask or respirator", "gas pump", "goblet", "go-kart", "golf ball", "golf cart", "gondola", "gong", "gown",
    "grand piano", "greenhouse", "radiator grille", "grocery store", "guillotine", "hair clip", "hair spray",
    "half-track", "hammer", "hamper", "hair dryer", "hand-held computer", "handkerchief", "hard disk drive",
    "harmonica", "harp", "combine harvester", "hatchet", "holster", "home theater", "honeycomb", "hook", "hoop skirt",
    "gymnastic horizontal bar", "horse-drawn vehicle", "hourglass", "iPod", "clothes iron", "carved pumpkin", "jeans",
    "jeep", "T-shirt", "jigsaw puzzle", "rickshaw", "joystick", "kimono", "knee pad", "knot", "lab coat", "ladle",
    "lampshade", "laptop computer", "lawn mower", "lens cap", "letter opener", "library", "lifeboat", "lighter",
    "limousine", "ocean liner", "lipstick", "slip-on shoe", "lotion", "music speaker", "loupe magnifying glass",
    "sawmill", "magnetic compass", "messenger bag", "mailbox", "tights", "one-piece bathing suit", "manhole cover",
    "maraca", "marimba", "mask", "matchstick", "maypole", "maze", "measuring cup", "medicine cabinet", "megalith",
    "microphone", "microwave oven", "military uniform", "milk can", "minibus", "miniskirt", "minivan", "missile",
    "mitten", "mixing bowl", "mobile home", "ford model t", "modem", "monastery", "monitor", "moped",
    "mortar and pestle", "graduation cap", "mosque", "mosquito net", "vespa", "mountain bike", "tent", "computer mouse",
    "mousetrap", "moving van", "muzzle", "metal nail", "neck brace", "necklace", "baby pacifier", "notebook computer",
    "obelisk", "oboe", "ocarina", "odometer", "oil filter", "pipe organ", "oscilloscope", "overskirt", "bullock cart",
    "oxygen mask", "product packet / packaging", "paddle", "paddle wheel", "padlock", "paintbrush", "pajamas", "palace",
    "pan flute", "paper towel", "parachute", "parallel bars", "park bench", "parking meter", "railroad car", "patio",
    "payphone", "pedestal", "pencil case", "pencil sharpener", "perfume", "Petri dish", "photocopier", "plectrum",
    "Pickelhaube", "picket fence", "pickup truck", "pier", "piggy bank", "pill bottle", "pillow", "ping-pong ball",
    "pinwheel", "pirate ship", "drink pitcher", "block plane", "planetarium", "plastic bag", "plate rack", "farm plow",
    "plunger", "Polaroid camera", "pole", "police van", "poncho", "pool table", "soda bottle", "plant pot",
    "potter's wheel", "power drill", "prayer rug", "printer", "prison", "missile", "projector", "hockey puck",
    "punching bag", "purse", "quill", "quilt", "race car", "racket", "radiator", "radio", "radio telescope",
    "rain barrel", "recreational vehicle", "fishing casting reel", "reflex camera", "refrigerator", "remote control",
    "restaurant", "revolver", "rifle", "rocking chair", "rotisserie", "eraser", "rugby ball", "ruler measuring stick",
    "sneaker", "safe", "safety pin", "salt shaker", "sandal", "sarong", "saxophone", "scabbard", "weighing scale",
    "school bus", "schooner", "scoreboard", "CRT monitor", "screw", "screwdriver", "seat belt", "sewing machine",
    "shield", "shoe store", "shoji screen / room divider", "shopping basket", "shopping cart", "shovel", "shower cap",
    "shower curtain", "ski", "balaclava ski mask", "sleeping bag", "slide rule", "sliding door", "slot machine",
    "snorkel", "snowmobile", "snowplow", "soap dispenser", "soccer ball", "sock", "solar thermal collector", "sombrero",
    "soup bowl", "keyboard space bar", "space heater", "space shuttle", "spatula", "motorboat", "spider web", "spindle",
    "sports car", "spotlight", "stage", "steam locomotive", "through arch bridge", "steel drum", "stethoscope", "scarf",
    "stone wall", "stopwatch", "stove", "strainer", "tram", "stretcher", "couch", "stupa", "submarine", "suit",
    "sundial", "sunglasses", "sunglasses", "sunscreen", "suspension bridge", "mop", "sweatshirt",
    "swim trunks / shorts", "swing", "electrical switch", "syringe", "table lamp", "tank", "tape player", "teapot",
    "teddy bear", "television", "tennis ball", "thatched roof", "front curtain", "thimble", "threshing machine",
    "throne", "tile roof", "toaster", "tobacco shop", "toilet seat", "torch", "totem pole", "tow truck", "toy store",
    "tractor", "semi-trailer truck", "tray", "trench coat", "tricycle", "trimaran", "tripod", "triumphal arch",
    "trolleybus", "trombone", "hot tub", "turnstile", "typewriter keyboard", "umbrella", "unicycle", "upright piano",
    "vacuum cleaner", "vase", "vaulted or arched ceiling", "velvet fabric", "vending machine", "vestment", "viaduct",
    "violin", "volleyball", "waffle iron", "wall clock", "wallet", "wardrobe", "military aircraft", "sink",
    "washing machine", "water bottle", "water jug", "water tower", "whiskey jug", "whistle", "hair wig",
    "window screen", "window shade", "Windsor tie", "wine bottle", "airplane wing", "wok", "wooden spoon", "wool",
    "split-rail fence", "shipwreck", "sailboat", "yurt", "website", "comic book", "crossword", "traffic or street sign",
    "traffic light", "dust jacket", "menu", "plate", "guacamole", "consomme", "hot pot", "trifle", "ice cream",
    "popsicle", "baguette", "bagel", "pretzel", "cheeseburger", "hot dog", "mashed potatoes", "cabbage", "broccoli",
    "cauliflower", "zucchini", "spaghetti squash", "acorn squash", "butternut squash", "cucumber", "artichoke",
    "bell pepper", "cardoon", "mushroom", "Granny Smith apple", "strawberry", "orange", "lemon", "fig", "pineapple",
    "banana", "jackfruit", "cherimoya (custard apple)", "pomegranate", "hay", "carbonara", "chocolate syrup", "dough",
    "meatloaf", "pizza", "pot pie", "burrito", "red wine", "espresso", "tea cup", "eggnog", "mountain", "bubble",
    "cliff", "coral reef", "geyser", "lakeshore", "promontory", "sandbar", "beach", "valley", "volcano",
    "baseball player", "bridegroom", "scuba diver", "rapeseed", "daisy", "yellow lady's slipper", "corn", "acorn",
    "rose hip", "horse chestnut seed", "coral fungus", "agaric", "gyromitra", "stinkhorn mushroom", "earth star fungus",
    "hen of the woods mushroom", "bolete", "corn cob", "toilet paper",
]
# The 1000 ImageNet-1k WordNet ids, sorted: IMAGENET_WNIDS[i] is the folder of class i (IMAGENET_CLASSNAMES[i]).
IMAGENET_WNIDS = """
n01440764 n01443537 n01484850 n01491361 n01494475 n01496331 n01498041 n01514668 n01514859 n01518878 n01530575 n01531178
n01532829 n01534433 n01537544 n01558993 n01560419 n01580077 n01582220 n01592084 n01601694 n01608432 n01614925 n01616318
n01622779 n01629819 n01630670 n01631663 n01632458 n01632777 n01641577 n01644373 n01644900 n01664065 n01665541 n01667114
n01667778 n01669191 n01675722 n01677366 n01682714 n01685808 n01687978 n01688243 n01689811 n01692333 n01693334 n01694178
n01695060 n01697457 n01698640 n01704323 n01728572 n01728920 n01729322 n01729977 n01734418 n01735189 n01737021 n01739381
n01740131 n01742172 n01744401 n01748264 n01749939 n01751748 n01753488 n01755581 n01756291 n01768244 n01770081 n01770393
n01773157 n01773549 n01773797 n01774384 n01774750 n01775062 n01776313 n01784675 n01795545 n01796340 n01797886 n01798484
n01806143 n01806567 n01807496 n01817953 n01818515 n01819313 n01820546 n01824575 n01828970 n01829413 n01833805 n01843065
n01843383 n01847000 n01855032 n01855672 n01860187 n01871265 n01872401 n01873310 n01877812 n01882714 n01883070 n01910747
n01914609 n01917289 n01924916 n01930112 n01943899 n01944390 n01945685 n01950731 n01955084 n01968897 n01978287 n01978455
n01980166 n01981276 n01983481 n01984695 n01985128 n01986214 n01990800 n02002556 n02002724 n02006656 n02007558 n02009229
n02009912 n02011460 n02012849 n02013706 n02017213 n02018207 n02018795 n02025239 n02027492 n02028035 n02033041 n02037110
n02051845 n02056570 n02058221 n02066245 n02071294 n02074367 n02077923 n02085620 n02085782 n02085936 n02086079 n02086240
n02086646 n02086910 n02087046 n02087394 n02088094 n02088238 n02088364 n02088466 n02088632 n02089078 n02089867 n02089973
n02090379 n02090622 n02090721 n02091032 n02091134 n02091244 n02091467 n02091635 n02091831 n02092002 n02092339 n02093256
n02093428 n02093647 n02093754 n02093859 n02093991 n02094114 n02094258 n02094433 n02095314 n02095570 n02095889 n02096051
n02096177 n02096294 n02096437 n02096585 n02097047 n02097130 n02097209 n02097298 n02097474 n02097658 n02098105 n02098286
n02098413 n02099267 n02099429 n02099601 n02099712 n02099849 n02100236 n02100583 n02100735 n02100877 n02101006 n02101388
n02101556 n02102040 n02102177 n02102318 n02102480 n02102973 n02104029 n02104365 n02105056 n02105162 n02105251 n02105412
n02105505 n02105641 n02105855 n02106030 n02106166 n02106382 n02106550 n02106662 n02107142 n02107312 n02107574 n02107683
n02107908 n02108000 n02108089 n02108422 n02108551 n02108915 n02109047 n02109525 n02109961 n02110063 n02110185 n02110341
n02110627 n02110806 n02110958 n02111129 n02111277 n02111500 n02111889 n02112018 n02112137 n02112350 n02112706 n02113023
n02113186 n02113624 n02113712 n02113799 n02113978 n02114367 n02114548 n02114712 n02114855 n02115641 n02115913 n02116738
n02117135 n02119022 n02119789 n02120079 n02120505 n02123045 n02123159 n02123394 n02123597 n02124075 n02125311 n02127052
n02128385 n02128757 n02128925 n02129165 n02129604 n02130308 n02132136 n02133161 n02134084 n02134418 n02137549 n02138441
n02165105 n02165456 n02167151 n02168699 n02169497 n02172182 n02174001 n02177972 n02190166 n02206856 n02219486 n02226429
n02229544 n02231487 n02233338 n02236044 n02256656 n02259212 n02264363 n02268443 n02268853 n02276258 n02277742 n02279972
n02280649 n02281406 n02281787 n02317335 n02319095 n02321529 n02325366 n02326432 n02328150 n02342885 n02346627 n02356798
n02361337 n02363005 n02364673 n02389026 n02391049 n02395406 n02396427 n02397096 n02398521 n02403003 n02408429 n02410509
n02412080 n02415577 n02417914 n02422106 n02422699 n02423022 n02437312 n02437616 n02441942 n02442845 n02443114 n02443484
n02444819 n02445715 n02447366 n02454379 n02457408 n02480495 n02480855 n02481823 n02483362 n02483708 n02484975 n02486261
n02486410 n02487347 n02488291 n02488702 n02489166 n02490219 n02492035 n02492660 n02493509 n02493793 n02494079 n02497673
n02500267 n02504013 n02504458 n02509815 n02510455 n02514041 n02526121 n02536864 n02606052 n02607072 n02640242 n02641379
n02643566 n02655020 n02666196 n02667093 n02669723 n02672831 n02676566 n02687172 n02690373 n02692877 n02699494 n02701002
n02704792 n02708093 n02727426 n02730930 n02747177 n02749479 n02769748 n02776631 n02777292 n02782093 n02783161 n02786058
n02787622 n02788148 n02790996 n02791124 n02791270 n02793495 n02794156 n02795169 n02797295 n02799071 n02802426 n02804414
n02804610 n02807133 n02808304 n02808440 n02814533 n02814860 n02815834 n02817516 n02823428 n02823750 n02825657 n02834397
n02835271 n02837789 n02840245 n02841315 n02843684 n02859443 n02860847 n02865351 n02869837 n02870880 n02871525 n02877765
n02879718 n02883205 n02892201 n02892767 n02894605 n02895154 n02906734 n02909870 n02910353 n02916936 n02917067 n02927161
n02930766 n02939185 n02948072 n02950826 n02951358 n02951585 n02963159 n02965783 n02966193 n02966687 n02971356 n02974003
n02977058 n02978881 n02979186 n02980441 n02981792 n02988304 n02992211 n02992529 n02999410 n03000134 n03000247 n03000684
n03014705 n03016953 n03017168 n03018349 n03026506 n03028079 n03032252 n03041632 n03042490 n03045698 n03047690 n03062245
n03063599 n03063689 n03065424 n03075370 n03085013 n03089624 n03095699 n03100240 n03109150 n03110669 n03124043 n03124170
n03125729 n03126707 n03127747 n03127925 n03131574 n03133878 n03134739 n03141823 n03146219 n03160309 n03179701 n03180011
n03187595 n03188531 n03196217 n03197337 n03201208 n03207743 n03207941 n03208938 n03216828 n03218198 n03220513 n03223299
n03240683 n03249569 n03250847 n03255030 n03259280 n03271574 n03272010 n03272562 n03290653 n03291819 n03297495 n03314780
n03325584 n03337140 n03344393 n03345487 n03347037 n03355925 n03372029 n03376595 n03379051 n03384352 n03388043 n03388183
n03388549 n03393912 n03394916 n03400231 n03404251 n03417042 n03424325 n03425413 n03443371 n03444034 n03445777 n03445924
n03447447 n03447721 n03450230 n03452741 n03457902 n03459775 n03461385 n03467068 n03476684 n03476991 n03478589 n03481172
n03482405 n03483316 n03485407 n03485794 n03492542 n03494278 n03495258 n03496892 n03498962 n03527444 n03529860 n03530642
n03532672 n03534580 n03535780 n03538406 n03544143 n03584254 n03584829 n03590841 n03594734 n03594945 n03595614 n03598930
n03599486 n03602883 n03617480 n03623198 n03627232 n03630383 n03633091 n03637318 n03642806 n03649909 n03657121 n03658185
n03661043 n03662601 n03666591 n03670208 n03673027 n03676483 n03680355 n03690938 n03691459 n03692522 n03697007 n03706229
n03709823 n03710193 n03710637 n03710721 n03717622 n03720891 n03721384 n03724870 n03729826 n03733131 n03733281 n03733805
n03742115 n03743016 n03759954 n03761084 n03763968 n03764736 n03769881 n03770439 n03770679 n03773504 n03775071 n03775546
n03776460 n03777568 n03777754 n03781244 n03782006 n03785016 n03786901 n03787032 n03788195 n03788365 n03791053 n03792782
n03792972 n03793489 n03794056 n03796401 n03803284 n03804744 n03814639 n03814906 n03825788 n03832673 n03837869 n03838899
n03840681 n03841143 n03843555 n03854065 n03857828 n03866082 n03868242 n03868863 n03871628 n03873416 n03874293 n03874599
n03876231 n03877472 n03877845 n03884397 n03887697 n03888257 n03888605 n03891251 n03891332 n03895866 n03899768 n03902125
n03903868 n03908618 n03908714 n03916031 n03920288 n03924679 n03929660 n03929855 n03930313 n03930630 n03933933 n03935335
n03937543 n03938244 n03942813 n03944341 n03947888 n03950228 n03954731 n03956157 n03958227 n03961711 n03967562 n03970156
n03976467 n03976657 n03977966 n03980874 n03982430 n03983396 n03991062 n03992509 n03995372 n03998194 n04004767 n04005630
n04008634 n04009552 n04019541 n04023962 n04026417 n04033901 n04033995 n04037443 n04039381 n04040759 n04041544 n04044716
n04049303 n04065272 n04067472 n04069434 n04070727 n04074963 n04081281 n04086273 n04090263 n04099969 n04111531 n04116512
n04118538 n04118776 n04120489 n04125021 n04127249 n04131690 n04133789 n04136333 n04141076 n04141327 n04141975 n04146614
n04147183 n04149813 n04152593 n04153751 n04154565 n04162706 n04179913 n04192698 n04200800 n04201297 n04204238 n04204347
n04208210 n04209133 n04209239 n04228054 n04229816 n04235860 n04238763 n04239074 n04243546 n04251144 n04252077 n04252225
n04254120 n04254680 n04254777 n04258138 n04259630 n04263257 n04264628 n04265275 n04266014 n04270147 n04273569 n04275548
n04277352 n04285008 n04286575 n04296562 n04310018 n04311004 n04311174 n04317175 n04325704 n04326547 n04328186 n04330267
n04332243 n04335435 n04336792 n04344873 n04346328 n04347754 n04350905 n04355338 n04355933 n04356056 n04357314 n04366367
n04367480 n04370456 n04371430 n04371774 n04372370 n04376876 n04380533 n04389033 n04392985 n04398044 n04399382 n04404412
n04409515 n04417672 n04418357 n04423845 n04428191 n04429376 n04435653 n04442312 n04443257 n04447861 n04456115 n04458633
n04461696 n04462240 n04465501 n04467665 n04476259 n04479046 n04482393 n04483307 n04485082 n04486054 n04487081 n04487394
n04493381 n04501370 n04505470 n04507155 n04509417 n04515003 n04517823 n04522168 n04523525 n04525038 n04525305 n04532106
n04532670 n04536866 n04540053 n04542943 n04548280 n04548362 n04550184 n04552348 n04553703 n04554684 n04557648 n04560804
n04562935 n04579145 n04579432 n04584207 n04589890 n04590129 n04591157 n04591713 n04592741 n04596742 n04597913 n04599235
n04604644 n04606251 n04612504 n04613696 n06359193 n06596364 n06785654 n06794110 n06874185 n07248320 n07565083 n07579787
n07583066 n07584110 n07590611 n07613480 n07614500 n07615774 n07684084 n07693725 n07695742 n07697313 n07697537 n07711569
n07714571 n07714990 n07715103 n07716358 n07716906 n07717410 n07717556 n07718472 n07718747 n07720875 n07730033 n07734744
n07742313 n07745940 n07747607 n07749582 n07753113 n07753275 n07753592 n07754684 n07760859 n07768694 n07802026 n07831146
n07836838 n07860988 n07871810 n07873807 n07875152 n07880968 n07892512 n07920052 n07930864 n07932039 n09193705 n09229709
n09246464 n09256479 n09288635 n09332890 n09399592 n09421951 n09428293 n09468604 n09472597 n09835506 n10148035 n10565667
n11879895 n11939491 n12057211 n12144580 n12267677 n12620546 n12768682 n12985857 n12998815 n13037406 n13040303 n13044778
n13052670 n13054560 n13133613 n15075141
""".split()


if __name__ == "__main__":
    main()
