"""One training loop for every method: few-shot prompt learning on a frozen CLIP, with AMP, exact resume and evaluation.

    python train.py --method upt --dataset dtd --shots 8 --root DATA
    python train.py --method coop --dataset imagenet --shots 16 --eval-datasets imagenetv2,imagenet_sketch,imagenet_a,imagenet_r
    python train.py --method coop --dataset dtd --subsample new --eval-only --checkpoint output/.../checkpoint.pt
"""
import argparse
import contextlib
import difflib
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

import clip_model
import data
from cocoop import CoCoOp
from coop import CoOp
from linear_ft import LinearFT, LinearProbe, fit_linear_probe
from upt import UPT
from vpt import VPT
from zeroshot import HANDCRAFTED, IMAGENET_TEMPLATES_SELECT, TEMPLATES, ZeroShot

METHODS = ["zeroshot", "coop", "cocoop", "vpt_shallow", "vpt_deep", "upt", "upt_joint", "upt_shared", "upt_mlp",
           "linear_ft", "linear_probe"]
MODEL_ARGS = ["method", "backbone", "n_ctx", "ctx_init", "csc", "class_token_position", "depth", "released_code", "prompt"]


class RunError(Exception):
    """A clear reason to stop (impossible options, missing checkpoint, diverged loss): one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--dataset", required=True, help="CoOp dataset name (e.g. dtd, imagenet) or folder:/path")
    p.add_argument("--root", default=os.environ.get("DATA", "DATA"), help="folder holding the datasets ($DATA)")
    p.add_argument("--download", action="store_true", help="download the dataset with torchvision where possible")
    p.add_argument("--shots", type=int, default=16, help="training images per class (CoOp: 1, 2, 4, 8, 16)")
    p.add_argument("--seed", type=int, default=1, help="seed of the few-shot subset and of initialisation (1, 2, 3)")
    p.add_argument("--subsample", default="all", choices=["all", "base", "new"], help="base-to-new class split")
    p.add_argument("--backbone", default="ViT-B/16", help="OpenAI model name (ViT-B/16, RN50, ...) or checkpoint path")
    p.add_argument("--epochs", type=int, help="default: CoOp's schedule (1 shot 50, 2/4 shots 100, 8/16 shots 200, "
                                              "ImageNet 50; CoCoOp 10)")
    p.add_argument("--lr", type=float, default=0.002, help="SGD learning rate (CoOp, UPT App. B)")
    p.add_argument("--batch-size", type=int, help="default 32 (CoCoOp: 1)")
    p.add_argument("--precision", default="amp", choices=["amp", "fp32"], help="amp: bf16 (or fp16 + GradScaler) on CUDA")
    p.add_argument("--workers", type=int, default=4, help="data loading processes")
    p.add_argument("--output-dir", default="output", help="runs go to OUTPUT/<dataset>/<method>/...; results.jsonl here")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint; no training")
    p.add_argument("--checkpoint", help="checkpoint.pt written by a previous run (with --eval-only)")
    p.add_argument("--eval-datasets", default="", help="comma-separated test-only datasets evaluated with the trained "
                                                         "model, e.g. imagenetv2,imagenet_sketch,imagenet_a,imagenet_r")
    m = p.add_argument_group("method options")
    m.add_argument("--n-ctx", type=int, help="prompt tokens (CoOp 16; CoCoOp, VPT, UPT 4, as in the UPT paper)")
    m.add_argument("--ctx-init", help="initialise the text context from words (CoCoOp default: 'a photo of a')")
    m.add_argument("--csc", action="store_true", help="CoOp: class-specific contexts")
    m.add_argument("--class-token-position", default="end", help="CoOp: end, middle or front")
    m.add_argument("--depth", type=int, default=1, help="UPT: layers of both encoders that get prompts (Eq. 5's U^i)")
    m.add_argument("--released-code", action="store_true", help="UPT: reproduce the released code's prompt transformer")
    m.add_argument("--prompt", default="dataset", help="zeroshot: dataset (CoOp's per-dataset template), ensemble "
                   f"(7 ImageNet templates), {', '.join(HANDCRAFTED)}, randtoken or randembed (Rethinking §4)")
    args = p.parse_args(argv)
    if args.method not in METHODS:
        close = difflib.get_close_matches(args.method, METHODS, n=1)
        raise RunError(f"unknown method {args.method!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; choose from {', '.join(METHODS)}")
    if args.shots < 0 or (args.shots == 0 and args.method not in ("zeroshot",) and not args.eval_only):
        raise RunError(f"--shots must be positive (got {args.shots})")
    if args.backbone not in clip_model.available_models() and not os.path.isfile(args.backbone):
        raise RunError(f"unknown --backbone {args.backbone!r}: use one of {', '.join(clip_model.available_models())} "
                       "or the path of a checkpoint file")
    if args.eval_only and not args.checkpoint and args.method != "zeroshot":
        raise RunError("--eval-only needs --checkpoint PATH (a checkpoint.pt written by training)")
    return args


def default_epochs(args):
    if args.method == "cocoop":
        return 10
    if args.dataset == "imagenet":
        return 50
    return 50 if args.shots <= 1 else 100 if args.shots <= 4 else 200


# ----------------------------------------------------------------------------------------------------------------------
# Model

def zeroshot_templates(args):
    if args.prompt == "dataset":
        return [TEMPLATES.get(args.dataset, "a photo of a {}.")]
    if args.prompt == "ensemble":  # CoOp's ZeroshotCLIP2: the 7 ImageNet templates (+ the dataset's, except ImageNet)
        own = [TEMPLATES[args.dataset]] if args.dataset in TEMPLATES and args.dataset != "imagenet" else []
        return list(IMAGENET_TEMPLATES_SELECT) + own
    if args.prompt in HANDCRAFTED:
        return [HANDCRAFTED[args.prompt]]
    if args.prompt in ("randtoken", "randembed"):
        return ["{}."]
    raise RunError(f"unknown --prompt {args.prompt!r}; choose dataset, ensemble, {', '.join(HANDCRAFTED)}, "
                   "randtoken or randembed")


def build_method(args, clip, classnames):
    """The method named by --method, with the paper's defaults unless an option overrides them."""
    template = TEMPLATES.get(args.dataset, "a photo of a {}.")
    n_ctx = lambda default: default if args.n_ctx is None else args.n_ctx
    if args.method == "zeroshot":
        random_prompt = {"randtoken": "token", "randembed": "embedding"}.get(args.prompt)
        return ZeroShot(clip, classnames, templates=zeroshot_templates(args), random_prompt=random_prompt,
                        n_random=n_ctx(4), seed=args.seed)
    if args.method == "coop":
        return CoOp(clip, classnames, n_ctx=n_ctx(16), ctx_init=args.ctx_init or "", csc=args.csc,
                    class_token_position=args.class_token_position)
    if args.method == "cocoop":
        return CoCoOp(clip, classnames, n_ctx=n_ctx(4), ctx_init="a photo of a" if args.ctx_init is None else args.ctx_init)
    if args.method in ("vpt_shallow", "vpt_deep"):
        return VPT(clip, classnames, n_ctx=n_ctx(4), deep=args.method == "vpt_deep", template=template)
    if args.method.startswith("upt"):
        variant = {"upt": "attention", "upt_joint": "joint", "upt_shared": "shared", "upt_mlp": "mlp"}[args.method]
        return UPT(clip, classnames, n_ctx=n_ctx(4), depth=args.depth, variant=variant, released_code=args.released_code)
    if args.method == "linear_probe":  # weights come from fit_linear_probe or a checkpoint
        K = len(classnames)
        return LinearProbe(clip, torch.zeros(K, clip.visual.output_dim), torch.zeros(K))
    return LinearFT(clip, classnames, template=template)


