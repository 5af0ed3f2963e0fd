"""CoOp: context optimization (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022,
arXiv:2109.01134): a learned context t_1..t_m in the text prompt, shared or one per class (CSC); CLIP frozen.
UPT (arXiv:2210.07225) Eq. (2): T̂ = [t_1, ..., t_m, CLASS]; Eq. (1): logits = exp(logit_scale) · cos(z, ψ(T̂_k)).
"""
import torch
import torch.nn.functional as F
from torch import nn

import clip_model

POSITIONS = ("end", "middle", "front")


class CoOp(nn.Module):
    """Options (CoOp's defaults):
    - n_ctx: learned context tokens t_1..t_m (16), drawn from N(0, 0.02²) by the global torch RNG that train.py seeds.
    - ctx_init: words whose embeddings start the context (e.g. "a photo of a"): all their BPE tokens are learned, or
      only the first n_ctx when n_ctx is given, the rest kept as fixed words ("an itap of a" is 5 tokens: n_ctx=4).
    - csc: one context per class; class_token_position: "end", "middle" or "front".
    Shapes: ctx (n_ctx, D), or (K, n_ctx, D) with csc; tokenized_prompts (K, 77): [SOS, X..X, CLASS, ., EOT, 0..].
    vs CoOp's code: the random context is not its draw (its CLIP constructor consumes the RNG differently); with
    ctx_init, csc gives each class its own copy of the words, where CoOp ignores csc (drop csc for its behaviour); as in
    CoOp, a class name's length is that of the name tokenized alone, and n_ctx is its word count.
    """

    def __init__(self, clip, classnames, *, n_ctx=None, ctx_init="", csc=False, class_token_position="end"):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {', '.join(POSITIONS)}; "
                             f"got {class_token_position!r}")
        self.clip = clip.requires_grad_(False)
        self.class_token_position = class_token_position
        K, D = len(classnames), clip.ln_final.weight.shape[0]
        if ctx_init:
            ctx = clip_model.context_from_words(clip, ctx_init, n_ctx)  # (n_ctx, D)
            n_ctx, prefix = ctx.shape[0], ctx_init.replace("_", " ")
            ctx = ctx.expand(K, -1, -1).clone() if csc else ctx  # (K, n_ctx, D) or (n_ctx, D)
        else:
            n_ctx = n_ctx or 16  # CoOp's default
            ctx = torch.empty((K, n_ctx, D) if csc else (n_ctx, D), device=clip.logit_scale.device)
            nn.init.normal_(ctx, std=0.02)
            prefix = " ".join(["X"] * n_ctx)  # placeholders, replaced by ctx
        self.ctx = nn.Parameter(ctx)
        before_class = len(clip_model.tokenize(prefix)[0].nonzero()) - 2  # ctx and any fixed init words after it
        kept = 0 if csc else {"end": before_class, "middle": n_ctx // 2, "front": 0}[class_token_position]
        self.shared = 1 + kept  # [SOS, t_1..] the same in every prompt: the text encoder computes them once
        names = [name.replace("_", " ") for name in classnames]
        texts = [f"{prefix} {name}." for name in names]
        tokens = clip_model.tokenize(texts, context_length=clip.context_length).to(clip.logit_scale.device)  # (K, L)
        self.register_buffer("tokenized_prompts", tokens, persistent=False)  # [SOS, X..X, CLASS, ., EOT, 0..]
        if class_token_position != "end":
            name_lens = clip_model.tokenize(names, context_length=clip.context_length).argmax(-1) - 1  # (K,): alone
            order = self.token_order(tokens, name_lens.to(tokens.device), n_ctx, class_token_position)
            self.register_buffer("order", order, persistent=False)

    @staticmethod
    def token_order(tokens, name_lens, n_ctx, position):
        """(K, L) gather index, built for all classes at once, that turns the end layout [SOS, ctx, CLASS, ., EOT, 0..]
        into front [SOS, CLASS, ctx, ., EOT, 0..] or middle [SOS, ctx[:n//2], CLASS, ctx[n//2:], ., EOT, 0..].
        CLASS = the name_lens (K,) tokens right after ctx, as CoOp slices them: a last token merged with "." ("!." of
        "yahoo!") moves with the name; fixed init words left after ctx move first, and the name's tail stays behind."""
        h = 0 if position == "front" else n_ctx // 2  # context tokens kept before CLASS
        name_lens = name_lens[:, None]  # (K, 1)
        j = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # (K, L): position in the end layout
        target = torch.where((j > h) & (j <= n_ctx), j + name_lens, j)  # ctx[h:] moves after CLASS
        target = torch.where((j > n_ctx) & (j <= n_ctx + name_lens), j - n_ctx + h, target)  # CLASS moves to h + 1
        return target.argsort(dim=1)  # (K, L): new position -> end-layout position

    def prompt_embeddings(self):
        """-> (K, L, D) input embeddings: the end layout as CoOp's torch.cat([prefix, ctx, suffix]), reordered by a
        gather for middle/front."""
        embedding = self.clip.token_embedding(self.tokenized_prompts)  # (K, L, D): [SOS, X..X, CLASS, ., EOT, 0..]
        ctx = self.ctx.expand(embedding.shape[0], -1, -1)  # (K, n_ctx, D): one context shared, or one per class
        prefix, suffix = embedding[:, :1], embedding[:, 1 + ctx.shape[1]:]  # [SOS], [CLASS, ., EOT, 0..]
        x = torch.cat([prefix, ctx, suffix], dim=1)  # Eq. (2): [SOS, t_1..t_m, CLASS, ., EOT]
        return x if self.class_token_position == "end" else x.gather(1, self.order[..., None].expand_as(x))

    def text_features(self):
        """-> (K, E) text features of the K prompts; they depend on ctx, so every call recomputes them."""
        eot = self.tokenized_prompts.argmax(dim=-1)  # (K,)
        return self.clip.encode_token_embeddings(self.prompt_embeddings(), eot, shared=self.shared)

    def forward_features(self, image_features):
        """image_features: raw clip.encode_image output (B, E) -> logits (B, K); text features computed once."""
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(self.text_features().float(), dim=-1)  # (K, E)
        return self.clip.logit_scale.exp() * image_features @ text_features.t()  # Eq. (1): (B, K)

    def forward(self, images):
        return self.forward_features(self.clip.encode_image(images))
