"""Classifier fine-tuning (Rethinking the Value of Prompt Learning, ICLR 2023 submission, §5): learn the classifier
w_k = ψ(t_k) directly, from the zero-shot text features; plus the linear-probe baseline (CLIP, arXiv:2103.00020, and
CoOp, arXiv:2109.01134). UPT (arXiv:2210.07225) Eq. (1): logits = exp(logit_scale) · cos(z, w_k), with w_k trained.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

TEXT_CHUNK = 1000  # texts per text-encoder call
COSTS = tuple(10.0 ** k for k in (6, 4, 2, 0, -2, -4, -6))  # CoOp lpclip's first C grid (linear_probe.py), its order
REFINE_STEPS = 8  # lpclip's binary-search rounds in log10 C after the grid (its --num_step)
HOLDOUT_SHOTS = 4  # without a val split: at most this many training shots per class held out to choose C (lpclip's
# val sample is min(shots, 4) per class)


class LinearFT(nn.Module):
    """Cosine classifier with CLIP's frozen logit scale; weight (K, E) starts as the normalised zero-shot text features
    of `template`, so step 0 equals ZeroShot with that single template."""

    def __init__(self, clip, classnames, *, template="a photo of a {}."):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        texts = [template.format(name.replace("_", " ")) for name in classnames]
        tokens = clip_model.tokenize(texts, context_length=clip.context_length).to(clip.logit_scale.device)  # (K, L)
        with torch.no_grad():
            features = torch.cat([clip.encode_text(chunk) for chunk in tokens.split(TEXT_CHUNK)])  # (K, E)
        self.weight = nn.Parameter(F.normalize(features.float(), dim=-1))  # (K, E): w_k = ψ(t_k) at step 0

    def forward_features(self, image_features):
        """image_features: raw clip.encode_image output (B, E) -> logits (B, K)."""
        image_features = F.normalize(image_features.float(), dim=-1)
        weight = F.normalize(self.weight.float(), dim=-1)  # (K, E)
        return self.clip.logit_scale.exp() * image_features @ weight.t()  # Eq. (1): (B, K)

    def forward(self, images):
        return self.forward_features(self.clip.encode_image(images))


# ----------------------------------------------------------------------------------------------------------------------
# Linear probe: multinomial logistic regression on frozen, L2-normalised image features

class LinearProbe(nn.Module):
    """logits = W · normalize(z) + b. cost: the chosen C; val_accuracy: its validation accuracy (None: not searched);
    cost_search: how C was chosen, in words."""

    def __init__(self, clip, weight, bias, *, cost=None, val_accuracy=None, cost_search=None):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.weight = nn.Parameter(weight)  # (K, E)
        self.bias = nn.Parameter(bias)  # (K,)
        self.cost, self.val_accuracy, self.cost_search = cost, val_accuracy, cost_search

    def forward_features(self, image_features):
        """image_features: raw or normalised clip.encode_image output (B, E) -> logits (B, K)."""
        return F.linear(F.normalize(image_features.float(), dim=-1), self.weight, self.bias)  # (B, K)

    def forward(self, images):
        return self.forward_features(self.clip.encode_image(images))


def fit_logistic(x, y, num_classes, cost, max_iter):
    """Multinomial logistic regression from zero: minimise mean CE + ||W||² / (2·C·N) (bias not penalised;
    scikit-learn's LogisticRegression objective that CLIP and CoOp use, divided by N as scikit-learn >= 1.2 does) in
    fp32 with full-batch L-BFGS (strong Wolfe), stopping as scikit-learn at max |gradient| <= 1e-4 or max_iter.
    x (N, E) normalised, y (N,) -> weight (K, E), bias (K,)."""
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)  # (K, E)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)  # (K,)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-4,  # scikit-learn's tol
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(F.linear(x, weight, bias), y) + weight.square().sum() / (2 * cost * len(y))
            loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def search_cost(evaluate, *, costs=COSTS, steps=REFINE_STEPS):
    """CoOp's lpclip search for C: the best of `costs` by validation accuracy (ties: the first in their order), then
    `steps` rounds of a binary search in log10 C on [peak / 10, peak · 10]: score both ends, keep the better (ties: the
    left, smaller C) and halve the interval towards it. evaluate(C) -> (validation accuracy, fit), called once per C.
    -> (C, its accuracy, its fit, [(C, accuracy) in the order tried])."""
    tried = {}

    def score(log_cost):  # lpclip refits the end it kept; the fit is the same, so each C is fitted once
        key = round(log_cost, 12)
        if key not in tried:
            tried[key] = evaluate(10.0 ** key)
        return tried[key][0]

    logs = [math.log10(c) for c in costs]
    best = max(logs, key=lambda c: (score(c), -logs.index(c)))
    left, right = best - 1, best + 1
    for _ in range(steps):
        middle = (left + right) / 2
        if score(left) < score(right):
            best, left = right, middle
        else:
            best, right = left, middle
    accuracy, fit = tried[round(best, 12)]
    return 10.0 ** round(best, 12), accuracy, fit, [(10.0 ** c, a) for c, (a, _) in tried.items()]


def validated(x, y, x_val, y_val, num_classes, max_iter):
    """evaluate(C) for search_cost: the train fit at C and its accuracy on the validation images."""
    def evaluate(cost):
        weight, bias = fit_logistic(x, y, num_classes, cost, max_iter)
        return (F.linear(x_val, weight, bias).argmax(-1) == y_val).float().mean().item(), (weight, bias)
    return evaluate


def holdout(labels, per_class, generator):
    """A validation sample held out of the training shots: `per_class` random images of every class -> (kept, held)
    index tensors."""
    held = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()),
                                                                           generator=generator)[:per_class]]
                      for c in labels.unique()])
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[held] = False
    return torch.nonzero(kept).flatten(), held.sort().values


def fit_linear_probe(clip, train_features, train_labels, val_features, val_labels, *, costs=COSTS,
                     steps=REFINE_STEPS, max_iter=1000, num_classes=None, seed=0):
    """The linear probe as CoOp's lpclip: C searched on validation images (search_cost), the probe the train-only fit
    at that C. Without validation images (ImageNet, folder datasets without val/), min(shots // 2, HOLDOUT_SHOTS)
    training shots per class are held out (drawn with `seed`) to search C, and the probe is refitted on every training
    shot at the C found; with 1 shot per class nothing can be held out and C = 1 (not searched). probe.cost_search
    says which. num_classes: default max label + 1 over train and val."""
    device = clip.logit_scale.device
    x, y = F.normalize(train_features.float().to(device), dim=-1), train_labels.long().to(device)  # (N, E), (N,)
    x_val, y_val = F.normalize(val_features.float().to(device), dim=-1), val_labels.long().to(device)
    K = num_classes or int(torch.cat([y, y_val]).max()) + 1
    how = f"CoOp's lpclip search ({len(costs)}-point grid, {steps} binary steps)"
    if len(y_val):
        cost, accuracy, (weight, bias), _ = search_cost(validated(x, y, x_val, y_val, K, max_iter), costs=costs,
                                                        steps=steps)
        return LinearProbe(clip, weight, bias, cost=cost, val_accuracy=accuracy,
                           cost_search=f"{how} on the validation split ({len(y_val)} images)")
    counts = torch.bincount(y.cpu())
    shots = int(counts[counts > 0].min())
    per_class = min(shots // 2, HOLDOUT_SHOTS)
    if per_class == 0:
        weight, bias = fit_logistic(x, y, K, 1.0, max_iter)
        return LinearProbe(clip, weight, bias, cost=1.0, val_accuracy=None,
                           cost_search="not searched: no validation split and 1 training shot per class, none to hold "
                                       "out; C = 1")
    kept, held = holdout(y.cpu(), per_class, torch.Generator().manual_seed(seed))
    kept, held = kept.to(device), held.to(device)
    cost, accuracy, _, _ = search_cost(validated(x[kept], y[kept], x[held], y[held], K, max_iter), costs=costs,
                                       steps=steps)
    weight, bias = fit_logistic(x, y, K, cost, max_iter)  # every training shot at the C found
    return LinearProbe(clip, weight, bias, cost=cost, val_accuracy=accuracy,
                       cost_search=f"{how} on {per_class} of {shots} training shots per class held out (no validation "
                                   "split), then refitted on all of them")
