"""What a run is and what it leaves on disk: its options and their defaults, its identity (the run id) and folder,
checkpoints (written, read, checked, resumed), class transfer, locks, atomic writes, appended rows, progress lines.

Why was my run refused? resolve() and resume_from(). Where is my checkpoint? run_dir(). How is the run id made?
settings_of() and run_id(): a hash of every setting that can change a result (IDENTITY).
"""
import contextlib
import difflib
import errno
import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import torch

try:
    import fcntl  # file locks (POSIX); without it, concurrent runs are not detected
except ImportError:
    fcntl = None

import clip_model
import data
from cocoop import CoCoOp
from coop import POSITIONS, CoOp
from linear_ft import LinearFT, LinearProbe
from upt import UPT
from vpt import VPT
from zeroshot import HANDCRAFTED, IMAGENET_TEMPLATES_SELECT, TEMPLATES, ZeroShot

# The method protocol (what train.py calls; a method file copied elsewhere needs only the first):
#   forward(images) -> logits (B, K)                    every method
#   forward_features(features) -> logits (B, K)          the image path is frozen and prompt-free: logits from CLIP's
#                                                        image features, so training can read the feature bank and
#                                                        evaluation the cached test features (features.py)
#   prepare() -> what forward(images, prepared=...) reuses   work that does not depend on the image, done once per
#                                                        evaluation (UPT's θ and text features)
METHODS = {"zeroshot": ZeroShot, "coop": CoOp, "cocoop": CoCoOp, "vpt_shallow": VPT, "vpt_deep": VPT, "upt": UPT,
           "upt_joint": UPT, "upt_shared": UPT, "upt_mlp": UPT, "linear_ft": LinearFT, "linear_probe": LinearProbe}
RANDOM_PROMPTS = {"randtoken": "token", "randembed": "embedding"}  # Rethinking §4.2: ZeroShot(random_prompt=...)
PROMPTS = ["dataset", "ensemble", *HANDCRAFTED, *RANDOM_PROMPTS]
PROMPTED = ["coop", "cocoop", "vpt_shallow", "vpt_deep", "upt", "upt_joint", "upt_shared", "upt_mlp"]
TRAINED = [m for m in METHODS if m != "zeroshot"]
EPOCHS = PROMPTED + ["linear_ft"]  # trained by SGD over epochs
# The options each method reads: any other one given on the command line is an error, not silently ignored.
USED_BY = {
    "shots": TRAINED, "seed": TRAINED, "epochs": EPOCHS, "lr": EPOCHS, "batch_size": EPOCHS, "n_ctx": PROMPTED,
    "ctx_init": ["coop", "cocoop"], "csc": ["coop"], "class_token_position": ["coop"],
    "depth": ["upt", "upt_shared", "upt_mlp"], "released_code": ["upt", "vpt_shallow", "vpt_deep"],
    "prompt": ["zeroshot"], "template": ["zeroshot", "vpt_shallow", "vpt_deep", "linear_ft"],
    "random_length": ["zeroshot"],
    # features of augmented training images, shared by every run on the same subset (features.FeatureBank)
    "feature_bank": [m for m in EPOCHS if hasattr(METHODS[m], "forward_features")],
}
MAX_SEED = 2 ** 32 - 1  # seeds torch, numpy and random all accept: 0 ... 2**32 - 1
# A run's identity: every setting that can change its result. The run id hashes them; each results row holds them.
IDENTITY = ["method", "dataset", "subsample", "backbone", "precision", *USED_BY]


class RunError(Exception):
    """A clear reason to stop (impossible options, missing checkpoint, diverged loss): one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: one line saying where the last checkpoint is; exit code 130 (Ctrl-C) or 143 (SIGTERM)."""

    def __init__(self, message, code=130):
        super().__init__(message)
        self.code = code


class Terminated(KeyboardInterrupt):
    """SIGTERM (scancel, preemption, a time limit), raised where the run is and handled as Ctrl-C."""


def terminate(signum, frame):
    raise Terminated()


# ----------------------------------------------------------------------------------------------------------------------
# Options: those a method does not use stay None; resolve() fills the papers' defaults (their one home) and rejects the rest

def default_epochs(args):
    if args.method == "cocoop":
        return 10
    if args.dataset == "imagenet":
        return 50
    return 50 if args.shots <= 1 else 100 if args.shots <= 4 else 200


def option(key):
    return "--no-feature-bank" if key == "feature_bank" else "--" + key.replace("_", "-")


