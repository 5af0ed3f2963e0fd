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
import difflib
import functools
import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

try:
    import fcntl  # file locks (POSIX); without it, concurrent runs are not detected
except ImportError:
    fcntl = None

import clip_model
import data
from cocoop import CoCoOp
from coop import POSITIONS, CoOp
from linear_ft import LinearFT, LinearProbe, fit_linear_probe
from upt import UPT
from vpt import VPT
from zeroshot import HANDCRAFTED, IMAGENET_TEMPLATES_SELECT, TEMPLATES, ZeroShot

METHODS = ["zeroshot", "coop", "cocoop", "vpt_shallow", "vpt_deep", "upt", "upt_joint", "upt_shared", "upt_mlp",
           "linear_ft", "linear_probe"]
PROMPTS = ["dataset", "ensemble", *HANDCRAFTED, "randtoken", "randembed"]
PROMPTED = ["coop", "cocoop", "vpt_shallow", "vpt_deep", "upt", "upt_joint", "upt_shared", "upt_mlp"]
TRAINED = [m for m in METHODS if m != "zeroshot"]
# The options each method reads: any other one given on the command line is an error, not silently ignored.
USED_BY = {
    "shots": TRAINED, "seed": TRAINED, "epochs": PROMPTED + ["linear_ft"], "lr": PROMPTED + ["linear_ft"],
    "batch_size": PROMPTED + ["linear_ft"], "n_ctx": PROMPTED, "ctx_init": ["coop", "cocoop"], "csc": ["coop"],
    "class_token_position": ["coop"], "depth": ["upt", "upt_shared", "upt_mlp"],
    "released_code": ["upt", "vpt_shallow", "vpt_deep"], "prompt": ["zeroshot"],
    "template": ["zeroshot", "vpt_shallow", "vpt_deep", "linear_ft"], "random_length": ["zeroshot"],
    "feature_bank": ["coop", "cocoop", "linear_ft"],  # frozen, unprompted image path: features of augmented images
}
# A run's identity: every setting that can change its result. The run id hashes them; each results row holds them.
IDENTITY = ["method", "dataset", "subsample", "backbone", "precision", *USED_BY]
FEATURE_CACHE_BUDGET = 20 * 2 ** 30  # bytes of cached test features per output dir; the oldest files go first
BANK_BUDGET = 100 * 2 ** 30  # bytes one feature bank may take (and never more than the free disk space)


