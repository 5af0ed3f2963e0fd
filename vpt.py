"""VPT: Visual Prompt Tuning (Jia et al., ECCV 2022, arXiv:2203.12119) on CLIP's ViT, the baseline of UPT (2210.07225).
Learned visual prompts V^i right after CLS, at the input (shallow) or at every layer (deep): UPT paper Eq. (3)-(4);
the classifier is CLIP's frozen zero-shot text features of one template; logits by Eq. (1).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import clip_model


class VPT(nn.Module):
    """Visual prompts (depth, n_ctx, Dv), depth = 1 (VPT-shallow) or the number of vision layers (VPT-deep).

    Layer 0's prompts go between CLS and the patches after the positional embedding (they get none) and before ln_pre;
    layer i > 0's replace the previous layer's prompt outputs (clip_model.VisionTransformer.forward). VPT's init
    uniform(-v, v), v = sqrt(6 / (3 * patch^2 + Dv)) (0.0625 for ViT-B/16), at every layer; no prompt dropout (VPT's
    default). The text classifier is computed once: the UPT paper uses "a photo of a {}." (App. B), its code CoOp's
    per-dataset template (pass it as `template`). n_ctx=0 is zero-shot CLIP with that template.

    released_code=True: the UPT release's VPT (vpt_shallow.py / vpt_deep.py): prompts drawn from normal(0, 0.02), and
    VPT-deep puts layer 0's prompts after ln_pre (its VPT-shallow, like ours, before).
    """

    def __init__(self, clip, classnames, *, n_ctx=4, deep=False, template="a photo of a {}.", released_code=False):
        super().__init__()
        if not isinstance(clip.visual, clip_model.VisionTransformer):
            raise clip_model.CLIPError("VPT prompts the image encoder: use a ViT backbone such as ViT-B/16")
        self.clip = clip.requires_grad_(False)
        self.after_ln_pre = released_code and deep
        width, patch = clip.visual.conv1.out_channels, clip.visual.conv1.kernel_size[0]
        depth = clip.visual.transformer.layers if deep else 1
        bound = math.sqrt(6 / (3 * patch ** 2 + width))
        prompts = torch.empty(depth, n_ctx, width)
        prompts = prompts.normal_(std=0.02) if released_code else prompts.uniform_(-bound, bound)
        self.prompts = nn.Parameter(prompts)  # V: (depth, n, Dv)
        tokens = clip_model.tokenize([template.format(name) for name in classnames])  # (K, 77)
        with torch.no_grad():
            text_features = F.normalize(clip.encode_text(tokens.to(clip.logit_scale.device)), dim=-1)  # (K, E)
        self.register_buffer("text_features", text_features, persistent=False)

    def forward(self, images):
        image_features = F.normalize(self.clip.encode_image(images, self.prompts, self.after_ln_pre), dim=-1)
        return self.clip.logit_scale.exp() * image_features @ self.text_features.t()  # Eq. (1): (B, K)
