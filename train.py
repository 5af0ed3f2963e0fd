"""One training loop for every method: few-shot prompt learning on a frozen CLIP, with AMP, exact resume and evaluation.

    python train.py --method upt --dataset dtd --shots 8 --root DATA
    python train.py --method coop --dataset imagenet --eval-datasets imagenetv2,imagenet_sketch,imagenet_a,imagenet_r
    python train.py --method cocoop --dataset dtd --subsample base --eval-datasets dtd:new   (base-to-new)
    python train.py --method coop --dataset dtd --subsample new --eval-only --checkpoint output/.../checkpoint.pt

A run is named by every setting that can change its result (its run id): runs never share a folder or a checkpoint.
Every evaluation appends one row, with all those settings, to <output-dir>/results.jsonl.
"""
import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

import clip_model
import data
from features import FeatureBank, backbone_weights, image_features
from linear_ft import fit_linear_probe
from runs import (METHODS, POSITIONS, PROMPTS, TRAINED, Interrupted, RunError, append_rows, build_method,
                  checkpoint_of, describe, diverged, git_commit, hold_run, load_checkpoint, load_data, load_trainable,
                  progress, resolve, restrict_to_classes, resume, run_dir, run_id, save_atomic, settings_of, too_long,
                  trainable_state)


# ----------------------------------------------------------------------------------------------------------------------
# Arguments: an option a method does not use defaults to None; runs.resolve() fills the papers' defaults, rejects the rest

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--dataset", required=True, help="CoOp dataset name (e.g. dtd, imagenet) or folder:/path")
    p.add_argument("--root", default=os.environ.get("DATA", "DATA"), help="folder holding the datasets ($DATA)")
    p.add_argument("--download", action="store_true", help="fetch a missing dataset (torchvision) and split file")
    p.add_argument("--shots", type=int, help="training images per class (CoOp: 1, 2, 4, 8, 16; default 16)")
    p.add_argument("--seed", type=int, help="seed of the few-shot subset, initialisation, order and augmentation "
                                            "(the papers average 1, 2, 3; default 1)")
    p.add_argument("--subsample", default="all", choices=["all", "base", "new"], help="base-to-new class split")
    p.add_argument("--backbone", help="OpenAI model name (default ViT-B/16; RN50, ...) or checkpoint path")
    p.add_argument("--epochs", type=int, help="default: CoOp's schedule (1 shot 50, 2/4 shots 100, 8/16 shots 200, "
                                              "ImageNet 50; CoCoOp 10); epoch 1 is a warm-up at lr 1e-5")
    p.add_argument("--lr", type=float, help="SGD learning rate (default 0.002: CoOp, UPT App. B)")
    p.add_argument("--batch-size", type=int, help="default 32 (CoCoOp: 1)")
    p.add_argument("--precision", default="amp", choices=["amp", "fp32"], help="amp: bf16 (or fp16 + GradScaler) on CUDA")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # as torch counts
    p.add_argument("--workers", type=int, default=min(4, cpus), help="data loading processes (at most the CPUs)")
    p.add_argument("--output-dir", default="output", help="runs go to OUTPUT/<dataset>/<method>/...; results.jsonl here")
    p.add_argument("--resume", action="store_true", help="continue this run's last checkpoint (same settings)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --dataset/--subsample; no training")
    p.add_argument("--checkpoint", help="checkpoint.pt written by a previous run (with --eval-only)")
    p.add_argument("--eval-datasets", default="", help="comma-separated NAME[:all|base|new] also evaluated with the "
                   "trained model: imagenetv2,imagenet_sketch,imagenet_a,imagenet_r (UPT Table 1); dtd:new (base-to-new)")
    p.add_argument("--no-feature-bank", dest="feature_bank", action="store_false", default=None,
                   help="coop, cocoop, linear_ft: encode augmented images in every run instead of reading the feature "
                        "bank shared by all runs on the same subset (same numbers, slower)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (compile time is logged)")
    m = p.add_argument_group("method options (an option the method does not use is an error)")
    m.add_argument("--n-ctx", type=int, help="prompt tokens (CoOp 16; CoCoOp, VPT, UPT 4, as in the UPT paper). With "
                   "--ctx-init, a smaller value learns only the first n tokens and keeps the rest as fixed words "
                   "(CoOp's reading: its n is the word count). A random context is seeded by --seed: reproducible, "
                   "but not the official code's draw")
    m.add_argument("--ctx-init", help="coop, cocoop: initialise the text context from these words (CoCoOp default: "
                   "'a photo of a'); all their BPE tokens are learned unless --n-ctx is smaller (CoOp learns one per "
                   "word: 'an itap of a' is 5 tokens, pass --n-ctx 4 for CoOp's reading)")
    m.add_argument("--csc", action="store_true", default=None, help="coop: class-specific contexts; with --ctx-init each "
                   "class learns its own copy of the words (CoOp's code ignores --csc then: drop it for that)")
    m.add_argument("--class-token-position", help=f"coop: {', '.join(POSITIONS)} (default end)")
    m.add_argument("--depth", type=int, help="upt: layers of both encoders that get prompts (Eq. 5's U^i; default 1)")
    m.add_argument("--released-code", action="store_true", default=None,
                   help="upt: the released code's prompt transformer; vpt_*: the released VPT (normal(0, 0.02) "
                        "prompts; VPT-deep's layer-0 prompts after ln_pre)")
    m.add_argument("--prompt", help=f"zeroshot: {', '.join(PROMPTS)} (default dataset: CoOp's per-dataset template; "
                                    "ensemble: 7 ImageNet templates; Rethinking Table 1-2)")
    m.add_argument("--template", help="zeroshot, vpt_*, linear_ft: a template with {} for the class name, e.g. "
                                      "'a photo of a {}.' (UPT App. B); default CoOp's per-dataset template")
    m.add_argument("--random-length", type=int, help="zeroshot randtoken/randembed: random tokens prepended (default 4)")
    return p.parse_args(argv)