def reads(method, key, prompt=None):
    """Does `method` read the option `key`? (A random zero-shot prompt also reads --seed: its draw.)"""
    return method in USED_BY[key] or (key == "seed" and prompt in RANDOM_PROMPTS)


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
    for key, methods in USED_BY.items():
        if getattr(args, key) is not None and not reads(args.method, key, args.prompt):
            raise RunError(f"{option(key)} is not used by {args.method} (only by {', '.join(methods)}): drop it")
    args.backbone = args.backbone or "ViT-B/16"
    if args.backbone not in clip_model.available_models() and not args.backbone.startswith("hf-hub:") \
            and not os.path.exists(args.backbone):
        raise RunError(f"unknown --backbone {args.backbone!r}: use one of {', '.join(clip_model.available_models())}, "
                       "hf-hub:ORG/NAME, a folder or the path of a checkpoint file")
    uses = lambda key: reads(args.method, key, args.prompt)
    if uses("shots"):
        args.shots = 16 if args.shots is None else args.shots
    if uses("seed"):  # the few-shot subset, initialisation, order and augmentation; or the random prompt's draw
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
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise RunError(f"--seed must be between 0 and {MAX_SEED} (got {args.seed})")
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
    if uses("template"):
        resolve_template(args)
    return args


def resolve_template(args):
    """zeroshot: --prompt NAME or a free --template, and the list of templates it averages (args.templates);
    vpt_* and linear_ft: --template (default: the dataset's)."""
    if args.method == "zeroshot":
        if args.prompt and args.template:
            raise RunError("--prompt and --template both name the zero-shot text: pass one")
        args.prompt = None if args.template else (args.prompt or "dataset")
        if args.prompt is not None and args.prompt not in PROMPTS:
            close = difflib.get_close_matches(args.prompt, PROMPTS, n=1)
            raise RunError(f"unknown --prompt {args.prompt!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; choose from {', '.join(PROMPTS)}, or pass a --template")
        random = args.prompt in RANDOM_PROMPTS
        if args.random_length is not None and not random:
            raise RunError(f"--random-length is read by --prompt {' or '.join(RANDOM_PROMPTS)} only: drop it")
        args.random_length = (args.random_length or 4) if random else None
        if args.prompt == "ensemble":  # CoOp's 7 ImageNet templates, plus the dataset's own
            own = [TEMPLATES[args.dataset]] if args.dataset in TEMPLATES and args.dataset != "imagenet" else []
            args.templates = [*IMAGENET_TEMPLATES_SELECT, *own]
            return
        if random:  # Rethinking §4.2: the random tokens go before "{}." (the period is ours: the paper gives none)
            args.templates = ["{}."]
            return
        args.template = args.template or HANDCRAFTED.get(args.prompt)
    args.template = args.template or TEMPLATES.get(args.dataset, "a photo of a {}.")
    try:
        ok = args.template.count("{}") == 1 and bool(args.template.format("x"))
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise RunError(f"--template {args.template!r} must hold {{}} once, for the class name (e.g. 'a photo of a {{}}.')")
    if args.method == "zeroshot":
        args.templates = [args.template]


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
    for key in USED_BY:  # older checkpoints saved unused options with their defaults
        if not reads(out["method"], key, out.get("prompt")):
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
        backbone.replace(":", "_").replace("/", "_") if backbone.startswith("hf-hub:") else \
        os.path.splitext(os.path.basename(backbone.rstrip("/")))[0]
    subset = "_".join(p for p in [settings["shots"] and f"s{settings['shots']}",
                                  settings["seed"] and f"seed{settings['seed']}", settings["subsample"]] if p)
    return os.path.join(args.output_dir, dataset, settings["method"], backbone, subset, run_id(settings))


def eval_targets(args):
    """[(dataset, subsample)]: the trained (or --eval-only) dataset first, then every --eval-datasets entry."""
    targets = [(args.eval_dataset, args.eval_subsample) if args.eval_only else (args.dataset, args.subsample)]
    for entry in filter(None, (e.strip() for e in args.eval_datasets.split(","))):
        name, _, subsample = entry.rpartition(":") if entry.endswith((":all", ":base", ":new")) else (entry, "", "all")
        if name.startswith("folder:"):
            name = "folder:" + os.path.abspath(name.removeprefix("folder:"))
        targets.append((name, subsample))
    return list(dict.fromkeys(targets))


def describe(args):
    """A resolved run: its settings, run id, folder and evaluation targets."""
    settings = settings_of(args)
    return dict(settings=settings, run_id=run_id(settings), run_dir=run_dir(args, settings), targets=eval_targets(args))


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



