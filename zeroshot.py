"""Zero-shot CLIP (Radford et al., arXiv:2103.00020) with hand-crafted, ensembled (CoOp's ZeroshotCLIP2,
arXiv:2109.01134) or random prompts (Rethinking the Value of Prompt Learning, ICLR 2023 submission, §4.1-4.2).
Eq. (1) of UPT (arXiv:2210.07225): logits = exp(logit_scale) · cos(z, w_k), w_k the frozen text classifier.
"""
import torch
import torch.nn.functional as F
from torch import nn

import clip_model

# CoOp's CUSTOM_TEMPLATES (trainers/zsclip.py), keyed by this repo's dataset names
TEMPLATES = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

# CoOp's IMAGENET_TEMPLATES_SELECT (trainers/imagenet_templates.py): the 7 templates ZeroshotCLIP2 ensembles
IMAGENET_TEMPLATES_SELECT = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Rethinking Table 1: hand-crafted prompts
HANDCRAFTED = {
    "classname": "{}",
    "basic": "a photo of a {}.",
    "revised": "this is a photo of a {}.",
    "negative": "this is not a photo of a {}.",
}

N_WORD_TOKENS = 49152  # CLIP's "49,152 vocab size": random word ids come from 0..49151 (never SOS 49406, EOT 49407)
TEXT_CHUNK = 1000  # texts per text-encoder call (ImageNet: 1000 classes x 7 templates)


class ZeroShot(nn.Module):
    """Frozen classifier: mean over templates of L2-normalised text features, renormalised (CoOp's ZeroshotCLIP2).

    random_prompt=None | "token" | "embedding" (Rethinking §4.2) prepends n_random random word ids, or n_random random
    vectors drawn from N(mean, std) of the whole token-embedding table (one scalar mean and std), to every template's
    text; the draw uses a private generator seeded by `seed` (the global RNG is untouched). Rethinking uses the bare
    class name: templates=("{}.",).
    """

    def __init__(self, clip, classnames, *, templates=("a photo of a {}.",), random_prompt=None, n_random=4, seed=1):
        super().__init__()
        if random_prompt not in (None, "token", "embedding"):
            raise ValueError(f"random_prompt must be None, 'token' or 'embedding', got {random_prompt!r}")
        self.clip = clip.requires_grad_(False)
        device, K = clip.logit_scale.device, len(classnames)
        texts = [t.format(name.replace("_", " ")) for t in templates for name in classnames]  # template-major, T·K
        generator, prompts = torch.Generator().manual_seed(seed), None
        if random_prompt == "embedding":  # [SOS, e_1..e_n, template(class), EOT]: "X" placeholders replaced by the e_i
            std, mean = torch.std_mean(clip.token_embedding.weight.detach().float())  # of the whole table
            prompts = torch.randn(1, n_random, clip.token_embedding.embedding_dim, generator=generator)  # (1, n, D)
            prompts = (prompts * std.item() + mean.item()).to(device)  # shared by every text
            texts = ["X " * n_random + text for text in texts]
        if random_prompt == "token":  # [SOS, r_1..r_n, template(class), EOT]
            words = torch.randint(0, N_WORD_TOKENS, (n_random,), generator=generator)
            tokens = clip_model.tokenize(texts, context_length=clip.context_length - n_random)  # (T·K, L - n)
            tokens = torch.cat([tokens[:, :1], words.expand(len(texts), -1), tokens[:, 1:]], dim=1)  # (T·K, L)
        else:
            tokens = clip_model.tokenize(texts, context_length=clip.context_length)  # (T·K, L)
        with torch.no_grad():
            # one template per call: its words before the class name are a prefix the text encoder computes once
            chunks = [chunk for template in tokens.to(device).split(K) for chunk in template.split(TEXT_CHUNK)]
            features = torch.cat([clip.encode_text(chunk, prompts) for chunk in chunks])  # (T·K, E)
            features = features.float().view(len(templates), K, -1)  # (T, K, E)
            if len(templates) > 1:  # ZeroshotCLIP2: mean of the per-template unit vectors (ZeroshotCLIP: one template)
                features = F.normalize(features, dim=-1).mean(0, keepdim=True)  # (1, K, E)
            self.register_buffer("text_features", F.normalize(features[0], dim=-1), persistent=False)  # (K, E)

    def forward_features(self, image_features):
        """image_features: raw clip.encode_image output (B, E) -> logits (B, K)."""
        image_features = F.normalize(image_features.float(), dim=-1)
        return self.clip.logit_scale.exp() * image_features @ self.text_features.t()  # Eq. (1): (B, K)

    def forward(self, images):
        return self.forward_features(self.clip.encode_image(images))
