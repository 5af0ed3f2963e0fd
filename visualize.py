"""Look inside trained models, as UPT's figures do (arXiv:2210.07225):

    python visualize.py attention --checkpoint VPT.pt --checkpoint UPT.pt --images a.jpg b.jpg --out DIR [--last 1]
    python visualize.py sphere --dataset eurosat --root DATA --checkpoint COOP.pt --checkpoint VPT.pt
                               --checkpoint UPT.pt --out DIR [--per-class 20]

attention (Fig. 6): the self-attention of each visual prompt token (query) to the image patches (keys) in the last ViT
blocks, averaged over heads and prompt tokens, as a heat map over each image (PNG, one grid per block: a row per image,
a column per checkpoint, one colour scale per image so the models compare). sphere (Fig. 2): image features z of test
images and the classifier W (Eq. (1)) of zero-shot CLIP and each checkpoint, L2-normalised, projected to 3D by PCA of
the normalised points and put back on the unit sphere; one SVG per model (points: z, lines: W, a colour per class).
"""
import argparse
import math
import os
import sys
import tempfile
import xml.etree.ElementTree as ET

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import clip_model
import data
import figures
import runs
from coop import CoOp
from linear_ft import LinearFT
from upt import UPT
from vpt import VPT
from zeroshot import ZeroShot

UPT_TEMPLATE = "a photo of a {}."  # UPT App. B: zero-shot CLIP's template


def load_trained(path, device):
    """A train.py checkpoint -> (its model with the trained parameters, its settings and classnames)."""
    checkpoint = runs.load_checkpoint(path)
    args = argparse.Namespace(**checkpoint["args"], classnames=checkpoint["classnames"])
    clip, _ = clip_model.load(args.backbone, device)
    model = runs.build_method(args, clip, checkpoint["classnames"]).to(device)
    runs.load_trainable(model, checkpoint["model"], path)
    return model.eval(), args


# ----------------------------------------------------------------------------------------------------------------------
# Fig. 6: prompt -> patch attention

def visual_prompts(model):
    """-> (the visual prompts (depth, n, Dv) clip_model's ViT takes, after_ln_pre) of a VPT or UPT model."""
    if isinstance(model, VPT):
        return model.prompts, model.after_ln_pre
    if isinstance(model, UPT):
        return model.prompt_pair()[1], False
    raise runs.RunError(f"{type(model).__name__} has no visual prompts: pass vpt_* or upt* checkpoints")