def too_long(e, args, classnames):
    """A one-line RunError for a prompt over CLIP's context, naming the class and the options that lengthen it."""
    name = max((c for c in classnames if c.lower() in e.text.lower()), key=len, default=None)
    options = [option(k) for k in ("n_ctx", "ctx_init", "template", "random_length") if getattr(args, k, None)]
    return RunError(f"a prompt is {e.n_tokens} tokens, over CLIP's {e.context_length}" +
                    (f": shorten the class name {name!r}" if name else "") +
                    (f"{' or' if name else ':'} use a smaller {' / '.join(options)}" if options else ""))


# ----------------------------------------------------------------------------------------------------------------------
# The method named by --method, built from the resolved options (the constructors' other defaults are the papers')

def build_method(args, clip, classnames):
    """The method named by --method, with the resolved settings."""
    if args.method == "zeroshot":
        if args.random_length:  # randtoken, randembed
            return ZeroShot(clip, classnames, templates=args.templates, random_prompt=RANDOM_PROMPTS[args.prompt],
                            n_random=args.random_length, seed=args.seed)
        return ZeroShot(clip, classnames, templates=args.templates)
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
        read = {key: getattr(args, key) for key in ("depth", "released_code") if reads(args.method, key)}
        return UPT(clip, classnames, n_ctx=args.n_ctx, variant=variant, **read)  # joint: depth 1, not released
    if args.method == "linear_probe":  # weights come from fit_linear_probe or a checkpoint
        return LinearProbe(clip, torch.zeros(len(classnames), clip.visual.output_dim), torch.zeros(len(classnames)))
    return LinearFT(clip, classnames, template=args.template)


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
# Files: writes are atomic (a temporary file named after its writer, then rename; a dead writer's is removed), appends
# are locked and start on a fresh line, a run holds a lock on its folder

HOST = socket.gethostname().replace(".", "-")  # in temporary names, which are split at dots


def temporary_name(path):
    """A unique temporary name beside path that names its writer: PATH.<host>.<pid>.<ns>.tmp."""
    return f"{path}.{HOST}.{os.getpid()}.{time.monotonic_ns()}.tmp"


def writer_alive(pid):
    if os.name != "posix":  # there os.kill(pid, 0) would end the process: never call a writer dead
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_dead_temporaries(folder, max_age=24 * 3600):
    """Remove the temporary files in folder whose writer died mid-write (kill -9, a power cut): its process is gone
    from this host, or the file is a day old (a writer on another host sharing the folder)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            parts = name.removesuffix(".tmp").rsplit(".", 3)  # target, host, pid, ns
            if not name.endswith(".tmp") or len(parts) != 4 or not (parts[2] + parts[3]).isdigit():
                continue
            path = os.path.join(folder, name)
            with contextlib.suppress(OSError):  # gone already: another process cleaned it
                if parts[1] == HOST and not writer_alive(int(parts[2])) or \
                        time.time() - os.path.getmtime(path) > max_age:
                    os.remove(path)


def save_atomic(obj, path):
    tmp = temporary_name(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        remove_dead_temporaries(os.path.dirname(path))
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        raise cannot_write(path, e) from None
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
    """Append JSON lines, on a fresh line: a last line cut by a killed writer or a full disk stays alone (readers
    skip it) instead of gluing itself to the first new row. Several processes may append to the same file at once."""
    text = "".join(json.dumps(row) + "\n" for row in rows).encode()
    try:
        with locked(path + ".lock"), open(path, "a+b") as f:  # a+: every write goes to the end
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                text = text if f.read(1) == b"\n" else b"\n" + text
            f.write(text)
    except OSError as e:
        raise cannot_write(path, e, "append to") from None


def cannot_write(path, e, verb="write"):
    """A one-line RunError for a failed write of `path`: the reason, and what to do about it."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:120]
    full = not isinstance(e, OSError) or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # torch: RuntimeError
    return RunError(f"cannot {verb} {path} ({reason}): " +
                    ("free disk space or choose another --output-dir" if full else "choose another --output-dir"))


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True, text=True,
                          cwd=here).stdout.strip() or "unknown"