class RunError(Exception):
    """A clear reason to stop (impossible options, missing checkpoint, diverged loss): one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C: one line saying where the last checkpoint is; exit code 130."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments: options a method does not use default to None; resolve() fills the papers' defaults and rejects the rest

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--dataset", required=True, help="CoOp dataset name (e.g. dtd, imagenet) or folder:/path")
    p.add_argument("--root", default=os.environ.get("DATA", "DATA"), help="folder holding the datasets ($DATA)")
    p.add_argument("--download", action="store_true", help="download the dataset with torchvision where possible")
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
    p.add_argument("--workers", type=int, default=4, help="data loading processes (results do not depend on it)")
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


def default_epochs(args):
    if args.method == "cocoop":
        return 10
    if args.dataset == "imagenet":
        return 50
    return 50 if args.shots <= 1 else 100 if args.shots <= 4 else 200


def option(key):
    return "--no-feature-bank" if key == "feature_bank" else "--" + key.replace("_", "-")


def resolve(args):
    """Check the command line and fill each setting the method uses with the papers' default; the others stay None."""
    if args.method not in METHODS:
        close = difflib.get_close_matches(args.method, METHODS, n=1)
        raise RunError(f"unknown method {args.method!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; choose from {', '.join(METHODS)}")
    if args.dataset.startswith("folder:"):
        args.dataset = "folder:" + os.path.abspath(args.dataset.removeprefix("folder:"))
    if args.workers < 0:
        raise RunError(f"--workers must be 0 or more (got {args.workers})")
    if args.eval_only:
        return resolve_from_checkpoint(args)
    if args.checkpoint:
        raise RunError("--checkpoint is read by --eval-only only (to continue training, use --resume)")
    if args.method in ("zeroshot", "linear_probe") and args.resume:
        raise RunError(f"--resume: {args.method} has no epochs to resume; drop it")
    if args.prompt in ("randtoken", "randembed") and args.seed is None:
        args.seed = 1  # the random prompt's draw
    for key, methods in USED_BY.items():
        given = getattr(args, key) is not None
        if given and args.method not in methods and not (key == "seed" and args.prompt in ("randtoken", "randembed")):
            raise RunError(f"{option(key)} is not used by {args.method} (only by {', '.join(methods)}): drop it")
    args.backbone = args.backbone or "ViT-B/16"
    if args.backbone not in clip_model.available_models() and not os.path.isfile(args.backbone):
        raise RunError(f"unknown --backbone {args.backbone!r}: use one of {', '.join(clip_model.available_models())} "
                       "or the path of a checkpoint file")
    uses = lambda key: args.method in USED_BY[key]
    if uses("shots"):
        args.shots = 16 if args.shots is None else args.shots
        args.seed = 1 if args.seed is None else args.seed
    if uses("epochs"):
        args.epochs = args.epochs if args.epochs is not None else default_epochs(args)
        args.lr = 0.002 if args.lr is None else args.lr
        if args.batch_size is None:
            args.batch_size = 1 if args.method == "cocoop" else 32
    for key, value in [("shots", args.shots), ("epochs", args.epochs), ("batch_size", args.batch_size),
                       ("n_ctx", args.n_ctx), ("depth", args.depth), ("random_length", args.random_length)]:
        if value is not None and value < 1:
            raise RunError(f"{option(key)} must be at least 1 (got {value})")
    if args.lr is not None and not args.lr > 0:
        raise RunError(f"--lr must be positive (got {args.lr})")
    if args.method == "coop":
        args.ctx_init, args.csc = args.ctx_init or "", bool(args.csc)
        args.class_token_position = args.class_token_position or "end"
        if args.class_token_position not in POSITIONS:
            raise RunError(f"--class-token-position must be one of {', '.join(POSITIONS)} (got "
                           f"{args.class_token_position!r})")
    if args.method == "cocoop":
        args.ctx_init = "a photo of a" if args.ctx_init is None else args.ctx_init
    if args.ctx_init and args.n_ctx is None:  # n_ctx defaults to the init's token count (CoOp: its word count)
        try:
            args.n_ctx = len(clip_model.tokenize(args.ctx_init.replace("_", " "))[0].nonzero()) - 2
        except clip_model.TextTooLong as e:
            raise RunError(f"--ctx-init is {e.n_tokens} tokens, over CLIP's {e.context_length}: shorten it") from None
    if uses("n_ctx"):
        args.n_ctx = args.n_ctx or (16 if args.method == "coop" else 4)
    if uses("depth"):
        args.depth = args.depth or 1
    if uses("released_code"):
        args.released_code = bool(args.released_code)
    if uses("feature_bank"):
        args.feature_bank = args.feature_bank is not False
    if uses("template") or args.method == "zeroshot":
        resolve_template(args)
    return args


def resolve_template(args):
    """zeroshot: --prompt NAME or a free --template; vpt_* and linear_ft: --template (default: the dataset's)."""
    if args.method == "zeroshot":
        if args.prompt and args.template:
            raise RunError("--prompt and --template both name the zero-shot text: pass one")
        args.prompt = None if args.template else (args.prompt or "dataset")
        if args.prompt is not None and args.prompt not in PROMPTS:
            close = difflib.get_close_matches(args.prompt, PROMPTS, n=1)
            raise RunError(f"unknown --prompt {args.prompt!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; choose from {', '.join(PROMPTS)}, or pass a --template")
        random = args.prompt in ("randtoken", "randembed")
        if args.random_length is not None and not random:
            raise RunError("--random-length is read by --prompt randtoken or randembed only: drop it")
        args.random_length = (args.random_length or 4) if random else None
        if args.prompt in ("ensemble", "randtoken", "randembed"):
            return
        args.template = args.template or HANDCRAFTED.get(args.prompt)
    args.template = args.template or TEMPLATES.get(args.dataset, "a photo of a {}.")
    try:
        ok = args.template.count("{}") == 1 and bool(args.template.format("x"))
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise RunError(f"--template {args.template!r} must hold {{}} once, for the class name (e.g. 'a photo of a {{}}.')")


