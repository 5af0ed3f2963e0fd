"""Intra-class visual variance and inter-class text variance of CLIP features (UPT App. A, Eq. (6)-(8); Fig. 1 (d)(e)).

    python variance.py --dataset eurosat --root DATA [--backbone ViT-B/16] [--split test]
Features are CLIP's (zero-shot, L2-normalised); a variance is the squared distance to the mean, summed over dimensions.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import clip_model
import data
import runs
import train
from features import image_features
from zeroshot import TEMPLATES, ZeroShot


def intra_class_visual_variance(features, labels):
    """Eq. (6)-(7): Var_v = 1/k sum_c 1/|X_c| sum_{x in X_c} ||f(x) - mean_c||^2. features (N, E), labels (N,)."""
    per_class = [((features[labels == c] - features[labels == c].mean(0)) ** 2).sum(-1).mean() for c in labels.unique()]
    return torch.stack(per_class).mean().item()


def inter_class_text_variance(text_features):
    """Eq. (8): Var_t = 1/k sum_c ||w_c - mean_w||^2. text_features (K, E)."""
    return ((text_features - text_features.mean(0)) ** 2).sum(-1).mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="CoOp dataset name (e.g. eurosat) or folder:/path")
    p.add_argument("--root", default="DATA", help="folder holding the datasets ($DATA)")
    p.add_argument("--backbone", default="ViT-B/16", help="OpenAI model name or checkpoint path")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="images whose variance is taken")
    p.add_argument("--workers", type=int, default=4, help="data loading processes")
    p.add_argument("--output-dir", default="output", help="the image-feature cache and results.jsonl live here")
    args = p.parse_args(argv)
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ds = data.load_dataset(args.dataset, args.root, check_splits=(args.split,))
        items = getattr(ds, args.split)
        if not items:
            raise data.DataError(f"{args.dataset}'s {args.split} split is empty: pick another --split")
        clip, _ = clip_model.load(args.backbone, device)
        compute = train.setup_precision("amp", device)
        transform = data.test_transform(clip.visual.input_resolution)
        features = F.normalize(image_features(clip, items, transform, backbone=args.backbone, output_dir=args.output_dir,
                                              workers=args.workers, device=device, autocast=compute.autocast).float(),
                               dim=-1)
        labels = torch.tensor([label for _, label in items])
        template = TEMPLATES.get(args.dataset, "a photo of a {}.")
        text = ZeroShot(clip, ds.classnames, templates=[template]).text_features
        var_v, var_t = intra_class_visual_variance(features, labels), inter_class_text_variance(text.float().cpu())
        print(f"{args.dataset}: intra-class visual variance {var_v:.4f} | inter-class text variance {var_t:.4f}")
        runs.append_rows(os.path.join(args.output_dir, "results.jsonl"), [dict(
            kind="variance", dataset=args.dataset, backbone=args.backbone, split=args.split, var_v=var_v, var_t=var_t,
            template=template, images=len(items), classes=len(ds.classnames), git=runs.git_commit())])
    except (data.DataError, clip_model.CLIPError, runs.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return var_v, var_t


if __name__ == "__main__":
    main()
