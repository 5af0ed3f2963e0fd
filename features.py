"""Frozen CLIP image features on disk: why the second run is fast.

Two stores, both keyed by what determines their numbers (the weights' SHA256, the transform, the ordered image list
with each image's size and modification time, the seed for augmented images, the precision and the device) and checked
on every read (shape, dtype, SHA256), so images rewritten at the same paths or new weights at the same path are
computed again:
- the test-feature cache, OUTPUT/feature_cache/<key>.pt: one file per image set, for methods whose image path is frozen
  and prompt-free (zero-shot, CoOp, CoCoOp, classifier fine-tuning, linear probe); kept under FEATURE_CACHE_BUDGET;
- the feature bank, OUTPUT/feature_bank/<key>/epochXXXX.pt: the training images as augmented in each epoch, shared by
  every run on the same subset, so a CoOp step reads features instead of running the image encoder.
A store that cannot be written is said once and skipped: the features are computed in memory instead.
"""
import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil

import torch

import clip_weights
import data
from runs import RunError, locked, progress, save_atomic, temporary_name

FEATURE_CACHE_BUDGET = 20 * 2 ** 30  # bytes of cached test features per output dir; the oldest files go first
BANK_BUDGET = 100 * 2 ** 30  # bytes one feature bank may take (and never more than the free disk space)
UNWRITABLE = set()  # folders of stores found unwritable in this process (said once each)


def backbone_weights(backbone):
    """The file clip_model.load(backbone) reads (clip_weights.find): its source and SHA256 key the features and go
    into results rows; the SHA256 is computed again whenever the file changes (clip_weights.sha256_of)."""
    return clip_weights.find(backbone)


def images_stamp(items):
    """A hash of each image's size and modification time: a dataset rewritten at the same paths changes it."""
    digest = hashlib.sha1()
    for path, _ in items:
        try:
            st = os.stat(path)
        except OSError as e:
            raise data.DataError(f"cannot read image {path} ({e.strerror or e})") from None
        digest.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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
    with contextlib.suppress(OSError):  # a read-only cache is still read
        os.utime(path)  # recently used: pruned last
    return features


def write_features(features, path, budget=None):
    save_atomic(dict(features=features, sha256=tensor_sha256(features)), path)  # removes dead writers' .tmp files
    if budget:  # keep the folder under budget: the least recently used files go first
        files = []
        for f in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "*.pt")):
            with contextlib.suppress(OSError):  # removed meanwhile by another run's pruning
                files.append((os.path.getmtime(f), os.path.getsize(f), f))
        used = 0
        for _, size, f in sorted(files, reverse=True):
            used += size
            if used > budget and f != path:
                with contextlib.suppress(OSError):
                    os.remove(f)


def writable(folder, what, instead):
    """Whether folder can be written now; if not, a warning (once per folder and process): a store to skip, never a
    reason to stop."""
    probe = temporary_name(os.path.join(folder, "probe"))
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, "x").close()
        os.remove(probe)
        return True
    except OSError as e:
        return unwritable(folder, f"{what} {folder} cannot be written ({e.strerror or e}): {instead}")


def unwritable(folder, message):
    """Say once per folder and process that a store cannot be written, and what happens instead; -> False."""
    if folder not in UNWRITABLE:
        UNWRITABLE.add(folder)
        print(f"warning: {message}")
    return False


def keep(features, path, what, instead, budget=None):
    """Store features for later runs; a write that fails (a full disk, a quota) is said once and skipped."""
    if writable(os.path.dirname(path), what, instead):
        try:
            write_features(features, path, budget)
        except RunError as e:
            unwritable(os.path.dirname(path), f"{what}: {e}; meanwhile {instead}")


def feature_dtype(autocast):
    return autocast.fast_dtype if isinstance(autocast, torch.autocast) else torch.float32