def class_specific(args):
    """Names of the parameters that hold one row per class; every other parameter is class-agnostic."""
    return {"linear_ft": ["weight"], "linear_probe": ["weight", "bias"], "coop": ["ctx"] if args.csc else []}.get(
        args.method, [])


def restrict_to_classes(state, args, source_classnames, target_classnames):
    """Evaluate a trained model on other classes (ImageNet-A/-R's 200, base -> new): class-agnostic parameters carry
    over unchanged; class-specific ones keep the rows of the target classes, found by name."""
    index = {name: i for i, name in enumerate(source_classnames)}
    out = dict(state)
    for key in class_specific(args):
        missing = [name for name in target_classnames if name not in index]
        if missing:
            raise RunError(f"{args.method}'s {key} is class-specific, and {missing[0]!r} was not a training class")
        out[key] = state[key][[index[name] for name in target_classnames]]
    return out


def trainable_state(model):
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: frozen image features are computed once and cached on disk (keyed by backbone, transform and image list)

@torch.no_grad()
def image_features(clip, items, transform, args, device, autocast):
    key = hashlib.sha1(json.dumps([args.backbone, repr(transform), items]).encode()).hexdigest()[:16]
    path = os.path.join(args.output_dir, "feature_cache", f"{key}.pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)
    feats = []
    for images, _ in data.make_loader(items, transform, 256, train=False, workers=args.workers):
        with autocast:
            feats.append(clip.encode_image(images.to(device, non_blocking=True)).float().cpu())
    feats = torch.cat(feats) if feats else torch.zeros(0, clip.visual.output_dim)
    save_atomic(feats, path)
    return feats


@torch.no_grad()
def evaluate(model, items, num_classes, args, device, autocast):
    """-> (accuracy %, macro-F1 %) on items [(path, label)]."""
    model.eval()
    transform = data.test_transform(model.clip.visual.input_resolution)
    labels = torch.tensor([label for _, label in items])
    if hasattr(model, "forward_features"):  # frozen, prompt-free image path: cached features, text side once
        feats = image_features(model.clip, items, transform, args, device, autocast).to(device)
        with autocast:
            preds = model.forward_features(feats).argmax(-1).cpu()
    else:
        preds = []
        for images, _ in data.make_loader(items, transform, 100, train=False, workers=args.workers):
            with autocast:
                preds.append(model(images.to(device, non_blocking=True)).argmax(-1).cpu())
        preds = torch.cat(preds)
    K = num_classes
    confusion = torch.bincount(labels * K + preds, minlength=K * K).view(K, K).double()  # (true, predicted)
    tp, present = confusion.diag(), (confusion.sum(0) + confusion.sum(1)) > 0
    f1 = 2 * tp / (confusion.sum(0) + confusion.sum(1)).clamp(min=1)  # macro over classes seen or predicted (Dassl)
    return 100 * tp.sum().item() / max(len(items), 1), 100 * f1[present].mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: trainable parameters + optimizer + resolved arguments, written atomically

def save_atomic(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path} not found: pass a checkpoint.pt written by train.py")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"checkpoint {path} is unreadable ({type(e).__name__}): train again or pick another file") from None


def lr_at(epoch, args):
    """Dassl's schedule, stepped per epoch: 1 warm-up epoch at constant 1e-5, then cosine from lr over `epochs`."""
    return 1e-5 if epoch == 0 else 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))


