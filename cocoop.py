"""CoCoOp: conditional context optimization (Zhou et al., "Conditional Prompt Learning for Vision-Language Models",
CVPR 2022, arXiv:2203.05557): a meta-net shifts the shared context by an image-conditional token, t_m(x) = t_m + π(x).
UPT (arXiv:2210.07225) Eq. (2) with t_m(x) for t_m; Eq. (1): logits_bk = exp(logit_scale) · cos(z_b, ψ(T̂_k(x_b))).
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

import clip_model


class CoCoOp(nn.Module):
    """ctx (n_ctx, D) from the embeddings of ctx_init's first n_ctx BPE tokens, as CoOp (all of them when
    n_ctx=None, so "an itap of a" learns its 5; a smaller n_ctx keeps the rest as fixed words), or n_ctx (default 4)
    vectors from N(0, 0.02²); meta-net
    Linear(E, E // 16) -> ReLU -> Linear(E // 16, D) on the normalised image feature, as CoCoOp's code (default init,
    global RNG). Text features are computed for every (image, class) pair, in chunks of at most max_sequences sequences
    (at least one image per chunk); the text encoder computes each image's prefix [SOS, ctx + π(x)] once.
    """

    def __init__(self, clip, classnames, *, n_ctx=None, ctx_init="a photo of a", max_sequences=4096):
        super().__init__()
        self.clip = clip.requires_grad_(False)
        self.max_sequences = max_sequences
        device, E, D = clip.logit_scale.device, clip.visual.output_dim, clip.ln_final.weight.shape[0]
        if ctx_init:
            ctx = clip_model.context_from_words(clip, ctx_init, n_ctx)  # (n_ctx, D)
            n_ctx, prefix = ctx.shape[0], ctx_init.replace("_", " ")
        else:
            n_ctx = n_ctx or 4  # the UPT paper's m
            ctx = nn.init.normal_(torch.empty(n_ctx, D, device=device), std=0.02)  # (n_ctx, D)
            prefix = " ".join(["X"] * n_ctx)  # placeholders, replaced by ctx
        self.ctx = nn.Parameter(ctx)
        self.meta_net = nn.Sequential(OrderedDict(linear1=nn.Linear(E, E // 16), relu=nn.ReLU(inplace=True),
                                                  linear2=nn.Linear(E // 16, D))).to(device)
        texts = [f"{prefix} {name.replace('_', ' ')}." for name in classnames]
        tokens = clip_model.tokenize(texts, context_length=clip.context_length).to(device)  # (K, L)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)

    def forward_features(self, image_features):
        """image_features: raw clip.encode_image output (B, E) -> logits (B, K)."""
        K = self.tokenized_prompts.shape[0]
        image_features = F.normalize(image_features.float(), dim=-1)  # (B, E)
        ctx = self.ctx + self.meta_net(image_features)[:, None]  # t_m(x) = t_m + π(x): (B, n_ctx, D)
        per_chunk = max(1, self.max_sequences // K)  # images per text-encoder call
        logits = []
        for img, ctx_chunk in zip(image_features.split(per_chunk), ctx.split(per_chunk)):
            b = img.shape[0]
            text = self.tokenized_prompts.repeat(b, 1)  # (b·K, L): image-major, class-minor
            text = self.clip.encode_text(text, prompts=ctx_chunk[None])  # Eq. (2), one context per image: (b·K, E)
            text = F.normalize(text.float(), dim=-1).view(b, K, -1)  # (b, K, E)
            logits.append(torch.einsum("be,bke->bk", img, text))  # (b, K)
        return self.clip.logit_scale.exp() * torch.cat(logits)  # Eq. (1): (B, K)

    def forward(self, images):
        return self.forward_features(self.clip.encode_image(images))