@contextlib.contextmanager
def hold_run(args, directory, trains):
    """Check that the run can write its folder and results.jsonl, hold the run's lock while it runs (a second run with
    the same settings is refused) and turn Ctrl-C or SIGTERM into one line naming the checkpoint to resume."""
    try:
        os.makedirs(directory if trains else args.output_dir, exist_ok=True)
    except OSError as e:  # named: the folder in the way, when it is not --output-dir itself (OUT/dtd is a file)
        where = f" at {e.filename}" if e.filename and os.path.abspath(e.filename) != os.path.abspath(args.output_dir) \
            else ""
        raise RunError(f"cannot write under {args.output_dir}{where} ({e.strerror or e}): choose another "
                       "--output-dir") from None
    results = os.path.join(args.output_dir, "results.jsonl")
    try:
        open(results, "a").close()
    except OSError as e:  # a folder, read-only or immutable: it is the file, not --output-dir, that is in the way
        raise RunError(f"cannot append to {results} ({e.strerror or e}): make it a writable file or choose another "
                       "--output-dir") from None
    busy = f"a run with these settings is already running in {directory}: wait for it, or change a setting"
    main = threading.current_thread() is threading.main_thread()  # only the main thread may handle signals
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        with locked(os.path.join(directory, "lock"), busy) if trains else contextlib.nullcontext():
            yield
    except KeyboardInterrupt as e:
        path = os.path.join(directory, "checkpoint.pt")
        resumable = os.path.isfile(path) and not args.eval_only and args.method in EPOCHS
        saved = f"{path} holds epoch {torch.load(path, weights_only=True)['epoch']}; add --resume to the same " \
                "command to continue" if resumable else "nothing to resume: run the same command again"
        terminated = isinstance(e, Terminated)
        raise Interrupted(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: {saved}",
                          143 if terminated else 130) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: the trainable parameters and the settings that made them; resumed only by the same settings

def trainable_state(model):
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def checkpoint_of(model, args, ds, settings, epoch, optimizer=None, scaler=None, *, train_seconds=None, fit=None):
    """What checkpoint.pt holds after `epoch` epochs (the optimizer and scaler where training goes on): train_seconds
    spent so far, over every session (a resumed run reports the total); fit: what a fitted model chose (the linear
    probe's C), carried into the rows of --eval-only."""
    state = dict(model=trainable_state(model), epoch=epoch, args=vars(args), classnames=ds.classnames,
                 class_ids=ds.class_ids, run_id=run_id(settings), train_seconds=train_seconds, fit=fit or {})
    if optimizer is not None:
        state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
    return state


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


def diverged(loss, epoch, args, path, saved_epoch, precision):
    """The RunError for a training loss that became nan or inf in `epoch`: what to do (the same settings diverge again
    on --resume: training is exact), and whether the last checkpoint this run saved is usable: only if its parameters
    are finite and within float16's range (prompts and classifiers are O(1); beyond that range the run had already
    diverged, and fp16 AMP could not even run them)."""
    fix = f"loss became {loss} in epoch {epoch + 1}: start the run from scratch with a lower --lr than {args.lr:g}" + \
        (" or with --precision fp32" if precision == "amp float16" else "") + " (--resume would diverge again)"
    if not saved_epoch:
        return RunError(f"{fix}; nothing was saved")
    parameters = [p.abs().max() for p in torch.load(path, weights_only=True)["model"].values() if p.numel()]
    largest = torch.stack(parameters).max().item() if parameters else 0.0  # nan if any is nan
    if largest <= torch.finfo(torch.float16).max:
        return RunError(f"{fix}; {path} holds epoch {saved_epoch}, before the loss diverged (evaluate it with "
                        "--eval-only)")
    return RunError(f"{fix}; {path} (epoch {saved_epoch}) is no good either: its parameters reach {largest:.1e}")


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


def load_trainable(model, state, path):
    """Load a checkpoint's parameters, which must be exactly this model's trainable ones, shape for shape."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        key = next(k for k in sorted(expected.keys() | found.keys()) if expected.get(k) != found.get(k))
        raise RunError(f"{path} does not fit this model: {key} is {found.get(key, 'missing')} there and "
                       f"{expected.get(key, 'absent')} here (trained with other settings or classes)")
    model.load_state_dict(state, strict=False)


def resume(path, args, settings, model, optimizer, scaler):
    """With --resume, this run's checkpoint loaded into the model, optimizer and scaler; -> the epoch to start from
    and the training seconds spent before it (None from a checkpoint that predates time-keeping)."""
    if not args.resume:
        if os.path.isfile(path):
            print(f"note: starting afresh over {path} (pass --resume to continue it instead)")
        return 0, 0.0
    state = resume_from(path, args, settings)
    load_trainable(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    seconds = state.get("train_seconds")
    print(f"resumed from {path} at epoch {state['epoch']} of {args.epochs}, after "
          + ("an unrecorded training time (train_seconds will count this session only)" if seconds is None else
             f"{seconds:.1f} s of training"))
    return state["epoch"], seconds


# ----------------------------------------------------------------------------------------------------------------------
# Class transfer: a model trained on some classes, evaluated on others (ImageNet-A/-R's 200, base -> new)

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