# ----------------------------------------------------------------------------------------------------------------------
# Main: args -> device/precision -> data -> model -> optimizer -> loop -> eval -> save

def setup_precision(precision, device):
    """fp32 master weights; on CUDA, autocast to bf16 (or fp16 with a GradScaler where bf16 is unsupported)."""
    amp = precision == "amp" and device == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device, dtype=dtype) if amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device, enabled=amp and dtype == torch.float16)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return autocast, scaler, str(dtype).replace("torch.", "amp ") if amp else "fp32"


def run(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast, scaler, precision = setup_precision(args.precision, device)

    checkpoint = None
    if args.eval_only and args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        for key in MODEL_ARGS:  # the model is rebuilt as it was trained; dataset/subsample come from this command line
            setattr(args, key, checkpoint["args"][key])
    args.epochs = args.epochs or default_epochs(args)
    args.batch_size = args.batch_size or (1 if args.method == "cocoop" else 32)
    run_dir = os.path.join(args.output_dir, args.dataset.replace("folder:", "").strip("/").replace("/", "_"), args.method,
                           args.backbone.replace("/", "-"), f"shots{args.shots}_seed{args.seed}_{args.subsample}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    print(f"torch {torch.__version__} | device {device} | precision {precision} | git {commit}")
    print("args:", json.dumps(vars(args), sort_keys=True))

    ds = data.load_dataset(args.dataset, args.root, shots=args.shots, seed=args.seed,
                           subsample=args.subsample, download=args.download)
    if not args.eval_only and args.method != "zeroshot":
        most = max(Counter(label for _, label in ds.train).values(), default=0)
        if most < args.shots:
            raise RunError(f"--shots {args.shots} is more than the {most} training images any class of "
                           f"{args.dataset} has: use --shots {most} or fewer")
    torch.manual_seed(args.seed)  # prompt initialisation; the few-shot subset has its own seeded RNG
    clip, _ = clip_model.load(args.backbone, device)
    model = build_method(args, clip, ds.classnames).to(device)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.method}: {n_trainable:,} trainable parameters "
          f"({100 * n_trainable / sum(p.numel() for p in clip.parameters()):.4f}% of CLIP) | {len(ds.classnames)} classes")

    start = time.time()
    if checkpoint is not None:
        model.load_state_dict(restrict_to_classes(checkpoint["model"], args, checkpoint["classnames"], ds.classnames),
                              strict=False)
    elif args.method == "linear_probe":
        model = train_linear_probe(clip, ds, args, device, autocast)
        save_atomic(dict(model=trainable_state(model), epoch=0, args=vars(args), classnames=ds.classnames),
                    os.path.join(run_dir, "checkpoint.pt"))
    elif n_trainable:
        train(model, ds, args, run_dir, device, autocast, scaler)
    train_seconds = time.time() - start

    results = []
    for name in [args.dataset] + [d for d in args.eval_datasets.split(",") if d]:
        target = ds if name == args.dataset else data.load_dataset(name, args.root)  # all classes, test split
        if target is not ds:
            state = restrict_to_classes(trainable_state(model), args, ds.classnames, target.classnames)
            model = build_method(args, clip, target.classnames).to(device)
            model.load_state_dict(state, strict=False)
        accuracy, macro_f1 = evaluate(model, target.test, len(target.classnames), args, device, autocast)
        print(f"test {name}: accuracy {accuracy:.2f}% | macro-F1 {macro_f1:.2f}% | {len(target.test)} images")
        results.append(dict(method=args.method, dataset=name, train_dataset=args.dataset, backbone=args.backbone,
                            shots=args.shots, seed=args.seed, subsample=args.subsample, accuracy=round(accuracy, 4),
                            macro_f1=round(macro_f1, 4), train_seconds=round(train_seconds, 1),
                            trainable_params=n_trainable, epochs=args.epochs, eval_only=args.eval_only,
                            peak_memory_mb=round(torch.cuda.max_memory_allocated() / 2 ** 20) if device == "cuda" else None))
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.jsonl"), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    return results