def resolve_from_checkpoint(args):
    """--eval-only: the model and its training settings come from the checkpoint; the command line names only the
    evaluation target (--dataset, --subsample, --eval-datasets) and how to run it."""
    if args.method == "zeroshot":
        raise RunError("zeroshot never trains: drop --eval-only")
    if not args.checkpoint:
        raise RunError("--eval-only needs --checkpoint PATH (a checkpoint.pt written by training)")
    if args.resume:
        raise RunError("--eval-only and --resume exclude each other: pick one")
    for key in USED_BY:
        if getattr(args, key) is not None:
            raise RunError(f"{option(key)} comes from the checkpoint with --eval-only: drop it")
    checkpoint = load_checkpoint(args.checkpoint)
    trained = settings_of(checkpoint["args"])
    if trained["method"] != args.method:
        raise RunError(f"{args.checkpoint} was trained with --method {trained['method']}, not {args.method}: "
                       f"pass --method {trained['method']}")
    if args.backbone not in (None, trained["backbone"]):
        raise RunError(f"{args.checkpoint} was trained on --backbone {trained['backbone']}, not {args.backbone}: "
                       "drop --backbone")
    args.trained, args.eval_dataset, args.eval_subsample = trained, args.dataset, args.subsample
    for key, value in trained.items():
        if key not in ("dataset", "subsample", "precision"):
            setattr(args, key, value)
    return args


def settings_of(namespace):
    """The run's identity (IDENTITY) from resolved arguments or a checkpoint's saved args."""
    values = namespace if isinstance(namespace, dict) else vars(namespace)
    out = {key: values.get(key) for key in IDENTITY}
    for key, methods in USED_BY.items():  # older checkpoints saved unused options with their defaults
        if out["method"] not in methods and not (key == "seed" and out.get("prompt") in ("randtoken", "randembed")):
            out[key] = None
    return out


def run_id(settings):
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def run_dir(args, settings):
    """OUTPUT/<dataset>/<method>/<backbone>/s<shots>_seed<seed>_<subsample>/<run id>: readable, and unique."""
    dataset = settings["dataset"]
    if dataset.startswith("folder:"):
        dataset = "folder_" + os.path.basename(dataset.rstrip("/"))
    backbone = settings["backbone"]
    backbone = backbone.replace("/", "-") if backbone in clip_model.available_models() else \
        os.path.splitext(os.path.basename(backbone))[0]
    subset = "_".join(p for p in [settings["shots"] and f"s{settings['shots']}",
                                  settings["seed"] and f"seed{settings['seed']}", settings["subsample"]] if p)
    return os.path.join(args.output_dir, dataset, settings["method"], backbone, subset, run_id(settings))


def plan(argv):
    """What `python train.py ARGV` will do, without doing it: its settings, run id, folder and evaluation targets."""
    args = resolve(parse_args(argv))
    settings = settings_of(args)
    return dict(settings=settings, run_id=run_id(settings), run_dir=run_dir(args, settings),
                targets=eval_targets(args))


def eval_targets(args):
    """[(dataset, subsample)]: the trained (or --eval-only) dataset first, then every --eval-datasets entry."""
    targets = [(args.eval_dataset, args.eval_subsample) if args.eval_only else (args.dataset, args.subsample)]
    for entry in filter(None, (e.strip() for e in args.eval_datasets.split(","))):
        name, _, subsample = entry.rpartition(":") if entry.endswith((":all", ":base", ":new")) else (entry, "", "all")
        if name.startswith("folder:"):
            name = "folder:" + os.path.abspath(name.removeprefix("folder:"))
        targets.append((name, subsample))
    return list(dict.fromkeys(targets))


# ----------------------------------------------------------------------------------------------------------------------
# Model

def build_method(args, clip, classnames):
    """The method named by --method, with the resolved settings."""
    if args.method == "zeroshot":
        templates = ((*IMAGENET_TEMPLATES_SELECT, *([TEMPLATES[args.dataset]] if args.dataset in TEMPLATES and
                                                     args.dataset != "imagenet" else []))
                     if args.prompt == "ensemble" else ["{}."] if args.random_length else [args.template])
        random_prompt = {"randtoken": "token", "randembed": "embedding"}.get(args.prompt)
        return ZeroShot(clip, classnames, templates=templates, random_prompt=random_prompt,
                        n_random=args.random_length or 4, seed=args.seed or 1)
    if args.method == "coop":
        return CoOp(clip, classnames, n_ctx=args.n_ctx, ctx_init=args.ctx_init, csc=args.csc,
                    class_token_position=args.class_token_position)
    if args.method == "cocoop":
        return CoCoOp(clip, classnames, n_ctx=args.n_ctx, ctx_init=args.ctx_init)
    if args.method in ("vpt_shallow", "vpt_deep"):
        return VPT(clip, classnames, n_ctx=args.n_ctx, deep=args.method == "vpt_deep", template=args.template,
                   released_code=args.released_code)
    if args.method.startswith("upt"):
        variant = {"upt": "attention", "upt_joint": "joint", "upt_shared": "shared", "upt_mlp": "mlp"}[args.method]
        return UPT(clip, classnames, n_ctx=args.n_ctx, depth=args.depth or 1, variant=variant,
                   released_code=bool(args.released_code))
    if args.method == "linear_probe":  # weights come from fit_linear_probe or a checkpoint
        return LinearProbe(clip, torch.zeros(len(classnames), clip.visual.output_dim), torch.zeros(len(classnames)))
    return LinearFT(clip, classnames, template=args.template)


