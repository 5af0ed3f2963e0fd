"""UPT: Unified Prompt Tuning (Zang et al., "Unified Vision and Language Prompt Learning", arXiv:2210.07225).
Unified prompts U -> lightweight Transformer layer θ (Eq. (5)) -> split {Û_t, Û_v} into text prompts (CoOp, Eq. (2))
and visual prompts (VPT, Eq. (4)); logits by Eq. (1). Also the released code's θ and the ablations of Table 2 / Fig. 5.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

VARIANTS = ("attention", "joint", "shared", "mlp")


# ----------------------------------------------------------------------------------------------------------------------
# The lightweight Transformer layer θ

class Theta(nn.Module):
    """θ of Eq. (5) on (depth, 2n, D): one sequence of 2n tokens per prompted layer, one θ shared by all layers (the
    paper: "a lightweight Transformer layer θ"). Modules as released: 1-head MHA, two LayerNorms, FFN hidden width D
    (the paper gives none; the release's 512 = D, not 4D, keeps its parameter budget); dropout after SA, in and
    after the FFN.

    released=False (paper): U' = SA(U) + LN(U); Û = FFN(LN(U')) + LN(U'), attention across the 2n tokens.
    released=True (code): U' = LN(U + SA(U)); Û = U' + FFN(LN(U')), attention over sequences of length 1 (the release
    feeds (1, 2n, D) to a batch_first=False MHA): each token attends only to itself, no token mixing.
    """

    def __init__(self, width, dropout, released):
        super().__init__()
        self.released = released
        self.attn = nn.MultiheadAttention(width, 1, dropout=dropout, batch_first=True)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.drop_1, self.drop_2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, u):  # (depth, 2n, D) -> (depth, 2n, D)
        if self.released:
            tokens = u.reshape(-1, 1, u.shape[-1])  # (depth * 2n, 1, D): every token is its own sequence
            x = self.ln_1(u + self.drop_1(self.attn(tokens, tokens, tokens, need_weights=False)[0].view_as(u)))
            return x + self.drop_2(self.ffn(self.ln_2(x)))
        x = self.drop_1(self.attn(u, u, u, need_weights=False)[0]) + self.ln_1(u)  # Eq. (5): U' = SA(U) + LN(U)
        x = self.ln_2(x)
        return self.drop_2(self.ffn(x)) + x  # Eq. (5): Û = FFN(LN(U')) + LN(U')


# ----------------------------------------------------------------------------------------------------------------------
# UPT

class UPT(nn.Module):
    """Shapes:
    - U: (depth, 2 * n_ctx, D = text width), init normal(0.02), for the first `depth` layers of both encoders.
    - θ(U) -> Û_t, the first n tokens (width D, no projection), and Û_v, the last n through Linear(D -> Dv) (as
      released; the paper mentions no projection).
    - Text "X X X X {class}.": Û_t replaces the n X's at layer 0 (positions 1..n) and their outputs deeper. Vision: Û_v
      after CLS, before ln_pre, without position embedding (clip_model.VisionTransformer).
    vs the released code (trainers/unified.py, Unified_v6), each undone by released_code=True (which needs
    variant="attention" and depth=1):
    - Eq. (5) as printed, with attention across the 2n tokens;
    - θ runs once per forward (the release runs it once per modality, so train-mode dropout masks differ);
    - any n_ctx (the release hard-codes 4) and depth > 1 (the paper's layer-wise U^i).
    Both wirings hold the same 1,976,064 parameters for n_ctx=4, D=512, Dv=768.
    Ablations of §3.3 (not in the release):
    - "joint": CoOp text prompts (1, n, D), normal(0.02), plus VPT-deep visual prompts (L_v, n, Dv), VPT init, trained
      together (the release notes' "vpt-deep + coop, separate"); depth=1 only.
    - "shared": one U (depth, n, D) fed as is to the text encoder and, through Linear(D -> Dv), to the ViT; no θ.
    - "mlp": θ replaced by two per-token layers Linear(D, D)-ReLU-Linear(D, D), no dropout (`dropout` is θ's only).
    """

    def __init__(self, clip, classnames, *, n_ctx=4, depth=1, variant="attention", released_code=False, dropout=0.1):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown UPT variant {variant!r}: use one of {', '.join(VARIANTS)}")
        if not isinstance(clip.visual, clip_model.VisionTransformer):
            raise clip_model.CLIPError("UPT prompts the image encoder: use a ViT backbone such as ViT-B/16")
        max_depth = min(clip.transformer.layers, clip.visual.transformer.layers)
        if not 1 <= depth <= max_depth:
            raise ValueError(f"depth={depth}: UPT prompts layers of both encoders, so 1 <= depth <= {max_depth}")
        if (released_code or variant == "joint") and depth != 1:
            raise ValueError(f"depth={depth}: released_code and variant='joint' fix the prompted layers: use depth=1")
        if released_code and variant != "attention":
            raise ValueError(f"released_code=True reproduces the released θ: use variant='attention', not {variant!r}")
        if n_ctx < 1:
            raise ValueError(f"n_ctx={n_ctx}: UPT needs at least one prompt token per modality")
        self.clip = clip.requires_grad_(False)
        self.n_ctx, self.variant, self.released_code = n_ctx, variant, released_code
        width, vision_width = clip.ln_final.weight.shape[0], clip.visual.conv1.out_channels
        tokens = clip_model.tokenize([" ".join(["X"] * n_ctx + [f"{name}."]) for name in classnames])  # (K, 77)
        self.register_buffer("tokens", tokens.to(clip.logit_scale.device), persistent=False)
        if variant == "joint":
            patch, layers = clip.visual.conv1.kernel_size[0], clip.visual.transformer.layers
            bound = math.sqrt(6 / (3 * patch ** 2 + vision_width))  # VPT's init
            self.text_prompts = nn.Parameter(torch.randn(1, n_ctx, width) * 0.02)  # (1, n, D)
            self.visual_prompts = nn.Parameter(torch.empty(layers, n_ctx, vision_width).uniform_(-bound, bound))
            return
        tokens_per_layer = n_ctx if variant == "shared" else 2 * n_ctx
        self.prompts = nn.Parameter(torch.randn(depth, tokens_per_layer, width) * 0.02)  # U: (depth, 2n or n, D)
        self.proj = nn.Linear(width, vision_width)  # Û_v -> ViT width
        if variant == "attention":
            self.theta = Theta(width, dropout, released_code)
        elif variant == "mlp":
            self.theta = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def prompt_pair(self):
        """-> text prompts (depth, n, D) and visual prompts (depth or L_v, n, Dv) for clip_model's encoders."""
        if self.variant == "joint":
            return self.text_prompts, self.visual_prompts
        if self.variant == "shared":
            return self.prompts, self.proj(self.prompts)
        if self.released_code:  # θ once per modality, as released: train-mode dropout masks differ
            return self.theta(self.prompts)[:, :self.n_ctx], self.proj(self.theta(self.prompts)[:, self.n_ctx:])
        text, visual = self.theta(self.prompts).split(self.n_ctx, dim=1)  # Û = {Û_t, Û_v}: 2 x (depth, n, D)
        return text, self.proj(visual)  # (depth, n, D), (depth, n, Dv)

    def prepare(self):
        """What does not depend on the image: -> visual prompts and normalised text features (K, E). Evaluation
        computes it once and passes it to forward for every batch."""
        text_prompts, visual_prompts = self.prompt_pair()
        text_features = F.normalize(self.clip.encode_text(self.tokens, text_prompts), dim=-1)  # Eq. (2): (K, E)
        return visual_prompts, text_features

    def forward(self, images, prepared=None):
        visual_prompts, text_features = self.prepare() if prepared is None else prepared
        image_features = F.normalize(self.clip.encode_image(images, visual_prompts), dim=-1)  # (B, E)
        return self.clip.logit_scale.exp() * image_features @ text_features.t()  # Eq. (1): (B, K)