def plan(argv):
    """What `python train.py ARGV` will do, without doing it: its settings, run id, folder and evaluation targets."""
    return describe(resolve(parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------------
# Device and precision: fp32 master weights; on CUDA, autocast to bf16 (or fp16 with a GradScaler)

class Compute(NamedTuple):
    device: str  # "cuda" or "cpu"
    autocast: contextlib.AbstractContextManager  # torch.autocast on CUDA with --precision amp, else a no-op
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    precision: str  # what runs: "amp bfloat16", "amp float16" or "fp32" (--precision amp is fp32 on a CPU)


def setup_precision(precision, device):
    amp = precision == "amp" and device == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device, dtype=dtype) if amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device, enabled=amp and dtype == torch.float16)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Compute(device, autocast, scaler, str(dtype).replace("torch.", "amp ") if amp else "fp32")


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule: SGD, momentum 0.9, weight decay 5e-4 (CoOp, UPT App. B)

def lr_at(epoch, args):
    """Dassl's schedule, stepped per epoch: 1 warm-up epoch at constant 1e-5, then cosine from lr over `epochs`."""
    return 1e-5 if epoch == 0 else 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))


# ----------------------------------------------------------------------------------------------------------------------
# The training loop

def training_batches(model, ds, args, compute):
    """-> (epoch -> iterator of (inputs, labels), batches per epoch, forward, what it trains from).
    Either way an epoch's batches are consecutive chunks of data.epoch_order(N, seed, epoch), the last dropped when
    incomplete (Dassl), and image i is augmented under data.augmentation_seed(seed, epoch, i)."""
    N, size, device = len(ds.train), args.batch_size, compute.device
    n_batches = N // size if N >= size else 1
    bank = args.feature_bank and FeatureBank(model.clip, ds.train, backbone=args.backbone, seed=args.seed,
                                             output_dir=args.output_dir, workers=args.workers, device=device,
                                             autocast=compute.autocast)
    if bank and bank.fits(args.epochs, args.output_dir):
        labels = torch.tensor([label for _, label in ds.train], device=device)
        return lambda epoch: bank.batches(epoch, labels, size, n_batches), n_batches, model.forward_features, bank
    loader = data.make_loader(ds.train, data.train_transform(model.clip.visual.input_resolution), size, train=True,
                              seed=args.seed, workers=args.workers)
    print(f"train transform: {loader.dataset.transform}")

    def image_batches(epoch):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return image_batches, n_batches, model, "images"