def too_long(e, args, classnames):
    """A one-line RunError for a prompt over CLIP's context, naming the class and the options that lengthen it."""
    name = max((c for c in classnames if c.lower() in e.text.lower()), key=len, default=None)
    options = [option(k) for k in ("n_ctx", "ctx_init", "template", "random_length") if getattr(args, k, None)]
    return RunError(f"a prompt is {e.n_tokens} tokens, over CLIP's {e.context_length}" +
                    (f": shorten the class name {name!r}" if name else "") +
                    (f"{' or' if name else ':'} use a smaller {' / '.join(options)}" if options else ""))


def class_specific(method, csc):
    """Names of the parameters that hold one row per class; every other parameter is class-agnostic."""
    return {"linear_ft": ["weight"], "linear_probe": ["weight", "bias"], "coop": ["ctx"] if csc else []}.get(method, [])


def restrict_to_classes(state, method, csc, source_ids, target_ids):
    """Evaluate a trained model on other classes (ImageNet-A/-R's 200, base -> new): class-agnostic parameters carry
    over unchanged; class-specific rows are matched by class id (the WordNet id in the ImageNet family, else the name,
    which must then be unique: ImageNet's names are not)."""
    keys = class_specific(method, csc)
    if not keys or list(source_ids) == list(target_ids):
        return dict(state)
    rows = {}
    for i, class_id in enumerate(source_ids):
        rows.setdefault(class_id, []).append(i)
    for class_id in target_ids:
        if class_id not in rows:
            raise RunError(f"{method}'s {keys[0]} has one row per training class, and {class_id!r} was not one")
        if len(rows[class_id]) > 1:
            raise RunError(f"the training classes name {class_id!r} {len(rows[class_id])} times: {method}'s "
                           f"class-specific rows cannot be matched by name")
    index = [rows[class_id][0] for class_id in target_ids]
    return {key: value[index] if key in keys else value for key, value in state.items()}


def trainable_state(model):
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state, path):
    """Load a checkpoint's parameters, which must be exactly this model's trainable ones, shape for shape."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        key = next(k for k in sorted(expected.keys() | found.keys()) if expected.get(k) != found.get(k))
        raise RunError(f"{path} does not fit this model: {key} is {found.get(key, 'missing')} there and "
                       f"{expected.get(key, 'absent')} here (trained with other settings or classes)")
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------------------------------
# Progress of long loops: in place on a terminal, a plain line per quarter in a log file; silent for the first 2 s

def progress(iterable, total, what):
    start, quarter, tty = time.time(), 0, sys.stdout.isatty()
    for done, item in enumerate(iterable, 1):
        yield item
        elapsed = time.time() - start
        if elapsed < 2 or not total:
            continue
        line = f"{what}: {done}/{total} | {done / elapsed:.1f}/s | eta {(total - done) * elapsed / done:.0f}s"
        if tty:
            print(f"\r{line}", end="\n" if done == total else "", flush=True)
        elif 4 * done // total > quarter:
            quarter = 4 * done // total
            print(line, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Files: writes are atomic (unique temporary name, then rename), appends are locked, a run holds a lock on its folder

def save_atomic(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:120]
        raise RunError(f"cannot write {path} ({reason}): free disk space or choose another --output-dir") from None
    finally:  # also on Ctrl-C mid-write: no half-written temporary file is left behind
        with contextlib.suppress(OSError):
            os.remove(tmp)


@contextlib.contextmanager
def locked(path, busy=None):
    """An exclusive lock on the file `path`, released when its holder exits (even on kill -9). If another process
    holds it: wait, or with a `busy` message raise RunError(busy). A POSIX record lock (lockf), not flock: forked
    DataLoader workers do not inherit it, so orphaned workers of a killed run cannot block its --resume."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        try:
            if fcntl:
                fcntl.lockf(f, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
            raise RunError(busy) from None
        yield


def append_rows(path, rows):
    """Append JSON lines; several processes may append to the same file at once."""
    try:
        with locked(path + ".lock"), open(path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    except OSError as e:
        raise RunError(f"cannot append to {path} ({e.strerror or e}): free disk space or choose another --output-dir") \
            from None


def load_checkpoint(path):
    """A checkpoint written by train.py, checked: a dict with 'model' (name -> finite tensor), 'args' and 'epoch'."""
    if not os.path.isfile(path):
        raise RunError(f"checkpoint {path} not found: pass a checkpoint.pt written by train.py")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or malicious files fail in many ways; all mean the same to the user
        raise RunError(f"checkpoint {path} is unreadable ({type(e).__name__}): train again or pick another file") \
            from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict)
            and isinstance(checkpoint.get("args"), dict) and isinstance(checkpoint.get("epoch"), int)):
        held = "CLIP weights" if isinstance(checkpoint, dict) and "logit_scale" in checkpoint else \
            f"a {type(checkpoint).__name__}" + (f" with keys {sorted(checkpoint)[:4]}" if isinstance(checkpoint, dict) else "")
        raise RunError(f"{path} is not a train.py checkpoint (it holds {held}): pass the checkpoint.pt of a run "
                       "(CLIP weights go to --backbone)")
    for key, value in checkpoint["model"].items():
        if not torch.is_tensor(value) or not torch.isfinite(value).all():
            raise RunError(f"checkpoint {path}: {key} is not a finite tensor (the run diverged?): retrain it")
    return checkpoint


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True, text=True,
                          cwd=here).stdout.strip() or "unknown"


