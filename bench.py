"""Benchmark (a script, not a test): ms per training step, images/s and peak memory of each method, and the images/s
of the training loader, as markdown tables. The whole GPU table, with random weights (same speed, no download):

    python bench.py --random-init --backbone ViT-B/16 --classes 100,1000 --precision amp,fp32
A step is forward + cross-entropy + backward + SGD on random images (train.py's step with --no-feature-bank).
CUDA: CUDA events after synchronize; CPU: perf_counter. Warm-up steps (and compilation) are not timed.

    python bench.py --sweep --random-init --backbone ViT-B/16 --classes 10 --sweep-epochs 1,2,4
runs Rethinking Fig. 1's grid on one synthetic few-shot subset through train.py (CoOp m=16 and classifier fine-tuning,
3 lr x 3 epoch budgets each) with the feature bank and without it, and prints the two wall times side by side;
--eval-prompts times UPT's evaluation with its prompt side (θ, text features) once per evaluation vs once per batch.

    python bench.py --text-side coop16,coop4,cocoop1,cocoop4,upt --random-init --classes 100,1000 --steps 3 --warmup 1
times the text side of a step (forward + backward from image features, as from the feature bank; ImageNet's class
names) on the text encoder's plain path and on its prefix path (clip_model.Transformer.forward_prefixed), interleaved,
the minimum of --steps each; --coop-run adds one CoOp run (m = 16) from the feature bank through train.py both ways.
"""
import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import data
import runs
import train
from cocoop import CoCoOp
from coop import CoOp
from upt import UPT

# Official layouts, as CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#                           context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
ARCHITECTURES = {
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN101": (512, 224, (3, 4, 23, 3), 64, None, 77, 49408, 512, 8, 12),
    "RN50x4": (640, 288, (4, 6, 10, 6), 80, None, 77, 49408, 640, 10, 12),
    "RN50x16": (768, 384, (6, 8, 18, 8), 96, None, 77, 49408, 768, 12, 12),
    "RN50x64": (1024, 448, (3, 15, 36, 10), 128, None, 77, 49408, 1024, 16, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12),
    "ViT-L/14@336px": (768, 336, 24, 1024, 14, 77, 49408, 768, 12, 12),
}
PHOTO_SIZE = (500, 375)  # (W, H) of the loader's synthetic JPEGs: a typical photo (PASCAL VOC, many ImageNet images)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments: any bad value is one line on stderr and exit code 2

