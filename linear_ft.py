"""Classifier fine-tuning (Rethinking the Value of Prompt Learning, ICLR 2023 submission, §5): learn the classifier
w_k = ψ(t_k) directly, from the zero-shot text features; plus the linear-probe baseline (CLIP, arXiv:2103.00020, and
CoOp, arXiv:2109.01134). UPT (arXiv:2210.07225) Eq. (1): logits = exp(logit_scale) · cos(z, w_k), with w_k trained.
"""
import torch
import torch.nn.functional as F
from torch import nn

import clip_model

TEXT_CHUNK = 1000  # texts per text-encoder call
COSTS = tuple(10.0 ** k for k in range(-6, 7))  # C grid of the linear probe, 1e-6 .. 1e6 (CLIP's search range)


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
    """logits = W · normalize(z) + b. cost: the chosen C; val_accuracy: its validation accuracy (None without val)."""

    def __init__(self, clip, weight, bias, *, cost=None, val_accuracy=None):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.weight = nn.Parameter(weight)  # (K, E)
        self.bias = nn.Parameter(bias)  # (K,)
        self.cost, self.val_accuracy = cost, val_accuracy

    def forward_features(self, image_features):
        """image_features: raw or normalised clip.encode_image output (B, E) -> logits (B, K)."""
        return F.linear(F.normalize(image_features.float(), dim=-1), self.weight, self.bias)  # (B, K)

    def forward(self, images):
        return self.forward_features(self.clip.encode_image(images))


def fit_linear_probe(clip, train_features, train_labels, val_features, val_labels, *, costs=COSTS, max_iter=1000,
                     num_classes=None):
    """Fit on train, for every C in costs (inverse L2 strength, as scikit-learn's LogisticRegression that CLIP and CoOp
    use): minimise mean CE + ||W||² / (2·C·N) (bias not penalised) in fp32 with full-batch L-BFGS (strong Wolfe) on
    clip's device, C ascending, each fit warm-started from the previous one (the problem is convex). Keeps the C with
    the best validation accuracy (ties: the stronger regularisation) and returns that train-only fit (CoOp's protocol:
    val only selects C). Without validation examples, C = the middle of the grid (1 for the default one).
    num_classes: default max label + 1 over train and val."""
    device = clip.logit_scale.device
    x, y = F.normalize(train_features.float().to(device), dim=-1), train_labels.long().to(device)  # (N, E), (N,)
    x_val, y_val = F.normalize(val_features.float().to(device), dim=-1), val_labels.long().to(device)
    K = num_classes or int(torch.cat([y, y_val]).max()) + 1
    costs = sorted(costs) if len(y_val) else [sorted(costs)[len(costs) // 2]]
    weight = torch.zeros(K, x.shape[1], device=device, requires_grad=True)  # (K, E)
    bias = torch.zeros(K, device=device, requires_grad=True)  # (K,)
    best = None
    for cost in costs:
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            with torch.enable_grad():
                loss = F.cross_entropy(F.linear(x, weight, bias), y) + weight.square().sum() / (2 * cost * len(y))
                loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            accuracy = (F.linear(x_val, weight, bias).argmax(-1) == y_val).float().mean().item() if len(y_val) else None
        if best is None or (accuracy is not None and accuracy > best[1]):
            best = (cost, accuracy, weight.detach().clone(), bias.detach().clone())
    cost, accuracy, weight, bias = best
    return LinearProbe(clip, weight, bias, cost=cost, val_accuracy=accuracy)