# ----------------------------------------------------------------------------------------------------------------------
# Frozen image features on disk, keyed by what determines them: the weights' SHA256, the transform, the ordered image
# list, the seed (augmented ones) and the precision. Test features: one file per set. Feature bank: one file per epoch.

@functools.lru_cache
def backbone_sha256(backbone):
    return clip_model.weights_sha256(backbone)


def features_key(*parts):
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]


def tensor_sha256(t):
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()


def read_features(path, shape, dtype):
    """The features stored at path if they are intact (shape, dtype, checksum), else None after a warning."""
    if not os.path.isfile(path):
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features = stored["features"]
        ok = tuple(features.shape) == shape and features.dtype == dtype and tensor_sha256(features) == stored["sha256"]
    except Exception:  # truncated or garbage: recomputed below
        ok = False
    if not ok:
        print(f"warning: {path} is corrupt or stale: computing it again")
        return None
    os.utime(path)  # recently used: pruned last
    return features


def write_features(features, path, budget=None):
    save_atomic(dict(features=features, sha256=tensor_sha256(features)), path)
    if budget:  # keep the folder under budget: the least recently used files go first
        files = sorted(glob.glob(os.path.join(os.path.dirname(path), "*.pt")), key=os.path.getmtime, reverse=True)
        sizes = [os.path.getsize(f) for f in files]
        for i, f in enumerate(files):
            if sum(sizes[:i + 1]) > budget and f != path:
                os.remove(f)


def feature_dtype(autocast):
    return autocast.fast_dtype if isinstance(autocast, torch.autocast) else torch.float32


@torch.no_grad()
def encode_all(clip, loader, device, autocast, what):
    out = []
    for images, _ in progress(loader, len(loader), what):
        with autocast:
            out.append(clip.encode_image(images.to(device, non_blocking=True)).to(feature_dtype(autocast)).cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.visual.output_dim, dtype=feature_dtype(autocast))


def image_features(clip, items, transform, args, device, autocast):
    """(N, E) features of the images `items` under a deterministic transform, cached in OUTPUT/feature_cache/."""
    key = features_key(backbone_sha256(args.backbone), data.transform_key(transform), items,
                       str(feature_dtype(autocast)), device)
    path = os.path.join(args.output_dir, "feature_cache", f"{key}.pt")
    shape, dtype = (len(items), clip.visual.output_dim), feature_dtype(autocast)
    features = read_features(path, shape, dtype)
    if features is None:
        loader = data.make_loader(items, transform, 256, train=False, workers=args.workers)
        features = encode_all(clip, loader, device, autocast, f"image features ({len(items)} images)")
        write_features(features, path, FEATURE_CACHE_BUDGET)
    return features