def prompt_attention(clip, images, prompts, after_ln_pre, blocks):
    """-> {block: (B, n, N)}: softmax(q k^T / sqrt(d)) of the ViT's blocks `blocks`, averaged over heads, rows = the n
    prompt tokens (positions 1..n, after CLS), columns = the N image patches."""
    captured, resblocks = {}, clip.visual.transformer.resblocks
    hooks = [resblocks[i].register_forward_pre_hook(lambda module, inputs, i=i: captured.__setitem__(i, inputs[0]))
             for i in blocks]
    try:
        with torch.no_grad():
            clip.encode_image(images, prompts, after_ln_pre)
    finally:
        for hook in hooks:
            hook.remove()
    n, out = prompts.shape[-2], {}
    for i in blocks:
        block, x = resblocks[i], captured[i].float()  # (B, 1 + n + N, D): the block's input
        B, L, D = x.shape
        heads = block.attn.heads
        qkv = F.linear(block.ln_1(x).float(), block.attn.in_proj_weight.float(), block.attn.in_proj_bias.float())
        q, k, _ = qkv.view(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, L, D / heads)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(D // heads)).softmax(-1)  # (B, heads, L, L)
        out[i] = attention.mean(1)[:, 1:1 + n, 1 + n:]  # (B, n, N)
    return out


def heat(values, size):
    """(g, g) values in [0, 1] -> an RGB PIL image of `size`: dark blue -> red -> yellow."""
    v = values.clamp(0, 1)
    rgb = torch.stack([(2 * v).clamp(0, 1), (2 * v - 1).clamp(0, 1), (1 - 2 * v).clamp(0, 1) * 0.6], -1)  # (g, g, 3)
    return Image.fromarray((255 * rgb).round().to(torch.uint8).numpy()).resize(size, Image.BILINEAR)


def attention_figure(checkpoints, image_paths, out, last=1, device="cpu"):
    """Write OUT/attention_block<i>.png for the last `last` ViT blocks; -> {path: {label: mean attention mass of a
    prompt token on the patches}}."""
    models = [load_trained(path, device) for path in checkpoints]
    labels = [f"{args.method} ({os.path.basename(os.path.dirname(os.path.abspath(p)))})"
              for (_, args), p in zip(models, checkpoints)]
    resolution = models[0][0].clip.visual.input_resolution
    if any(m.clip.visual.input_resolution != resolution for m, _ in models):
        raise runs.RunError("the checkpoints use backbones of different input sizes: compare models of one backbone")
    try:
        originals = [Image.open(p).convert("RGB") for p in image_paths]
    except OSError as e:
        raise runs.RunError(f"cannot read image {e.filename or e}: pass image files (JPEG, PNG)") from None
    transform, shown = data.test_transform(resolution), [crop(image, resolution) for image in originals]
    images = torch.stack([transform(image) for image in originals]).to(device)  # (B, 3, H, W)
    layers = models[0][0].clip.visual.transformer.layers
    if last > layers:
        raise runs.RunError(f"--last {last}: the ViT has {layers} blocks")
    blocks = list(range(layers - last, layers))
    maps = [prompt_attention(m.clip, images, *visual_prompts(m), blocks) for m, _ in models]  # per model {block: ...}
    os.makedirs(out, exist_ok=True)
    written, cell, pad = {}, 160, 18
    for i in blocks:
        patch_maps = [m[i].mean(1) for m in maps]  # per model (B, N): mean over prompt tokens
        g = int(math.isqrt(patch_maps[0].shape[-1]))
        grid = Image.new("RGB", ((1 + len(models)) * cell, pad + len(shown) * cell), "white")
        draw = ImageDraw.Draw(grid)
        for c, text in enumerate(["image", *labels]):
            draw.text((c * cell + 4, 3), text[:26], fill="black")
        for b, image in enumerate(shown):
            top = max(float(p[b].max()) for p in patch_maps) or 1.0  # one scale per image, shared by the models
            grid.paste(image.resize((cell, cell)), (0, pad + b * cell))
            for c, p in enumerate(patch_maps, 1):
                overlay = Image.blend(image, heat(p[b].view(g, g).cpu() / top, image.size), 0.55)
                grid.paste(overlay.resize((cell, cell)), (c * cell, pad + b * cell))
        path = os.path.join(out, f"attention_block{i}.png")
        save_png(grid, path)
        written[path] = {label: float(m[i].sum(-1).mean()) for label, m in zip(labels, maps)}
    return written


def crop(image, size):
    """The test transform's resize (short side) and centre crop, without normalisation: what the model saw."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def save_png(image, path):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png.tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------------------
# Fig. 2: features and classifiers on the unit sphere

def features_and_classifier(model, images):
    """-> (z (B, E), W (K, E)), both L2-normalised: the image features and the classifier of Eq. (1)."""
    clip = model.clip
    with torch.no_grad():
        if isinstance(model, VPT):
            z, w = clip.encode_image(images, model.prompts, model.after_ln_pre), model.text_features
        elif isinstance(model, UPT):
            prompts, w = model.prepare()
            z = clip.encode_image(images, prompts)
        elif isinstance(model, CoOp):
            z, w = clip.encode_image(images), model.text_features()
        elif isinstance(model, (ZeroShot, LinearFT)):
            z, w = clip.encode_image(images), getattr(model, "text_features", None)
            w = model.weight if w is None else w
        else:
            raise runs.RunError(f"{type(model).__name__} has no class-wise classifier in CLIP's space (CoCoOp's "
                                 "depends on the image, the linear probe's is not): pass zeroshot, coop, vpt_*, upt* "
                                 "or linear_ft checkpoints")
    return F.normalize(z.float(), dim=-1), F.normalize(w.float(), dim=-1)


def on_sphere(z, w):
    """PCA to 3D of the normalised points z (B, E) and w (K, E) together, each projection rescaled to unit length:
    -> (B, 3), (K, 3)."""
    points = torch.cat([z, w])
    mean = points.mean(0)
    _, _, vh = torch.linalg.svd(points - mean, full_matrices=False)  # rows of vh: principal directions
    axes = vh[:3] * torch.sign(vh[:3].sum(-1, keepdim=True) + 1e-12)  # a sign fixed per axis: the same run, same view
    projected = F.normalize((points - mean) @ axes.t(), dim=-1)  # (B + K, 3)
    return projected[:len(z)], projected[len(z):]


def view(p, azimuth=0.6, elevation=0.35):
    """Orthographic view of unit vectors (M, 3): -> screen x, y in [-1, 1] and depth (> 0: the visible hemisphere)."""
    ca, sa, ce, se = math.cos(azimuth), math.sin(azimuth), math.cos(elevation), math.sin(elevation)
    x = ca * p[:, 0] - sa * p[:, 1]
    y0 = sa * p[:, 0] + ca * p[:, 1]
    return x, ce * p[:, 2] - se * y0, se * p[:, 2] + ce * y0


def sphere_svg(title, z3, labels, w3, classnames):
    size, r, c = 420, 170, 210
    svg = ET.Element("svg", xmlns="http://www.w3.org/2000/svg", width=str(size + 180), height=str(size + 30),
                             font_family="sans-serif", font_size="11")
    figures.el(svg, "rect", width=size + 180, height=size + 30, fill="white")
    figures.el(svg, "text", title, x=10, y=18, font_size=13, font_weight="bold")
    figures.el(svg, "circle", cx=c, cy=c + 20, r=r, fill="none", stroke="#999")
    colour = lambda k: figures.COLOURS[k % len(figures.COLOURS)]  # noqa: E731
    x, y, depth = view(z3)
    for i in sorted(range(len(z3)), key=lambda i: float(depth[i])):  # back to front
        dot = figures.el(svg, "circle", cx=c + r * float(x[i]), cy=c + 20 - r * float(y[i]), r=2.5,
                         fill=colour(int(labels[i])), fill_opacity="0.85" if depth[i] > 0 else "0.25")
        for key, value in [("class", "feature"), ("data-class", classnames[int(labels[i])]),
                           ("data-xyz", " ".join(f"{float(v):.6f}" for v in z3[i]))]:
            dot.set(key, value)
    x, y, depth = view(w3)
    for k in range(len(w3)):
        line = figures.el(svg, "line", x1=c, y1=c + 20, x2=c + r * float(x[k]), y2=c + 20 - r * float(y[k]),
                          stroke=colour(k), stroke_width=2.5, stroke_dasharray=None if depth[k] > 0 else "4 3")
        for key, value in [("class", "classifier"), ("data-class", classnames[k]),
                           ("data-xyz", " ".join(f"{float(v):.6f}" for v in w3[k]))]:
            line.set(key, value)
    for k, name in enumerate(classnames[:20]):
        figures.el(svg, "circle", cx=size + 10, cy=40 + 16 * k, r=4, fill=colour(k))
        figures.el(svg, "text", name[:24], x=size + 18, y=44 + 16 * k)
    if len(classnames) > 20:
        figures.el(svg, "text", f"... {len(classnames) - 20} more classes", x=size + 10, y=44 + 16 * 20)
    figures.el(svg, "text", "dots: image features z; lines: classifier weights W (dashed/faint: the far side)",
               x=10, y=size + 24, font_size=10, fill="#333")
    return svg


def sphere_figure(dataset, root, checkpoints, out, per_class=20, backbone=None, seed=1, device="cpu", workers=4):
    """Write OUT/sphere_<label>.svg for zero-shot CLIP and each checkpoint; -> the paths."""
    trained = [load_trained(path, device) for path in checkpoints]
    backbone = backbone or (trained[0][1].backbone if trained else "ViT-B/16")
    ds = data.load_dataset(dataset, root, check_splits=("test",))
    for model, args in trained:
        if list(args.classnames) != list(ds.classnames) or args.backbone != backbone:
            raise runs.RunError(f"a checkpoint of {args.dataset} ({args.backbone}) does not fit {dataset} "
                                 f"({backbone}): pass checkpoints trained on --dataset's classes with one backbone")
    g = torch.Generator().manual_seed(seed)
    by_class = {}
    for item in ds.test:
        by_class.setdefault(item[1], []).append(item)
    items = [c[j] for c in by_class.values() for j in torch.randperm(len(c), generator=g)[:per_class].tolist()]
    clip, _ = clip_model.load(backbone, device)
    models = [(ZeroShot(clip, ds.classnames, templates=[UPT_TEMPLATE]).to(device), "zeroshot")]
    models += [(m, f"{a.method}_{os.path.basename(os.path.dirname(os.path.abspath(p)))}")
               for (m, a), p in zip(trained, checkpoints)]
    loader = data.make_loader(items, data.test_transform(clip.visual.input_resolution), 64, train=False,
                              workers=workers)
    os.makedirs(out, exist_ok=True)
    paths = []
    for model, label in models:
        z, labels, w = [], [], None
        for images, y in loader:
            zi, w = features_and_classifier(model, images.to(device))
            z.append(zi.cpu())
            labels.append(y)
        z3, w3 = on_sphere(torch.cat(z), w.cpu())
        paths.append(os.path.join(out, f"sphere_{label}.svg"))
        figures.write_svg(paths[-1], sphere_svg(f"{label} on {dataset}: {len(items)} test images", z3,
                                                torch.cat(labels), w3, ds.classnames))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="figure", required=True)
    a = commands.add_parser("attention", help="UPT Fig. 6: prompt -> patch attention maps of VPT / UPT checkpoints")
    a.add_argument("--checkpoint", action="append", required=True, help="checkpoint.pt of a vpt_* or upt* run; repeat "
                   "it to compare models")
    a.add_argument("--images", nargs="+", required=True, help="image files (the paper: ImageNet test images)")
    a.add_argument("--last", type=int, default=1, help="the last N ViT blocks, one PNG each (the paper: the last)")
    s = commands.add_parser("sphere", help="UPT Fig. 2: features and classifiers on the unit sphere")
    s.add_argument("--dataset", required=True, help="the checkpoints' dataset (the paper: eurosat, oxford_flowers)")
    s.add_argument("--root", default=os.environ.get("DATA", "DATA"), help="folder holding the datasets ($DATA)")
    s.add_argument("--checkpoint", action="append", default=[], help="checkpoint.pt of a coop, vpt_*, upt* or "
                   "linear_ft run; repeat it (zero-shot CLIP is always drawn)")
    s.add_argument("--backbone", help="zero-shot CLIP's backbone when no checkpoint is given (default ViT-B/16)")
    s.add_argument("--per-class", type=int, default=20, help="test images per class")
    s.add_argument("--workers", type=int, default=4, help="data loading processes")
    for c in (a, s):
        c.add_argument("--out", required=True, help="folder the figures are written to")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        if args.figure == "attention":
            if args.last < 1:
                raise runs.RunError(f"--last must be 1 or more (got {args.last})")
            for path, mass in attention_figure(args.checkpoint, args.images, args.out, args.last, device).items():
                print(f"wrote {path} | prompt attention on the patches: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in mass.items()))
        else:
            if args.per_class < 1:
                raise runs.RunError(f"--per-class must be 1 or more (got {args.per_class})")
            for path in sphere_figure(args.dataset, args.root, args.checkpoint, args.out, args.per_class,
                                      args.backbone, device=device, workers=args.workers):
                print(f"wrote {path}")
    except (runs.RunError, data.DataError, clip_model.CLIPError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