class BenchError(Exception):
    """Bad input: main() prints it on one line and returns 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors too: one line, no usage block
        raise BenchError(message)


def ints(least, many=False):
    """argparse type: an integer (or comma-separated integers) of at least `least`."""
    def parse(text):
        try:
            values = [int(v) for v in (text.split(",") if many else [text])]
        except ValueError:
            values = [least - 1]
        if min(values) < least:
            raise argparse.ArgumentTypeError(f"takes {'integers' if many else 'an integer'} >= {least}, not {text!r}")
        return values if many else values[0]
    return parse


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B/16", help=f"{', '.join(ARCHITECTURES)}, or a checkpoint path")
    p.add_argument("--random-init", action="store_true", help="random weights in the official layout (no download)")
    p.add_argument("--methods", default="coop,cocoop,vpt_shallow,vpt_deep,upt,linear_ft", help="comma-separated")
    p.add_argument("--classes", type=ints(1, many=True), default=[100], help="class counts K, e.g. 100,1000")
    p.add_argument("--precision", default="amp", help="amp (bf16, or fp16 + GradScaler), fp32, or amp,fp32")
    p.add_argument("--batch-size", type=ints(1), help="for every method (default: each method's: CoCoOp 1, others 32)")
    p.add_argument("--steps", type=ints(1), default=20, help="timed steps")
    p.add_argument("--warmup", type=ints(0), default=3, help="untimed steps before them")
    p.add_argument("--compile", action="store_true", help="torch.compile the method (compile time shown apart)")
    p.add_argument("--loader-workers", type=ints(0, many=True), default=[0, 2, 4, 8], help="e.g. 0,2,4,8")
    p.add_argument("--loader-images", type=ints(1), default=256, help="synthetic 500x375 JPEGs the loader reads")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--loader-only", action="store_true", help="only the loader table")
    only.add_argument("--no-loader", action="store_true", help="only the methods table")
    only.add_argument("--sweep", action="store_true", help="Rethinking Fig. 1's grid with and without the feature bank")
    only.add_argument("--eval-prompts", type=ints(1), metavar="N", help="UPT evaluation of N random images (batches "
                      "of 100, K = --classes): prompt side once per evaluation vs once per batch")
    only.add_argument("--text-side", metavar="ARMS", help="text-side step, plain vs prefix path, of comma-separated "
                      f"{', '.join(TEXT_SIDE)} (CoOp m = 16 / 4, CoCoOp B = 1 / 4 images, UPT) at each of --classes")
    p.add_argument("--coop-run", action="store_true", help="--text-side: also one CoOp m=16 run from the feature "
                   "bank (train.py, K = the first of --classes, --shots, 2 epochs), plain vs prefix path")
    p.add_argument("--sweep-epochs", type=ints(1, many=True), default=[1, 2, 4], help="the grid's epoch budgets "
                   "(the paper's 50,100,200, scaled down)")
    p.add_argument("--shots", type=ints(1), default=4, help="--sweep: training images per class")
    args = p.parse_args(argv)
    args.precision = args.precision.split(",")
    if bad := [x for x in args.precision if x not in ("amp", "fp32")]:
        raise BenchError(f"unknown --precision {bad[0]!r}: use amp, fp32 or amp,fp32")
    if args.backbone not in ARCHITECTURES and (args.random_init or not os.path.isfile(args.backbone)):
        raise BenchError(f"unknown --backbone {args.backbone!r}: use one of {', '.join(ARCHITECTURES)}"
                         + ("" if args.random_init else " or the path of a checkpoint file"))
    args.methods = {m: method_args(m) for m in args.methods.split(",")}
    if args.text_side is not None:
        args.text_side = args.text_side.split(",")
        if bad := [x for x in args.text_side if x not in TEXT_SIDE]:
            raise BenchError(f"unknown --text-side arm {bad[0]!r}: use some of {','.join(TEXT_SIDE)}")
    if args.coop_run and not args.text_side:
        raise BenchError("--coop-run is part of --text-side: add --text-side coop16 (or other arms)")
    return args


def method_args(method):
    """train.py's resolved settings of the method: the papers' defaults (batch size included)."""
    try:
        args = runs.resolve(train.parse_args(["--method", method, "--dataset", "dtd"]))
    except runs.RunError as e:  # unknown method, with "did you mean"
        raise BenchError(str(e)) from None
    if args.batch_size is None:  # zeroshot, linear_probe
        raise BenchError(f"{method} takes no SGD steps to time: choose methods trained by SGD, e.g. coop, linear_ft")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Loader: images/s of data.make_loader as train.py uses it on few-shot sets (images decoded in RAM, train transform)

def loader_rates(n_images, n_px, worker_counts, batch_size=32, epochs=3):
    """-> images/s per worker count, over `epochs` epochs after an untimed one (which starts the workers)."""
    rates, g = [], torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        items = [(os.path.join(folder, f"{i}.jpg"), i % 10) for i in range(n_images)]
        for path, _ in items:  # smooth random colours: photo-like JPEGs
            pixels = torch.randint(0, 256, (19, 25, 3), generator=g, dtype=torch.uint8).numpy()  # (H, W, 3)
            Image.fromarray(pixels).resize(PHOTO_SIZE, Image.BICUBIC).save(path, quality=90)
        for workers in worker_counts:
            loader = data.make_loader(items, data.train_transform(n_px), min(batch_size, n_images), train=True, seed=1,
                                      workers=workers, cache_images=True, log=lambda message: None)
            seen = 0
            for epoch in range(epochs + 1):
                loader.sampler.set_epoch(epoch)
                for images, _ in loader:
                    seen += len(images) if epoch else 0
                if epoch == 0:
                    t0 = time.perf_counter()
            rates.append(seen / (time.perf_counter() - t0))
            del loader  # stops its workers
    return rates


# ----------------------------------------------------------------------------------------------------------------------
# Methods: SGD steps on random images

def time_steps(step, steps, device):
    """Seconds per step: CUDA events after synchronize on CUDA, perf_counter on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device != "cuda":
        return (time.perf_counter() - t0) / steps
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / steps


