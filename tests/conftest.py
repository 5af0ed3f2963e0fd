"""Shared test fixtures: tiny randomly initialised CLIPs (ViT and ResNet) in OpenAI's real checkpoint formats, a tiny
folder dataset, and train.py command lines that pass each method only the options it reads."""
import copy
import json
import os
import sys

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_hugging_face_hub(tmp_path_factory, monkeypatch):
    """No test reads the user's Hugging Face cache or reaches the hub: an empty cache, and an endpoint that refuses."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, connection refused


def make_tiny_clip(kind="vit", seed=0):
    """A CLIP with OpenAI's layout at toy size: text width 64 (1 head, 2 layers), real 49,408-token vocabulary and
    77-token context; ViT 32 px / patch 8 / width 64 / 3 layers, or ResNet width 8 / (1, 1, 1, 1) at 64 px."""
    torch.manual_seed(seed)
    if kind == "vit":
        model = clip_model.CLIP(32, 32, 3, 64, 8, 77, 49408, 64, 1, 2)
    else:
        model = clip_model.CLIP(32, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 2)
    return model.eval()


def save_state_dict(model, path):
    """A plain state dict in fp16, as OpenAI's weights are stored."""
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)


def save_torchscript(model, path):
    """A TorchScript archive in fp16 (the format of OpenAI's released .pt files), made with torch.jit.trace."""
    res = model.visual.input_resolution
    example = (torch.zeros(1, 3, res, res), clip_model.tokenize(["a"]))
    traced = torch.jit.trace(copy.deepcopy(model), example, check_trace=False)  # shares (and .half() casts) weights
    traced.half().save(path)


@pytest.fixture(scope="session")
def tiny_vit():
    return make_tiny_clip("vit")


@pytest.fixture(scope="session")
def tiny_rn():
    return make_tiny_clip("rn")


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory, tiny_vit):
    """Path of the tiny ViT CLIP saved as an fp16 TorchScript archive (load it with clip_model.load(path))."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny-vit.pt")
    save_torchscript(tiny_vit, path)
    return path


@pytest.fixture(scope="session")
def rn_checkpoint(tmp_path_factory, tiny_rn):
    """Path of the tiny ResNet CLIP saved as an fp16 plain state dict."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny-rn.pt")
    save_state_dict(tiny_rn, path)
    return path


COLOURS = {"red_apple": (220, 30, 30), "green_leaf": (30, 200, 40), "blue_sky": (40, 60, 230)}


def write_colour_folder(root, counts=(("train", 6), ("test", 4)), colours=COLOURS, size=(48, 32)):
    """A folder:<root> dataset of classes told apart by colour (noisy images, PNG); -> "folder:<root>"."""
    g = torch.Generator().manual_seed(0)
    for split, count in counts:
        for name, rgb in colours.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                noise = torch.randint(-40, 40, (size[1], size[0], 3), generator=g)
                pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return f"folder:{root}"


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """folder:<path> dataset: 3 classes told apart by colour; 6 train and 4 test images each (48 x 32 px)."""
    return write_colour_folder(str(tmp_path_factory.mktemp("tiny_folder")))


def train_argv(method, dataset, backbone, out, **options):
    """A train.py command line with small settings, each passed only to a method that reads it (runs.USED_BY)."""
    import runs
    small = dict(shots=4, epochs=2, batch_size=4, lr=0.01)
    argv = ["--method", method, "--dataset", dataset, "--backbone", backbone, "--output-dir", str(out),
            "--workers", "0"]
    for key, value in {**small, **options}.items():
        if key in runs.USED_BY and method not in runs.USED_BY[key] and key in small:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def read_rows(out):
    """The rows of OUT/results.jsonl, in order."""
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f]