class FeatureBank:
    """Features of every training image as augmented in each epoch (data.augmentation_seed(seed, epoch, index)),
    shared by every run whose image path is frozen on the same subset: epoch e is computed by the first run that needs
    it and read by all others, so budgets share a prefix (a 200-epoch bank serves 50- and 100-epoch runs)."""

    def __init__(self, clip, items, args, device, autocast):
        self.clip, self.items, self.args, self.device, self.autocast = clip, items, args, device, autocast
        self.transform = data.train_transform(clip.visual.input_resolution)
        key = features_key(backbone_sha256(args.backbone), data.transform_key(self.transform), items, args.seed,
                           str(feature_dtype(autocast)), device)
        self.dir = os.path.join(args.output_dir, "feature_bank", key)
        self.shape, self.dtype = (len(items), clip.visual.output_dim), feature_dtype(autocast)
        self.loader, self.built, self.reused = None, 0, 0

    def size(self, epochs):
        return self.shape[0] * self.shape[1] * self.dtype.itemsize * epochs

    def epoch(self, epoch):
        """(N, E) features of the training images in index order, as augmented in `epoch`."""
        path = os.path.join(self.dir, f"epoch{epoch:04d}.pt")
        with locked(os.path.join(self.dir, "lock")):  # concurrent runs compute an epoch once
            features = read_features(path, self.shape, self.dtype)
            if features is None:
                if self.loader is None:  # images decoded once, kept for the following epochs
                    self.loader = data.make_loader(self.items, self.transform, 256, train=False, seed=self.args.seed,
                                                   workers=self.args.workers)
                self.loader.sampler.set_epoch(epoch)
                features = encode_all(self.clip, self.loader, self.device, self.autocast, f"feature bank epoch {epoch + 1}")
                write_features(features, path)
                self.built += 1
            else:
                self.reused += 1
        return features


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, items, num_classes, args, device, autocast):
    """-> (accuracy %, macro-F1 %) on items [(path, label)]."""
    model.eval()
    transform = data.test_transform(model.clip.visual.input_resolution)
    labels = torch.tensor([label for _, label in items])
    if hasattr(model, "forward_features"):  # frozen, prompt-free image path: cached features, text side once
        features = image_features(model.clip, items, transform, args, device, autocast).to(device)
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


# ----------------------------------------------------------------------------------------------------------------------
# Main: args -> device/precision -> data -> model -> optimizer -> loop -> eval -> save

def lr_at(epoch, args):
    """Dassl's schedule, stepped per epoch: 1 warm-up epoch at constant 1e-5, then cosine from lr over `epochs`."""
    return 1e-5 if epoch == 0 else 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - 1) / args.epochs))


def setup_precision(precision, device):
    """fp32 master weights; on CUDA, autocast to bf16 (or fp16 with a GradScaler where bf16 is unsupported)."""
    amp = precision == "amp" and device == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast(device, dtype=dtype) if amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device, enabled=amp and dtype == torch.float16)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return autocast, scaler, str(dtype).replace("torch.", "amp ") if amp else "fp32"


def load_data(args):
    """The training (or --eval-only) dataset and every evaluation target, all read and checked before any work."""
    shots = args.shots if args.method in TRAINED else 0
    targets = eval_targets(args)
    ds = data.load_dataset(targets[0][0], args.root, shots=shots or 0, seed=args.seed or 1, subsample=targets[0][1],
                           download=args.download,
                           check_splits=("test",) if args.eval_only or not shots else ("train", "val", "test"))
    if shots and not args.eval_only:
        most = max(Counter(label for _, label in ds.train).values(), default=0)
        if most < shots:
            raise RunError(f"--shots {shots} is more than the {most} training images any class of "
                           f"{args.dataset} has: use --shots {most} or fewer")
    others = [data.load_dataset(name, args.root, subsample=subsample, check_splits=("test",))
              for name, subsample in targets[1:]]
    return ds, list(zip(targets, [ds] + others))