def bench_method(clip, margs, K, precision, batch, args, device):
    """-> the row's cells after `batch`: ms/step, img/s, peak memory (and compile seconds)."""
    blank = [""] * (2 + args.compile)
    _, autocast, scaler, _ = train.setup_precision(precision, device)
    torch.cuda.empty_cache()  # the previous row's model is gone: its cached blocks too
    try:
        model = runs.build_method(margs, clip, [f"class name {i}" for i in range(K)]).to(device)  # 3-4 BPE tokens
    except clip_model.CLIPError as e:  # e.g. VPT on a ResNet
        return [f"not run: {e}"] + blank
    model.train()
    clip.eval()  # the frozen CLIP stays in eval mode, as in train.py
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, clip.visual.input_resolution, clip.visual.input_resolution, device=device)
    labels = torch.randint(0, K, (batch,), device=device)
    if args.compile:
        torch.compiler.reset()  # fresh per row: never the recompile limit, so never a silent fallback to eager
    forward = torch.compile(model) if args.compile else model

    def step():
        with autocast:
            loss = F.cross_entropy(forward(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    try:
        compile_seconds = time_steps(step, 1, device) if args.compile else 0  # compiles forward and backward
        for _ in range(args.warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = time_steps(step, args.steps, device)
    except torch.cuda.OutOfMemoryError:
        return ["out of memory"] + blank
    memory = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device == "cuda" else "n/a"
    return [f"{seconds * 1000:.1f}", f"{batch / seconds:.1f}", memory] + [f"{compile_seconds:.1f}"] * args.compile


def row(cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def table(header, rows=()):
    return "\n".join([row(header), "|" + "|".join("---" for _ in header) + "|"] + [row(r) for r in rows])


# ----------------------------------------------------------------------------------------------------------------------

SWEEP = {"coop": ["--n-ctx", "16"], "linear_ft": []}  # Rethinking §5.1: M = 16; classifier fine-tuning
SWEEP_LR = {"coop": ["2e-2", "2e-3", "2e-4"], "linear_ft": ["2e-1", "2e-2", "2e-3"]}


def synthetic_dataset(clip, folder, K, shots, test=2):
    """Write clip as OpenAI's fp16 state dict and a folder dataset of K classes x (shots train, `test` test) smooth
    random 500x375 JPEGs under folder -> (backbone path, --dataset value)."""
    g = torch.Generator().manual_seed(0)
    backbone = os.path.join(folder, "backbone.pt")
    torch.save({k: v.half() for k, v in clip.state_dict().items()}, backbone)
    for split, n in [("train", shots), ("test", test)]:
        for k in range(K):
            os.makedirs(os.path.join(folder, "data", split, f"class {k}"))
            for i in range(n):
                pixels = torch.randint(0, 256, (19, 25, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).resize(PHOTO_SIZE, Image.BICUBIC).save(
                    os.path.join(folder, "data", split, f"class {k}", f"{i}.jpg"))
    return backbone, f"folder:{folder}/data"


def sweep(clip, args):
    """-> wall seconds of the whole grid through train.run, with the feature bank and without, each in a fresh output
    dir (so each pays its own test features once) on the same synthetic subset: K classes x shots images."""
    with tempfile.TemporaryDirectory() as folder:
        backbone, dataset = synthetic_dataset(clip, folder, args.classes[0], args.shots)
        seconds = {}
        for arm, flag in [("feature bank", []), ("images every step", ["--no-feature-bank"])]:
            t0 = time.perf_counter()
            for method, options in SWEEP.items():
                for lr in SWEEP_LR[method]:
                    for epochs in args.sweep_epochs:
                        train.run(train.parse_args([
                            "--method", method, "--dataset", dataset, "--backbone", backbone,
                            "--shots", str(args.shots), "--epochs", str(epochs), "--lr", lr, "--workers", "2",
                            "--precision", args.precision[0], "--output-dir", os.path.join(folder, arm), *options,
                            *flag]))
            seconds[arm] = time.perf_counter() - t0
    return seconds


# ----------------------------------------------------------------------------------------------------------------------
# Text side: the text encoder's prefix path against its plain path (clip_model.CLIP.share_prefix = False)

TEXT_SIDE = ("coop16", "coop4", "cocoop1", "cocoop4", "upt")


def text_side_step(arm, clip, K, device):
    """-> (model, loss()) of one text-side step: cross-entropy of the logits of B random image features (as read from
    the feature bank; B = 32, CoCoOp's 1 or 4) over K ImageNet class names. UPT: its text features (θ, Eq. (2))
    against B fixed normalised image features, its image side left out. Eval mode: no dropout, so both paths agree."""
    names = [data.IMAGENET_CLASSNAMES[k % len(data.IMAGENET_CLASSNAMES)] for k in range(K)]
    g = torch.Generator().manual_seed(0)
    B = {"cocoop1": 1, "cocoop4": 4}.get(arm, 32)
    features = torch.randn(B, clip.visual.output_dim, generator=g).to(device)
    labels = torch.randint(0, K, (B,), generator=g).to(device)
    torch.manual_seed(0)
    if arm.startswith("coop"):
        model = CoOp(clip, names, n_ctx=int(arm[4:]))
    elif arm.startswith("cocoop"):
        model = CoCoOp(clip, names)
    else:
        model = UPT(clip, names)
    model = model.to(device).eval()
    image = F.normalize(features, dim=-1)
    logits = (lambda: clip.logit_scale.exp() * image @ model.prepare()[1].t()) if arm == "upt" else \
        (lambda: model.forward_features(features))
    return model, lambda: F.cross_entropy(logits().float(), labels)


def saved_for_backward(loss, frozen):
    """-> (loss(), bytes of the distinct storages autograd keeps for backward, the frozen weights excluded): the
    activation memory of a step, CPU's stand-in for CUDA's peak memory."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in frozen:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    return value, sum(storages.values())


def text_side(clip, arm, K, args, device):
    """-> {path: (seconds, memory bytes)} and the max relative difference of the two paths' parameter gradients:
    paths interleaved, 1 + --warmup untimed steps then the minimum of --steps; memory: CUDA peak or saved for
    backward, in the first step."""
    model, loss = text_side_step(arm, clip, K, device)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = {p.untyped_storage().data_ptr() for p in clip.parameters()}
    seconds, memory, grads = {"plain": [], "prefix": []}, {}, {}
    for i in range(1 + args.warmup + args.steps):  # step 0 measures memory and gradients, untimed
        for path in seconds:
            clip.share_prefix = path == "prefix"
            for p in params:
                p.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            value, saved = saved_for_backward(loss, frozen) if i == 0 and device != "cuda" else (loss(), 0)
            value.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if i > args.warmup:
                seconds[path].append(time.perf_counter() - t0)
            if i == 0:
                memory[path] = torch.cuda.max_memory_allocated() if device == "cuda" else saved
                grads[path] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    clip.share_prefix = True
    difference = ((grads["prefix"] - grads["plain"]).abs().max() / grads["plain"].abs().max()).item()
    return {path: (min(t), memory[path]) for path, t in seconds.items()}, difference


def coop_run(clip, args):
    """-> wall seconds of one CoOp m=16 run through train.run from the feature bank (K = the first of --classes,
    --shots, 2 epochs, 1 test image per class), on the plain path, then the prefix path, each in a fresh output dir:
    both pay the same image features."""
    seconds = {}
    with tempfile.TemporaryDirectory() as folder:
        backbone, dataset = synthetic_dataset(clip, folder, args.classes[0], args.shots, test=1)
        for path in ("plain", "prefix"):
            clip_model.CLIP.share_prefix = path == "prefix"  # the class attribute: train.run loads its own CLIP
            t0 = time.perf_counter()
            train.run(train.parse_args([
                "--method", "coop", "--n-ctx", "16", "--dataset", dataset, "--backbone", backbone, "--shots",
                str(args.shots), "--epochs", "2", "--workers", "2", "--precision", args.precision[0],
                "--output-dir", os.path.join(folder, path)]))
            seconds[path] = time.perf_counter() - t0
    clip_model.CLIP.share_prefix = True
    return seconds


@torch.no_grad()
def eval_prompts(clip, n_images, K, device, repeats=3):
    """-> best-of-`repeats` seconds of UPT evaluating n_images, θ + text features once per batch, then once in all."""
    model = runs.build_method(method_args("upt"), clip, [f"class name {i}" for i in range(K)]).to(device).eval()
    images = torch.randn(n_images, 3, clip.visual.input_resolution, clip.visual.input_resolution, device=device)
    ways = {"once per batch": lambda: [model(b) for b in images.split(100)],
            "once per evaluation": lambda: [model(b, prepared) for prepared in [model.prepare()]
                                            for b in images.split(100)]}
    return {way: min(time_steps(f, 1, device) for _ in range(repeats + 1)) for way, f in ways.items()}


def load_clip(args, device):
    if not args.random_init:
        return clip_model.load(args.backbone, device)[0]  # official weights (downloaded once) or a checkpoint file
    torch.manual_seed(0)
    with torch.device(device):  # built in place: seconds, even for RN50x64
        return clip_model.CLIP(*ARCHITECTURES[args.backbone]).eval()


def main(argv=None):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args = parse_args(argv)
        clip = None if args.loader_only else load_clip(args, device)
    except (BenchError, clip_model.CLIPError) as e:
        print(f"bench.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    layout = ARCHITECTURES.get(args.backbone)
    n_px = clip.visual.input_resolution if clip else layout[1] if layout else 224  # the loader's output size
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    weights = "loader only" if args.loader_only else "random weights" if args.random_init else "loaded weights"
    print(f"bench.py | torch {torch.__version__} | {name} | {datetime.date.today()} | {args.backbone}, {weights}")
    if not (args.no_loader or args.sweep or args.eval_prompts or args.text_side):
        rates = loader_rates(args.loader_images, n_px, args.loader_workers)
        print(f"\nLoader: data.make_loader, train transform at {n_px} px on images decoded in RAM ({args.loader_images}"
              f" synthetic {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs), batch {min(32, args.loader_images)}, 3 epochs after"
              " an untimed one. A run is input-bound where a method's img/s below exceeds the loader's at train.py's"
              " --workers (default 4).\n")
        print(table(["workers", "img/s"], [[w, f"{r:.1f}"] for w, r in zip(args.loader_workers, rates)]))
    if args.sweep:
        runs = len(SWEEP) * 3 * len(args.sweep_epochs)
        seconds = sweep(clip, args)
        print(f"\nRethinking Fig. 1 grid: {runs} runs (CoOp m=16 and classifier FT x 3 lr x epochs "
              f"{','.join(map(str, args.sweep_epochs))}), {args.classes[0]} classes x {args.shots} shots, "
              f"{args.backbone}:\n")
        bank = seconds["feature bank"]
        print(table(["trained from", "grid wall s", "vs feature bank"],
                    [[arm, f"{t:.1f}", f"{t / bank:.2f}x"] for arm, t in seconds.items()]))
    if args.eval_prompts:
        seconds = eval_prompts(clip, args.eval_prompts, args.classes[0], device)
        per_evaluation = seconds["once per evaluation"]
        print(f"\nUPT evaluation, {args.eval_prompts} images, K={args.classes[0]}:\n")
        print(table(["prompt side computed", "ms", "vs once per evaluation"],
                    [[way, f"{t * 1000:.1f}", f"{t / per_evaluation:.2f}x"] for way, t in seconds.items()]))
    if args.text_side:
        memory = "peak mem" if device == "cuda" else "saved for backward"
        _, autocast, _, precision = train.setup_precision(args.precision[0], device)
        print(f"\nText side of a step (forward + backward from image features), plain vs prefix path, "
              f"{precision}, minimum of {args.steps} after {args.warmup} warm-up, interleaved; memory: "
              f"{'CUDA peak' if device == 'cuda' else 'activations autograd saves (CPU), frozen weights excluded'}; "
              f"diff: max relative difference of the gradients.\n")
        print(table(["arm", "K", "plain ms", "prefix ms", "speed-up", f"plain {memory}", f"prefix {memory}",
                     "memory ratio", "diff"]), flush=True)
        for K in args.classes:
            for arm in args.text_side:
                with autocast:
                    paths, diff = text_side(clip, arm, K, args, device)
                plain, prefix = paths["plain"], paths["prefix"]
                print(row([arm, K, f"{plain[0] * 1000:.0f}", f"{prefix[0] * 1000:.0f}", f"{plain[0] / prefix[0]:.2f}x",
                           f"{plain[1] / 2 ** 20:.0f} MiB", f"{prefix[1] / 2 ** 20:.0f} MiB",
                           f"{plain[1] / max(prefix[1], 1):.2f}x", f"{diff:.1e}"]), flush=True)
        if args.coop_run:
            seconds = coop_run(clip, args)
            print(f"\nCoOp m=16 run from the feature bank (train.py): {args.classes[0]} classes x {args.shots} shots, "
                  "2 epochs, 1 test image per class:\n")
            print(table(["text encoder path", "run wall s", "speed-up"],
                        [[path, f"{t:.1f}", f"{seconds['plain'] / t:.2f}x"] for path, t in seconds.items()]))
    if args.loader_only or args.sweep or args.eval_prompts or args.text_side:
        return 0
    batch_rule = f"{args.batch_size} for every method" if args.batch_size else \
        "each method's default (CoCoOp 1, others 32; --batch-size sets one for all)"
    print(f"\nTraining step: {args.steps} timed after {args.warmup} warm-up; batch {batch_rule}"
          + ("; fp32 uses TF32 matmuls" if device == "cuda" else "")
          + ("; torch.compile, compile s = the first step, not timed" if args.compile else "") + ".\n")
    print(table(["method", "K", "precision", "batch", "ms/step", "img/s", "peak mem"] + ["compile s"] * args.compile),
          flush=True)
    precisions = {train.setup_precision(p, device).precision: p for p in args.precision}  # on CPU, amp is fp32: once
    for label, precision in precisions.items():
        for K in args.classes:
            for method, margs in args.methods.items():
                batch = args.batch_size or margs.batch_size
                cells = bench_method(clip, margs, K, precision, batch, args, device)
                print(row([method, K, label, batch, *cells]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