def features_key(backbone, transform, items, *extra, autocast, device):
    """The key of stored features: what determines them (the weights, the transform, the images and what can change
    them, `extra` such as the augmentation seed, the precision and the device)."""
    parts = [backbone_weights(backbone).sha256, data.transform_key(transform), items, images_stamp(items), *extra,
             str(feature_dtype(autocast)), device]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def encode_all(clip, loader, device, autocast, what):
    out = []
    for images, _ in progress(loader, len(loader), what):
        with autocast:
            out.append(clip.encode_image(images.to(device, non_blocking=True)).to(feature_dtype(autocast)).cpu())
    return torch.cat(out) if out else torch.zeros(0, clip.visual.output_dim, dtype=feature_dtype(autocast))


def image_features(clip, items, transform, *, backbone, output_dir, workers, device, autocast):
    """(N, E) features of the images `items` under a deterministic transform, cached in OUTPUT/feature_cache/."""
    key = features_key(backbone, transform, items, autocast=autocast, device=device)
    path = os.path.join(output_dir, "feature_cache", f"{key}.pt")
    shape, dtype = (len(items), clip.visual.output_dim), feature_dtype(autocast)
    features = read_features(path, shape, dtype)
    if features is None:
        loader = data.make_loader(items, transform, 256, train=False, workers=workers)
        features = encode_all(clip, loader, device, autocast, f"image features ({len(items)} images)")
        keep(features, path, "the test-feature cache", "computing features in every run", FEATURE_CACHE_BUDGET)
    return features


class FeatureBank:
    """Features of every training image as augmented in each epoch (data.augmentation_seed(seed, epoch, index)),
    shared by every run whose image path is frozen on the same subset: epoch e is computed by the first run that needs
    it and read by all others, so budgets share a prefix (a 200-epoch bank serves 50- and 100-epoch runs)."""

    def __init__(self, clip, items, *, backbone, seed, output_dir, workers, device, autocast):
        self.clip, self.seed, self.device, self.autocast = clip, seed, device, autocast
        transform = data.train_transform(clip.visual.input_resolution)
        self.make_loader = functools.partial(data.make_loader, items, transform, 256, train=False, seed=seed,
                                             workers=workers)
        key = features_key(backbone, transform, items, seed, autocast=autocast, device=device)
        self.dir = os.path.join(output_dir, "feature_bank", key)
        self.shape, self.dtype = (len(items), clip.visual.output_dim), feature_dtype(autocast)
        self.loader, self.built, self.reused = None, 0, 0

    def fits(self, epochs, output_dir):
        """Whether `epochs` epochs of features fit the budget and the free disk space, and the bank can be written (said
        either way)."""
        size, room = self.shape[0] * self.shape[1] * self.dtype.itemsize * epochs, shutil.disk_usage(output_dir).free
        if size > min(BANK_BUDGET, room):
            print(f"feature bank: {size / 2 ** 30:.1f} GiB for {epochs} epochs is over the budget "
                  f"({min(BANK_BUDGET, room) / 2 ** 30:.1f} GiB free or allowed): training from images")
            return False
        if not writable(self.dir, "feature bank", "training from images"):
            return False
        stored = len(glob.glob(os.path.join(self.dir, "epoch*.pt")))
        print(f"feature bank {self.dir}: {stored} epochs stored, the rest are built as training reaches them")
        return True

    def batches(self, epoch, labels, size, n_batches):
        """An epoch's batches, drawn as from images: consecutive chunks of data.epoch_order(N, seed, epoch)."""
        features = self.epoch(epoch).to(self.device)  # (N, E)
        order = torch.tensor(data.epoch_order(len(labels), self.seed, epoch), device=self.device)
        for index in order.split(size)[:n_batches]:
            yield features[index], labels[index]

    def epoch(self, epoch):
        """(N, E) features of the training images in index order, as augmented in `epoch`."""
        path = os.path.join(self.dir, f"epoch{epoch:04d}.pt")
        with locked(os.path.join(self.dir, "lock")):  # concurrent runs compute an epoch once
            features = read_features(path, self.shape, self.dtype)
            if features is None:
                if self.loader is None:  # images decoded once, kept for the following epochs
                    self.loader = self.make_loader()
                self.loader.sampler.set_epoch(epoch)
                features = encode_all(self.clip, self.loader, self.device, self.autocast, f"feature bank epoch {epoch + 1}")
                keep(features, path, "feature bank", "its epochs are computed again by later runs")
                self.built += 1
            else:
                self.reused += 1
        return features