def run(args):
    """Train (or load) the model of `args`, evaluate it on every target, append a row per target; -> the rows."""
    resolve(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast, scaler, precision = setup_precision(args.precision, device)
    settings = args.trained if args.eval_only else settings_of(args)
    directory, commit = run_dir(args, settings), git_commit()
    print(f"torch {torch.__version__} | device {device} | precision {precision} | git {commit}")
    print(f"run {run_id(settings)} in {directory}\nsettings: {json.dumps(settings)}")
    if args.epochs == 1 and not args.eval_only:
        print("note: --epochs 1 trains only Dassl's warm-up epoch, at lr 1e-5; the cosine schedule starts at epoch 2")
    ds, targets = load_data(args)
    trains = args.method in TRAINED and not args.eval_only
    try:
        os.makedirs(directory if trains else args.output_dir, exist_ok=True)
        open(os.path.join(args.output_dir, "results.jsonl"), "a").close()
    except OSError as e:
        raise RunError(f"cannot write under {args.output_dir} ({e.strerror or e}): choose another --output-dir") \
            from None
    busy = f"a run with these settings is already running in {directory}: wait for it, or change a setting"
    try:
        with locked(os.path.join(directory, "lock"), busy) if trains else contextlib.nullcontext():
            return train_and_evaluate(args, settings, directory, commit, ds, targets, device, autocast, scaler,
                                      precision)
    except KeyboardInterrupt:
        path = os.path.join(directory, "checkpoint.pt")
        saved = f"{path} holds epoch {torch.load(path, weights_only=True)['epoch']}; add --resume to the same " \
                "command to continue" if os.path.isfile(path) and not args.eval_only else "nothing was saved"
        raise Interrupted(f"interrupted: {saved}") from None


def train_and_evaluate(args, settings, directory, commit, ds, targets, device, autocast, scaler, precision):
    classnames, class_ids = ds.classnames, ds.class_ids
    if args.eval_only:  # the checkpoint's classes (e.g. base), evaluated below on the target's (e.g. new)
        checkpoint = load_checkpoint(args.checkpoint)
        classnames, class_ids = checkpoint["classnames"], checkpoint.get("class_ids", checkpoint["classnames"])
    torch.manual_seed(args.seed or 0)  # prompt initialisation; the few-shot subset has its own seeded RNG
    clip, _ = clip_model.load(args.backbone, device)
    build = lambda names: build_method(args, clip, names).to(device)
    try:  # every target's model built before training: its prompts are checked to fit CLIP's context
        model = build(classnames)
        others = {key: build(target.classnames) for key, target in targets if target.class_ids != class_ids}
    except clip_model.TextTooLong as e:
        raise too_long(e, args, [c for _, t in targets for c in t.classnames]) from None
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.method}: {n_trainable:,} trainable parameters "
          f"({100 * n_trainable / sum(p.numel() for p in clip.parameters()):.4f}% of CLIP) | {len(classnames)} classes")
    start, train_from = time.time(), None
    if args.eval_only:
        load_trainable(model, checkpoint["model"], args.checkpoint)
    elif args.method == "linear_probe":
        model = train_linear_probe(clip, ds, args, device, autocast)
        save_atomic(dict(model=trainable_state(model), epoch=0, args=vars(args), classnames=ds.classnames,
                         class_ids=ds.class_ids, run_id=run_id(settings)), os.path.join(directory, "checkpoint.pt"))
    elif n_trainable:
        train_from = train(model, ds, args, settings, directory, device, autocast, scaler)
    train_seconds, trained, trained_state = time.time() - start, model, trainable_state(model)

    rows = []
    for (name, subsample), target in targets:
        model = others.get((name, subsample), trained)
        if model is not trained:  # other classes: the trained state restricted to them (never another target's)
            model.load_state_dict(restrict_to_classes(trained_state, args.method, args.csc, class_ids, target.class_ids),
                                  strict=False)
        t0 = time.time()
        accuracy, macro_f1 = evaluate(model, target.test, len(target.classnames), args, device, autocast)
        print(f"test {name} ({subsample}): accuracy {accuracy:.2f}% | macro-F1 {macro_f1:.2f}% | {len(target.test)} images")
        row = {"run_id": run_id(settings), **settings, "train_dataset": settings["dataset"],
               "train_subsample": settings["subsample"], "dataset": name, "subsample": subsample,
               "accuracy": round(accuracy, 4), "macro_f1": round(macro_f1, 4), "test_images": len(target.test),
               "eval_only": args.eval_only, "checkpoint": args.checkpoint, "train_from": train_from,
               "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.time() - t0, 1),
               "trainable_params": n_trainable, "precision_used": precision, "compile": args.compile,
               "device": device_name(device), "git": commit, "time": datetime.datetime.now().isoformat(timespec="seconds"),
               "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20) if device == "cuda" else None}
        append_rows(os.path.join(args.output_dir, "results.jsonl"), [row])  # written as soon as it is known
        rows.append(row)
    return rows


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def resume_from(path, args, settings):
    """The checkpoint --resume continues: it must exist and hold this run's settings."""
    if not os.path.isfile(path):
        others = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(path)), "*", "checkpoint.pt")))
        hint = ""
        for other in others[:1]:
            with contextlib.suppress(RunError):
                theirs = settings_of(load_checkpoint(other)["args"])
                key = next((k for k in IDENTITY if theirs.get(k) != settings[k]), None)
                hint = f" (run {os.path.basename(os.path.dirname(other))} beside it differs in {option(key)}: " \
                       f"{theirs.get(key)!r} there, {settings[key]!r} here)" if key else ""
        raise RunError(f"--resume: no checkpoint with these settings in {os.path.dirname(path)}{hint}; drop --resume "
                       "to start this run")
    state = load_checkpoint(path)
    theirs = settings_of(state["args"])
    for key in IDENTITY:
        if theirs.get(key) != settings[key]:
            raise RunError(f"--resume: {path} was written with {option(key)} {theirs.get(key)!r}, not "
                           f"{settings[key]!r}: drop --resume or use that setting")
    return state


