"""visualize.py on the tiny CLIP: UPT Fig. 6's prompt -> patch attention equals PyTorch's own multi-head attention
weights, the PNG grid shows the image the model saw; Fig. 2's sphere holds every test image and class, at the PCA
projection of the normalised features; checkpoints without what a figure needs are refused with nothing written."""
import glob
import os
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import data
import train
import visualize
from conftest import train_argv
from vpt import VPT
from zeroshot import ZeroShot

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def checkpoints(folder, vit_checkpoint, tmp_path_factory):
    """1-epoch vpt_deep, upt and coop runs on the tiny folder dataset: {method: checkpoint.pt}."""
    out, paths = tmp_path_factory.mktemp("visualize"), {}
    for method in ("vpt_deep", "upt", "coop"):
        train.main(train_argv(method, folder, vit_checkpoint, out / method, epochs=1, shots=2))
        paths[method], = glob.glob(str(out / method / "**" / "checkpoint.pt"), recursive=True)
    return paths


def test_prompt_attention_is_multihead_attention_weights(tiny_vit):
    torch.manual_seed(0)
    model, images = VPT(tiny_vit, ["a", "b"], n_ctx=3, deep=True), torch.randn(2, 3, 32, 32)
    blocks, inputs = tiny_vit.visual.transformer.resblocks, {}
    hook = blocks[2].register_forward_pre_hook(lambda m, args: inputs.__setitem__("x", args[0]))
    got = visualize.prompt_attention(tiny_vit, images, model.prompts, False, [1, 2])
    with torch.no_grad():
        tiny_vit.encode_image(images, model.prompts)
    hook.remove()
    attention = torch.nn.MultiheadAttention(64, blocks[2].attn.heads, batch_first=True)
    attention.load_state_dict(blocks[2].attn.state_dict())
    with torch.no_grad():
        h = blocks[2].ln_1(inputs["x"])
        _, weights = attention(h, h, h, need_weights=True, average_attn_weights=True)  # (B, L, L)
    assert got[2].shape == (2, 3, 16)  # 3 prompt tokens x 4 x 4 patches
    torch.testing.assert_close(got[2], weights[:, 1:4, 4:], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[1], got[2])


def test_attention_figure_writes_one_grid_per_block(checkpoints, tmp_path, capsys):
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 32), colour).save(paths[-1])
    out = tmp_path / "maps"
    visualize.main(["attention", "--checkpoint", checkpoints["vpt_deep"], "--checkpoint", checkpoints["upt"],
                    "--images", *paths, "--out", str(out), "--last", "2"])
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["attention_block1.png", "attention_block2.png"]
    grid = Image.open(out / "attention_block2.png")
    assert grid.size == (3 * 160, 18 + 2 * 160)  # image, VPT, UPT x 2 images
    assert grid.getpixel((80, 18 + 80)) == (200, 30, 30) and grid.getpixel((80, 18 + 160 + 80)) == (30, 30, 200)
    assert printed.count("prompt attention on the patches: vpt_deep") == 2 and "upt (" in printed

    with pytest.raises(SystemExit) as e:  # CoOp has no visual prompts: refused, nothing written
        visualize.main(["attention", "--checkpoint", checkpoints["coop"], "--images", *paths,
                        "--out", str(tmp_path / "none")])
    assert e.value.code == 2 and "no visual prompts" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_on_sphere_keeps_the_geometry_of_a_3d_subspace():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 3, generator=g))[0].t()  # (3, 32) orthonormal rows
    coefficients = torch.randn(12, 3, generator=g)
    z3, w3 = visualize.on_sphere(coefficients[:9] @ basis, coefficients[9:] @ basis)
    centred = F.normalize(coefficients - coefficients.mean(0), dim=-1)
    projected = torch.cat([z3, w3])
    torch.testing.assert_close(projected @ projected.t(), centred @ centred.t(), rtol=0, atol=1e-5)  # a rotation
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(12))


def test_sphere_figure_draws_every_image_and_class(checkpoints, folder, vit_checkpoint, tmp_path, capsys):
    out = tmp_path / "sphere"
    visualize.main(["sphere", "--dataset", folder, "--root", str(tmp_path), "--checkpoint", checkpoints["coop"],
                    "--checkpoint", checkpoints["upt"], "--out", str(out), "--per-class", "4", "--workers", "0"])
    files = sorted(os.listdir(out))
    assert len(files) == 3 and files[-1] == "sphere_zeroshot.svg" and capsys.readouterr().out.count("wrote") == 3
    svg = ET.parse(out / "sphere_zeroshot.svg").getroot()
    dots = [c for c in svg.iter(f"{SVG}circle") if c.get("class") == "feature"]
    lines = [x for x in svg.iter(f"{SVG}line") if x.get("class") == "classifier"]
    ds = data.load_dataset(folder, str(tmp_path), check_splits=("test",))
    assert len(dots) == len(ds.test) == 12 and [x.get("data-class") for x in lines] == ds.classnames
    images = torch.stack([data.test_transform(32)(Image.open(p).convert("RGB")) for p, _ in ds.test])
    clip, _ = clip_model.load(vit_checkpoint, "cpu")  # the fp16 weights the script loads
    with torch.no_grad():  # by hand: every test image (the PCA does not depend on their order) and the zero-shot W
        z = F.normalize(clip.encode_image(images), dim=-1)
        w = ZeroShot(clip, ds.classnames, templates=["a photo of a {}."]).text_features.float()
    z3, w3 = visualize.on_sphere(z, w)
    xyz = lambda e: torch.tensor([float(v) for v in e.get("data-xyz").split()])  # noqa: E731
    torch.testing.assert_close(torch.stack([xyz(x) for x in lines]), w3, rtol=0, atol=1e-4)
    drawn = sorted(tuple(round(float(v), 3) for v in xyz(d)) for d in dots)
    assert drawn == sorted(tuple(round(float(v), 3) for v in p) for p in z3)

    with pytest.raises(SystemExit) as e:  # a checkpoint of other classes: refused, nothing written
        visualize.main(["sphere", "--dataset", folder, "--root", str(tmp_path), "--checkpoint", checkpoints["coop"],
                        "--out", str(tmp_path / "none"), "--workers", "0", "--backbone", "ViT-B/16"])
    assert e.value.code == 2 and "does not fit" in capsys.readouterr().err and not (tmp_path / "none").exists()