def train(model, ds, args, run_dir, device, autocast, scaler):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    transform = data.train_transform(model.clip.visual.input_resolution)
    print(f"train transform: {transform}")
    loader = data.make_loader(ds.train, transform, args.batch_size, train=True, workers=args.workers)
    path, start_epoch = os.path.join(run_dir, "checkpoint.pt"), 0
    if args.resume and os.path.isfile(path):
        state = load_checkpoint(path)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        print(f"resumed from {path} at epoch {start_epoch}")
    chance = 100 / len(ds.classnames)
    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(args.seed * 100_003 + epoch)  # each epoch's shuffle, augmentation and dropout: exact resume
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args)
        model.train()
        model.clip.eval()  # frozen CLIP stays in eval mode (RN50 BatchNorm statistics untouched)
        t0, total_loss, correct, seen = time.time(), torch.zeros((), device=device), torch.zeros((), device=device), 0
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast:
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.detach() * len(labels)
            correct += (logits.argmax(-1) == labels).sum()
            seen += len(labels)
        loss, accuracy = total_loss.item() / max(seen, 1), 100 * correct.item() / max(seen, 1)
        if not math.isfinite(loss):
            raise RunError(f"loss became {loss} in epoch {epoch + 1}: lower --lr or use --precision fp32 "
                             f"(the last good checkpoint is {path})")
        seconds = time.time() - t0
        memory = f" | mem {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device == "cuda" else ""
        print(f"epoch {epoch + 1}/{args.epochs} | loss {loss:.4f} | acc {accuracy:.2f}% | lr {lr_at(epoch, args):.2e} | "
              f"{seconds:.1f}s | eta {seconds * (args.epochs - epoch - 1) / 60:.1f} min{memory}", flush=True)
        save_atomic(dict(model=trainable_state(model), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         epoch=epoch + 1, args=vars(args), classnames=ds.classnames), path)
    if args.epochs > 1 and accuracy < 1.5 * chance:
        print(f"warning: train accuracy {accuracy:.1f}% is near chance ({chance:.1f}%): the run may have collapsed")


def train_linear_probe(clip, ds, args, device, autocast):
    """Linear probe (CLIP / CoOp protocol): logistic regression on frozen features of center-cropped images."""
    transform = data.test_transform(clip.visual.input_resolution)
    features = lambda items: image_features(clip, items, transform, args, device, autocast)
    labels = lambda items: torch.tensor([label for _, label in items], dtype=torch.long)
    probe = fit_linear_probe(clip, features(ds.train), labels(ds.train), features(ds.val), labels(ds.val),
                             num_classes=len(ds.classnames))
    print(f"linear probe: C = {probe.cost} (validation accuracy {probe.val_accuracy})")
    return probe.to(device)


def main(argv=None):
    try:
        run(parse_args(argv))
    except (RunError, data.DataError, clip_model.CLIPError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