def train(model, ds, args, settings, directory, device, autocast, scaler):
    """SGD on the method's parameters, a checkpoint after every epoch; -> what it trained from."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    path, start_epoch, accuracy = os.path.join(directory, "checkpoint.pt"), 0, None
    if args.resume:
        state = resume_from(path, args, settings)
        load_trainable(model, state["model"], path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
        print(f"resumed from {path} at epoch {start_epoch} of {args.epochs}")
    elif os.path.isfile(path):
        print(f"note: starting afresh over {path} (pass --resume to continue it instead)")
    batches, n_batches, forward, train_from = training_batches(model, ds, args, device, autocast)
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
            raise RunError(f"loss became {loss} in epoch {epoch + 1}: lower --lr or use --precision fp32 "
                           f"(the last good checkpoint is {path})")
        seconds = time.time() - t0
        memory = f" | mem {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if device == "cuda" else ""
        print(f"epoch {epoch + 1}/{args.epochs} | loss {loss:.4f} | acc {accuracy:.2f}% | lr {lr_at(epoch, args):.2e} | "
              f"{seconds:.1f}s | eta {seconds * (args.epochs - epoch - 1) / 60:.1f} min{memory}", flush=True)
        save_atomic(dict(model=trainable_state(model), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         epoch=epoch + 1, args=vars(args), classnames=ds.classnames, class_ids=ds.class_ids,
                         run_id=run_id(settings)), path)
    if isinstance(train_from, FeatureBank):
        print(f"feature bank {train_from.dir}: {train_from.reused} epochs reused, {train_from.built} built")
    if accuracy is not None and args.epochs > 1 and accuracy < 1.5 * chance:
        print(f"warning: train accuracy {accuracy:.1f}% is near chance ({chance:.1f}%): the run may have collapsed")
    return "feature bank" if isinstance(train_from, FeatureBank) else train_from


def training_batches(model, ds, args, device, autocast):
    """-> (epoch -> iterator of (inputs, labels), batches per epoch, forward, what it trains from).
    Either way an epoch's batches are consecutive chunks of data.epoch_order(N, seed, epoch), the last dropped when
    incomplete (Dassl), and image i is augmented under data.augmentation_seed(seed, epoch, i)."""
    N, size = len(ds.train), args.batch_size
    n_batches = N // size if N >= size else 1
    if args.feature_bank:
        bank = FeatureBank(model.clip, ds.train, args, device, autocast)
        free = shutil.disk_usage(args.output_dir).free
        if bank.size(args.epochs) > min(BANK_BUDGET, free):
            print(f"feature bank: {bank.size(args.epochs) / 2 ** 30:.1f} GiB for {args.epochs} epochs is over the "
                  f"budget ({min(BANK_BUDGET, free) / 2 ** 30:.1f} GiB free or allowed): training from images")
        else:
            stored = len(glob.glob(os.path.join(bank.dir, "epoch*.pt")))
            print(f"feature bank {bank.dir}: {stored} epochs stored, the rest are built as training reaches them")

            labels = torch.tensor([label for _, label in ds.train], device=device)

            def bank_batches(epoch):
                features = bank.epoch(epoch).to(device)  # (N, E)
                order = torch.tensor(data.epoch_order(N, args.seed, epoch), device=device)
                for index in order.split(size)[:n_batches]:
                    yield features[index], labels[index]

            return bank_batches, n_batches, model.forward_features, bank
    loader = data.make_loader(ds.train, data.train_transform(model.clip.visual.input_resolution), size, train=True,
                              seed=args.seed, workers=args.workers)
    print(f"train transform: {loader.dataset.transform}")

    def image_batches(epoch):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return image_batches, n_batches, model, "images"


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
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # before training started
        print("interrupted before training: nothing was saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