def train(model, ds, args, settings, compute):
    """SGD on the method's parameters, a checkpoint after every epoch; -> what it trained from, and the seconds spent
    training, over every session of a resumed run (None when an older checkpoint did not record them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    device, autocast, scaler = compute.device, compute.autocast, compute.scaler
    path, accuracy = os.path.join(run_dir(args, settings), "checkpoint.pt"), None
    start, (start_epoch, earlier) = time.time(), resume(path, args, settings, model, optimizer, scaler)
    spent = lambda: None if earlier is None else earlier + time.time() - start  # every session's (Rethinking Table 3)
    batches, n_batches, forward, train_from = training_batches(model, ds, args, compute)
    forward = torch.compile(forward) if args.compile else forward  # compiled at the first step (slow)
    chance = 100 / len(ds.classnames)
    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(data.augmentation_seed(args.seed, epoch, -1))  # this epoch's dropout stream: exact resume
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args)
        model.train()
        model.clip.eval()  # frozen CLIP stays in eval mode (RN50 BatchNorm statistics untouched)
        t0, total_loss, correct, seen = time.time(), torch.zeros((), device=device), torch.zeros((), device=device), 0
        for inputs, y in progress(batches(epoch), n_batches, f"epoch {epoch + 1}/{args.epochs}"):
            with autocast:
                logits = forward(inputs)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.detach() * len(y)
            correct += (logits.argmax(-1) == y).sum()
            seen += len(y)
        loss, accuracy = total_loss.item() / max(seen, 1), 100 * correct.item() / max(seen, 1)
        if not math.isfinite(loss):
            raise diverged(loss, epoch, args, path, saved_epoch=epoch, precision=compute.precision)  # 0: none
        seconds = time.time() - t0
        memory = f" | mem {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device == "cuda" else ""
        print(f"epoch {epoch + 1}/{args.epochs} | loss {loss:.4f} | acc {accuracy:.2f}% | lr {lr_at(epoch, args):.2e} | "
              f"{seconds:.1f}s | eta {seconds * (args.epochs - epoch - 1) / 60:.1f} min{memory}", flush=True)
        save_atomic(checkpoint_of(model, args, ds, settings, epoch + 1, optimizer, scaler, train_seconds=spent()), path)
    if isinstance(train_from, FeatureBank):
        print(f"feature bank {train_from.dir}: {train_from.reused} epochs reused, {train_from.built} built")
    if accuracy is not None and args.epochs > 1 and accuracy < 1.5 * chance:
        print(f"warning: train accuracy {accuracy:.1f}% is near chance ({chance:.1f}%): the run may have collapsed")
    return "feature bank" if isinstance(train_from, FeatureBank) else train_from, spent()


def cached_features(clip, items, transform, args, compute):
    """(N, E) image features of `items`, from OUTPUT/feature_cache/ when an earlier run computed them (features.py)."""
    return image_features(clip, items, transform, backbone=args.backbone, output_dir=args.output_dir,
                          workers=args.workers, device=compute.device, autocast=compute.autocast)


def train_linear_probe(clip, ds, args, compute):
    """Linear probe (CLIP / CoOp protocol): logistic regression on frozen features of center-cropped images."""
    transform = data.test_transform(clip.visual.input_resolution)
    features = lambda items: cached_features(clip, items, transform, args, compute)
    labels = lambda items: torch.tensor([label for _, label in items], dtype=torch.long)
    probe = fit_linear_probe(clip, features(ds.train), labels(ds.train), features(ds.val), labels(ds.val),
                             num_classes=len(ds.classnames), seed=args.seed)
    accuracy = "" if probe.val_accuracy is None else f", validation accuracy {100 * probe.val_accuracy:.2f}%"
    print(f"linear probe: C = {probe.cost:.6g}, chosen by {probe.cost_search}{accuracy}")
    return probe.to(compute.device)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: one results row per target

@torch.no_grad()
def evaluate(model, items, num_classes, args, compute):
    """-> (accuracy %, macro-F1 %) on items [(path, label)]."""
    model.eval()
    device, autocast = compute.device, compute.autocast
    transform = data.test_transform(model.clip.visual.input_resolution)
    labels = torch.tensor([label for _, label in items])
    if hasattr(model, "forward_features"):  # frozen, prompt-free image path: cached features, text side once
        features = cached_features(model.clip, items, transform, args, compute).to(device)
        with autocast:
            preds = model.forward_features(features).argmax(-1).cpu()
    else:  # what does not depend on the image (UPT's θ and text features) is computed once, not per batch
        forward = functools.partial(model, prepared=model.prepare()) if hasattr(model, "prepare") else model
        preds, loader = [], data.make_loader(items, transform, 100, train=False, workers=args.workers)
        for images, _ in progress(loader, len(loader), f"evaluating {len(items)} images"):
            with autocast:
                preds.append(forward(images.to(device, non_blocking=True)).argmax(-1).cpu())
        preds = torch.cat(preds)
    K = num_classes
    confusion = torch.bincount(labels * K + preds, minlength=K * K).view(K, K).double()  # (true, predicted)
    tp, present = confusion.diag(), (confusion.sum(0) + confusion.sum(1)) > 0
    f1 = 2 * tp / (confusion.sum(0) + confusion.sum(1)).clamp(min=1)  # macro over classes seen or predicted (Dassl)
    return 100 * tp.sum().item() / max(len(items), 1), 100 * f1[present].mean().item()


def train_and_evaluate(args, settings, commit, ds, targets, compute):
    classnames, class_ids = ds.classnames, ds.class_ids
    if args.eval_only:  # the checkpoint's classes (e.g. base), evaluated below on the target's (e.g. new)
        checkpoint = load_checkpoint(args.checkpoint)
        classnames, class_ids = checkpoint["classnames"], checkpoint.get("class_ids", checkpoint["classnames"])
    torch.manual_seed(args.seed or 0)  # prompt initialisation; the few-shot subset has its own seeded RNG
    clip, _ = clip_model.load(args.backbone, compute.device)
    build = lambda names: build_method(args, clip, names).to(compute.device)
    try:  # every target's model built before training: its prompts are checked to fit CLIP's context
        model = build(classnames)
        others = {key: build(target.classnames) for key, target in targets if target.class_ids != class_ids}
    except clip_model.TextTooLong as e:
        raise too_long(e, args, [c for _, t in targets for c in t.classnames]) from None
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.method}: {n_trainable:,} trainable parameters "
          f"({100 * n_trainable / sum(p.numel() for p in clip.parameters()):.4f}% of CLIP) | {len(classnames)} classes")
    start, train_from, fit = time.time(), None, {}
    if args.eval_only:  # the training's seconds and fit, as the checkpoint recorded them
        load_trainable(model, checkpoint["model"], args.checkpoint)
        train_seconds, fit = checkpoint.get("train_seconds"), checkpoint.get("fit") or {}
    elif args.method == "linear_probe":
        model, train_seconds = train_linear_probe(clip, ds, args, compute), time.time() - start
        fit = dict(linear_probe_c=model.cost, linear_probe_c_search=model.cost_search,
                   linear_probe_val_accuracy=model.val_accuracy)
        save_atomic(checkpoint_of(model, args, ds, settings, 0, train_seconds=train_seconds, fit=fit),
                    os.path.join(run_dir(args, settings), "checkpoint.pt"))
    elif n_trainable:
        train_from, train_seconds = train(model, ds, args, settings, compute)
    else:
        train_seconds = time.time() - start
    trained, trained_state = model, trainable_state(model)

    rows, weights = [], backbone_weights(args.backbone)
    for (name, subsample), target in targets:
        model = others.get((name, subsample), trained)
        if model is not trained:  # other classes: the trained state restricted to them (never another target's)
            model.load_state_dict(restrict_to_classes(trained_state, args.method, args.csc, class_ids, target.class_ids),
                                  strict=False)
        t0 = time.time()
        accuracy, macro_f1 = evaluate(model, target.test, len(target.classnames), args, compute)
        print(f"test {name} ({subsample}): accuracy {accuracy:.2f}% | macro-F1 {macro_f1:.2f}% | {len(target.test)} images")
        row = {"run_id": run_id(settings), **settings, "weights": weights.source, "weights_sha256": weights.sha256,
               "train_dataset": settings["dataset"],
               "train_subsample": settings["subsample"], "dataset": name, "subsample": subsample,
               "accuracy": round(accuracy, 4), "macro_f1": round(macro_f1, 4), "test_images": len(target.test),
               "eval_only": args.eval_only, "checkpoint": args.checkpoint, "train_from": train_from,
               "train_seconds": train_seconds if train_seconds is None else round(train_seconds, 1), "eval_seconds": round(time.time() - t0, 1),
               "trainable_params": n_trainable, "precision_used": compute.precision, "compile": args.compile,
               "device": torch.cuda.get_device_name() if compute.device == "cuda" else "cpu", "git": commit,
               "time": datetime.datetime.now().isoformat(timespec="seconds"),
               "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20) if compute.device == "cuda" else None,
               **fit}
        append_rows(os.path.join(args.output_dir, "results.jsonl"), [row])  # written as soon as it is known
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Main

def run(args):
    """Train (or load) the model of `args`, evaluate it on every target, append a row per target; -> the rows."""
    resolve(args)
    compute = setup_precision(args.precision, "cuda" if torch.cuda.is_available() else "cpu")
    settings = args.trained if args.eval_only else settings_of(args)
    directory, commit = run_dir(args, settings), git_commit()
    asked = "" if args.precision in compute.precision else f" (--precision {args.precision}: autocast runs on CUDA only)"
    print(f"torch {torch.__version__} | device {compute.device} | precision {compute.precision}{asked} | git {commit}")
    print(f"run {run_id(settings)} in {directory}\nsettings: {json.dumps(settings)}")
    if args.epochs == 1 and not args.eval_only:
        print("note: --epochs 1 trains only Dassl's warm-up epoch, at lr 1e-5; the cosine schedule starts at epoch 2")
    ds, targets = load_data(args)
    with hold_run(args, directory, trains=args.method in TRAINED and not args.eval_only):
        return train_and_evaluate(args, settings, commit, ds, targets, compute)


def main(argv=None):
    try:
        run(parse_args(argv))
    except (RunError, data.DataError, clip_model.CLIPError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # before training started
        print("interrupted before training: nothing was saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
