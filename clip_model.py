"""Minimal CLIP (Radford et al. 2021, arXiv:2103.00020): OpenAI's ViT / ModifiedResNet image encoders, the causal text
Transformer, a hand-written byte-level BPE tokenizer and `load` (OpenAI-format files here; names, the hub and other
layouts through clip_weights.py), with OpenAI's API and key names.
One prompt-injection point serves every method: `encode_image(images, prompts)` and `encode_text(text, prompts)`.

Legend: B images, K classes, N text sequences, L tokens, D width, E embedding dim, n prompt tokens, depth prompted layers.
"""
import gzip
import hashlib
import html
import os
import pickle
import zipfile
from collections import OrderedDict

import ftfy
import regex as re
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torchvision import transforms as T


class CLIPError(RuntimeError):
    """A one-line, user-facing error: unknown model, missing or corrupt file, impossible option."""


class TextTooLong(CLIPError):
    """tokenize() got a text of n_tokens > context_length tokens (callers can name the option or class behind it)."""

    def __init__(self, text, n_tokens, context_length):
        super().__init__(f"text is {n_tokens} tokens, longer than the context length {context_length}: "
                         f"shorten it or pass truncate=True ({text[:40]!r}...)")
        self.text, self.n_tokens, self.context_length = text, n_tokens, context_length


def one_line(e):
    """'ExceptionType: its message on one line' (cut at 200 characters), for CLIPError messages."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE over 49,152 merges-derived tokens + <|startoftext|> 49406 and <|endoftext|> 49407

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
TOKEN_PATTERN = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                           re.IGNORECASE)


def bytes_to_unicode():
    """Map every byte to a printable unicode character (printable bytes map to themselves) so BPE never sees raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return dict(zip(printable + others, map(chr, printable + [256 + i for i in range(len(others))])))


def clean_text(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()  # fix mojibake, decode HTML entities (twice)
    return re.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    def __init__(self, bpe_path=BPE_PATH):
        if not os.path.isfile(bpe_path):
            raise CLIPError(f"BPE vocabulary {bpe_path} is missing: restore bpe_simple_vocab_16e6.txt.gz from this repository")
        with open(bpe_path, "rb") as f:
            raw = f.read()
        if hashlib.sha256(raw).hexdigest() != BPE_SHA256:
            raise CLIPError(f"BPE vocabulary {bpe_path} is corrupt (SHA256 mismatch): restore it from this repository")
        merges = [tuple(line.split()) for line in gzip.decompress(raw).decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        chars = list(self.byte_encoder.values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}  # 49,408 entries
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """Merge the lowest-ranked adjacent pair until none is in the merge table; the last symbol carries </w>."""
        if token not in self.cache:
            word = [*token[:-1], token[-1] + "</w>"]
            while len(word) > 1:
                first, second = min(zip(word, word[1:]), key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
                if (first, second) not in self.bpe_ranks:
                    break
                merged, i = [], 0
                while i < len(word):
                    if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                        merged.append(first + second)
                        i += 2
                    else:
                        merged.append(word[i])
                        i += 1
                word = merged
            self.cache[token] = word
        return self.cache[token]

    def encode(self, text):
        ids = []
        for token in TOKEN_PATTERN.findall(clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token))
        return ids


_tokenizer = None


def tokenize(texts, context_length=77, truncate=False):
    """str or list of str -> (N, context_length) LongTensor: [SOS] ids [EOT] 0 ... (EOT has the highest id)."""
    global _tokenizer
    if isinstance(texts, (bytes, bytearray)):
        raise CLIPError(f"tokenize() takes a str or a list of str, not {type(texts).__name__}: decode it first")
    try:
        texts = [texts] if isinstance(texts, str) else list(texts)
    except TypeError:
        raise CLIPError(f"tokenize() takes a str or a list of str, not {type(texts).__name__}") from None
    wrong = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if wrong is not None:
        raise CLIPError(f"tokenize() takes a str or a list of str: item {wrong} is a {type(texts[wrong]).__name__}")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise CLIPError(f"context_length must be an int of at least 2, room for [SOS] and [EOT] "
                        f"(got {context_length!r})")
    _tokenizer = _tokenizer or Tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [_tokenizer.sot] + _tokenizer.encode(text) + [_tokenizer.eot]
        if len(ids) > context_length:
            if not truncate:
                raise TextTooLong(text, len(ids), context_length)
            ids = ids[:context_length - 1] + [_tokenizer.eot]
        result[i, :len(ids)] = torch.tensor(ids)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (safe under fp16/bf16 autocast)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, computed by fused SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * width ** -0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal, prefix=None, rows=None):
        """x: (N, L, D) -> (N, L, D). prefix: keys and values 2 x (N, heads, P, D / heads) of P positions before x's
        (see Transformer.forward_prefixed), which x's tokens attend to as well; causal only. rows: (N,) the one token
        per sequence whose output alone is computed -> (N, 1, D)."""
        N, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(N, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (N, heads, L, D / heads)
        P = 0 if prefix is None else prefix[0].shape[2]
        if prefix is not None:  # query i of x sits at position P + i: it sees keys 0..P + i
            k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)  # (N, heads, P + L, D / heads)
        if rows is not None:  # only the token read queries: (N, heads, 1, D / heads)
            q = q[torch.arange(N, device=q.device), :, rows][:, :, None]
            mask = (torch.arange(P + L, device=q.device) <= P + rows[:, None])[:, None, None] if causal else None
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask: (N, 1, 1, P + L)
        elif prefix is None:
            x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (N, heads, L, D / heads)
        else:  # the causal mask aligned to the bottom right
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, P + L))
        return self.out_proj(x.transpose(1, 2).reshape(N, -1, D))  # (N, L or 1, D)

    def keys_values(self, x):
        """x: (G, P, D) -> its keys and values 2 x (G, heads, P, D / heads), as forward computes them."""
        G, P, D = x.shape
        kv = F.linear(x, self.in_proj_weight[D:], self.in_proj_bias[D:]).view(G, P, 2, self.heads, D // self.heads)
        return kv.permute(2, 0, 3, 1, 4)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = LayerNorm(width)

    def forward(self, x, causal=False, prefix=None, rows=None):
        """prefix, rows: see Attention.forward; with rows -> (N, 1, D), only those tokens' outputs."""
        h = self.attn(self.ln_1(x), causal, prefix, rows)
        x = x + h if rows is None else x[torch.arange(x.shape[0], device=x.device), rows][:, None] + h
        return x + self.mlp(self.ln_2(x))


def insert_prompts(x, prompts, replace):
    """Put n prompt tokens right after the first token (SOS or CLS) of every sequence.
    x: (N, L, D); prompts: (n, D), shared, or (N, n, D), one set per sequence.
    replace=False inserts them -> (N, 1 + n + L - 1, D); replace=True overwrites tokens 1..n -> (N, L, D)."""
    N, n = x.shape[0], prompts.shape[-2]
    rest = x[:, 1 + n:] if replace else x[:, 1:]
    return torch.cat([x[:, :1], prompts.to(x.dtype).expand(N, n, x.shape[-1]), rest], dim=1)


def context_from_words(clip, ctx_init, n_ctx=None):
    """CoOp's init from words ('_' -> space): the embeddings (n_ctx, D) of the init's first n_ctx BPE tokens. n_ctx=None
    takes all n of them; a smaller n_ctx leaves the rest as fixed words in the prompt (CoOp's n_ctx = word count)."""
    tokens = tokenize(ctx_init.replace("_", " ")).to(clip.logit_scale.device)  # (1, L)
    n = int(tokens.argmax()) - 1
    n_ctx = n if n_ctx is None else n_ctx
    if not 1 <= n_ctx <= n:
        raise ValueError(f"n_ctx={n_ctx} disagrees with ctx_init {ctx_init!r} ({n} tokens): pass n_ctx={n} (or fewer, "
                         "to keep the rest as fixed words), or ctx_init='' for a random context")
    with torch.no_grad():
        return clip.token_embedding(tokens)[0, 1:1 + n_ctx].float().clone()  # (n_ctx, D)


def bucket_bounds(lengths, max_buckets=3):
    """Sequence lengths -> at most max_buckets bucket upper bounds, chosen (dynamic programming over the distinct
    lengths) to minimise the padded token count: the sum over buckets of (sequences in it) x (its bound)."""
    values = sorted(set(lengths))
    counts = [lengths.count(v) for v in values]
    best = [(0, [])] + [None] * len(values)  # best[j]: (padded tokens, bounds) for values[:j] in the buckets so far
    for _ in range(max_buckets):
        best = [best[0]] + [min([best[j]] * (best[j] is not None) + [
            (best[i][0] + sum(counts[i:j]) * values[j - 1], best[i][1] + [values[j - 1]])
            for i in range(j) if best[i] is not None]) for j in range(1, len(values) + 1)]
    return best[-1][1]


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, deep_prompts=(), rows=None):
        """The plain path. x: (N, L, D) -> (N, L, D). deep_prompts[i - 1] ((n, D) or (N, n, D)) replaces tokens 1..n
        at the input of block i: the outputs of the previous layer's prompts are discarded (VPT-deep's layer-wise V^i).
        rows: (N,) the one token per sequence that is read (the ViT's CLS) -> (N, D): the last block computes the other
        tokens' keys and values only, not their outputs."""
        if len(deep_prompts) >= self.layers:
            raise CLIPError(f"{len(deep_prompts) + 1} prompt layers given, but the encoder has only {self.layers}")
        for i, block in enumerate(self.resblocks):
            if 0 < i <= len(deep_prompts):
                x = insert_prompts(x, deep_prompts[i - 1], replace=True)
            x = block(x, self.causal, rows=rows if i == self.layers - 1 else None)
        return x if rows is None else x[:, 0]

    def forward_prefixed(self, prefix, suffix, group, rows, deep_prompts=()):
        """The prefix path, for the causal text encoder: the same (N, D) as
        forward(torch.cat([prefix[group], suffix], 1), deep_prompts, rows + P) (per-prefix deep prompts taken per
        sequence likewise), with less work.
        prefix: (G, P, D) the first P positions, G distinct ones; group: (N,) the one sequence i starts with;
        suffix: (N, S, D) the rest; rows: (N,) the position in suffix of the one token read (the EOT);
        deep_prompts: (n, D) or (G, n, D) per deep layer, inside the prefix (1 + n <= P).

        Why it is exact: with causal attention, position i's hidden state in every layer depends on positions <= i
        only, so a prefix has the same hidden states in every sequence that starts with it. They are computed once
        per prefix (G sequences of P tokens, not N), and each suffix token attends to its prefix's keys and values
        and to its own causal past: the same softmax over the same keys as in the plain path; only float rounding
        differs. The gradient of a prefix is the sum over its sequences, as autograd adds it up.
        Suffixes run in a few buckets of similar lengths (bucket_bounds), each cut at its longest: a shorter one's
        padding comes after its EOT, which never attends to it. In the last block only the EOT computes an output."""
        if len(deep_prompts) >= self.layers:
            raise CLIPError(f"{len(deep_prompts) + 1} prompt layers given, but the encoder has only {self.layers}")
        prefix_kv = []  # each block's keys and values at the prefix positions: 2 x (G, heads, P, D / heads)
        for i, block in enumerate(self.resblocks):
            if 0 < i <= len(deep_prompts):
                prefix = insert_prompts(prefix, deep_prompts[i - 1], replace=True)
            prefix_kv.append(block.attn.keys_values(block.ln_1(prefix)))
            if i < self.layers - 1:  # the last block reads the prefix's keys and values, never its outputs
                prefix = block(prefix, causal=True)
        lengths = (rows + 1).tolist()
        outputs, order, low = [], [], 0
        for high in bucket_bounds(lengths):
            index = torch.tensor([i for i, n in enumerate(lengths) if low < n <= high], device=suffix.device)
            x = suffix[index, :high]  # (N_b, high, D)
            for i, (block, (k, v)) in enumerate(zip(self.resblocks, prefix_kv)):
                # one prefix: a broadcast view, whose gradient is a sum; several: each sequence's copy
                kv = [t.expand(len(index), -1, -1, -1) if len(t) == 1 else t[group[index]] for t in (k, v)]
                x = block(x, True, kv, rows[index] if i == self.layers - 1 else None)
            outputs.append(x[:, 0])  # (N_b, D): the EOTs
            order.append(index)
            low = high
        return torch.cat(outputs)[torch.cat(order).argsort()]  # (N, D) in the input order


# ----------------------------------------------------------------------------------------------------------------------
# Image encoders

class Bottleneck(nn.Module):
    """ResNet bottleneck; stride > 1 is an anti-aliasing avgpool before conv3 and in the downsample branch."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(planes), nn.ReLU()
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3, self.relu3 = nn.BatchNorm2d(planes * 4), nn.ReLU()
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)), ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean token (with position) queries all spatial tokens, then c_proj."""

    def __init__(self, spacial_dim, embed_dim, heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x):
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + HW, C)
        split = lambda t: t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)  # (B, heads, *, C / heads)
        out = F.scaled_dot_product_attention(split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(out.transpose(1, 2).reshape(B, C))  # (B, E)


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, anti-aliased strides and attention pooling (CLIP RN50, RN101, RN50x4, ...)."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, width // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU()
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(width // 2), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        return nn.Sequential(*layers, *[Bottleneck(self._inplanes, planes) for _ in range(1, blocks)])

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))  # (B, width, H / 4, W / 4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 * width, H / 32, W / 32)
        return self.attnpool(x)


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x, prompts=None, after_ln_pre=False):
        """prompts: None or (depth, n, D) / (depth, B, n, D). prompts[0] is inserted between CLS and the
        patches before ln_pre (after it with after_ln_pre=True, as the UPT release's VPT-deep), with no positional
        embedding; prompts[i] replaces them at the input of block i."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D): N = (H / patch) * (W / patch)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + N, D)
        read = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # (B,): CLS, the only token read
        if prompts is None:  # UPT Eq. (3): [c, Z] through the layers
            x = self.transformer(self.ln_pre(x), rows=read)
        elif after_ln_pre:
            x = self.transformer(insert_prompts(self.ln_pre(x), prompts[0], replace=False), prompts[1:], read)
        else:  # Eq. (4): [c, V, Z] through the layers
            x = self.transformer(self.ln_pre(insert_prompts(x, prompts[0], replace=False)), prompts[1:], read)
        return self.ln_post(x) @ self.proj  # (B, E)


# ----------------------------------------------------------------------------------------------------------------------
# CLIP

class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_resolution, vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, transformer_width) * 0.01)
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.randn(transformer_width, embed_dim) * transformer_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    @property
    def dtype(self):
        return self.token_embedding.weight.dtype

    def encode_image(self, image, prompts=None, after_ln_pre=False):
        """image: (B, 3, H, W) -> (B, E). prompts: visual prompts for a ViT, see VisionTransformer.forward."""
        if prompts is None:
            return self.visual(image)
        if not isinstance(self.visual, VisionTransformer):
            raise CLIPError("visual prompts need a ViT image encoder (e.g. ViT-B/16); this model's is a ResNet")
        return self.visual(image, prompts, after_ln_pre)

    def encode_text(self, text, prompts=None):
        """text: (N, L) token ids -> (N, E). prompts: None, or learned embeddings that replace the n tokens after SOS
        at the input of the first `depth` layers: (depth, n, D) shared by all texts, or (depth, G, n, D), one set per
        run of N / G consecutive texts (G = N: one per text; CoCoOp: one per image). At layer 0 they replace word
        embeddings and get positions 1..n, as CoOp's context (Eq. (2)); deeper ones replace the previous layer's outputs.
        The leading positions that all texts of a run have in common (the same token ids, prompts shared by the run)
        go through the text encoder once per run (see encode_token_embeddings)."""
        N, L = text.shape
        x = self.token_embedding(text)  # (N, L, D)
        groups, n, deep = 1, 0, ()
        if prompts is not None:
            groups, n = (1 if prompts.dim() == 3 else prompts.shape[1]), prompts.shape[-2]
            if N % groups:
                raise CLIPError(f"{groups} prompt sets for {N} texts: give one set, one per text, or one per run of "
                                "consecutive texts (N a multiple of the sets)")
            first = prompts[0] if prompts.dim() == 3 else prompts[0].repeat_interleave(N // groups, dim=0)
            x, deep = insert_prompts(x, first, replace=True), prompts[1:]  # x: (N, L, D)
        per_text = groups == N > 1  # prompts differ from text to text: only what comes before them is shared, by all
        groups = 1 if per_text else groups
        runs = text.view(groups, N // groups, L)  # (G, N / G, L)
        same = (runs == runs[:, :1]).all(dim=1).all(dim=0)  # (L,): the same token in every text of a run
        same[1:1 + n] = not per_text  # prompt positions
        eot = text.argmax(dim=-1)  # (N,)
        shared = min(int(same.int().cumprod(0).sum()), int(eot.min()))  # every text keeps its EOT after the prefix
        if len(deep) and shared < 1 + n:  # per-text deep prompts are not in a prefix: plain path
            shared = 0
        return self.encode_token_embeddings(x, eot, deep, shared, groups)

    share_prefix = True  # False sends every text through the plain path (tests and bench.py compare the two)

    def encode_token_embeddings(self, x, eot, deep_prompts=(), shared=0, groups=1):
        """x: (N, L, D) token embeddings (e.g. CoOp's [SOS, ctx, class, '.', EOT]); eot: (N,) EOT positions -> (N, E).
        With a causal mask nothing after the last EOT reaches an EOT feature, so the sequence is cut there.
        shared=0: the plain path, every sequence whole through Transformer.forward (the reference). shared=P > 0: the
        first P positions are the same in every sequence of each of `groups` runs of N / groups consecutive ones, by
        construction (same tokens, shared prompts; not by value, which would route a gradient to one copy): the prefix
        path, Transformer.forward_prefixed, computes them once per run. deep_prompts: as Transformer.forward's, with
        (G, n, D) per run on the prefix path."""
        L = int(eot.max()) + 1
        x = x[:, :L] + self.positional_embedding[:L].to(x.dtype)  # (N, L, D)
        if shared and self.share_prefix:
            prefix = x.unflatten(0, (groups, -1))[:, 0, :shared]  # (G, P, D): the first sequence of each run
            group = torch.arange(x.shape[0], device=x.device) // (x.shape[0] // groups)  # (N,)
            x = self.transformer.forward_prefixed(prefix, x[:, shared:], group, eot - shared, deep_prompts)  # (N, D)
        else:
            deep_prompts = [p.repeat_interleave(x.shape[0] // p.shape[0], dim=0) if p.dim() == 3 else p
                            for p in deep_prompts]  # (n, D) or (N, n, D)
            x = self.transformer(x, deep_prompts)  # (N, L, D)
            x = x[torch.arange(x.shape[0], device=x.device), eot]  # (N, D): the EOT token
        return self.ln_final(x) @ self.text_projection  # (N, E)

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (B, N)
        return logits_per_image, logits_per_image.t()


def build_model(state_dict, quick_gelu=True):
    """Infer every hyperparameter from the state dict's shapes (as OpenAI's build_model) -> fp32 CLIP in eval mode.
    quick_gelu=False: exact GELU in every MLP, for weights trained so (LAION, DataComp; the keys are the same)."""
    if not isinstance(state_dict, dict):
        raise CLIPError(f"not a CLIP state dict (a {type(state_dict).__name__}, not a dict of name -> tensor)")
    odd = next((k for k in state_dict if not isinstance(k, str)), None)
    if odd is not None:
        raise CLIPError(f"not a CLIP state dict (key {odd!r} is a {type(odd).__name__}, not a str)")
    sd = {k: v for k, v in state_dict.items()
          if k not in ("input_resolution", "context_length", "vocab_size") and not k.endswith("attn_mask")}
    odd = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CLIPError(f"not a CLIP state dict ({odd} is a {type(sd[odd]).__name__}, not a tensor)")
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    try:
        if "visual.proj" in sd:  # ViT
            vision_width, vision_patch_size = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
            vision_layers = count("visual.transformer.resblocks.")
            image_resolution = vision_patch_size * round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        else:  # ModifiedResNet
            vision_layers = tuple(count(f"visual.layer{b}.") for b in (1, 2, 3, 4))
            vision_width, vision_patch_size = sd["visual.layer1.0.conv1.weight"].shape[0], None
            image_resolution = 32 * round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        with torch.device("meta"):  # no random init of weights about to be replaced (most of a load's time)
            model = CLIP(embed_dim=sd["text_projection"].shape[1], image_resolution=image_resolution,
                         vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=vision_patch_size,
                         context_length=sd["positional_embedding"].shape[0],
                         vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=sd["ln_final.weight"].shape[0],
                         transformer_heads=sd["ln_final.weight"].shape[0] // 64,
                         transformer_layers=count("transformer.resblocks."))
        own = model.state_dict()  # meta tensors with the dtype each entry takes: fp32, int64 BatchNorm counters
        model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}, assign=True)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:  # a missing entry, a wrong shape
        raise CLIPError(f"not a CLIP state dict ({one_line(e)})") from None
    for block in [] if quick_gelu else model.modules():
        if isinstance(block, ResidualAttentionBlock):
            block.mlp.gelu = nn.GELU()
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Loading: OpenAI's names and preprocessing, and its checkpoint formats (TorchScript archives, state dicts) read here;
# everything else about where weights come from is in clip_weights.py

_MODELS = {name: f"https://openaipublic.azureedge.net/clip/models/{sha}/{file}" for name, sha, file in [
    ("RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt"),
    ("RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt"),
    ("RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt"),
    ("RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt"),
    ("RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt"),
    ("ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    ("ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    ("ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    ("ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt")]}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def available_models():
    return list(_MODELS)


def _to_rgb(image):
    return image.convert("RGB")


def image_transform(n_px):
    """CLIP's test preprocessing: bicubic resize of the short side, center crop, RGB, [0, 1], CLIP mean/std."""
    return T.Compose([T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n_px), _to_rgb,
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


class _ScriptObject:
    """Stands in for a TorchScript module while unpickling its archive: holds attributes, runs no code."""


_STORAGE_DTYPES = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return storage.as_strided(size, stride, offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads the tensors of a TorchScript archive (OpenAI's .pt files) without torch.jit and without running code."""

    def __init__(self, archive, prefix):
        super().__init__(archive.open(f"{prefix}/data.pkl"))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")]:
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda tensor, *unused: tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle":  # build_intlist, restore_type_tag, ...: plain containers
            return lambda value, *unused: value
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")

    def persistent_load(self, pid):  # ('storage', dtype, key, location, numel)
        _, dtype, key, _, _ = pid
        return torch.frombuffer(bytearray(self.archive.read(f"{self.prefix}/data/{key}")), dtype=dtype)


def _tensors(obj, prefix=""):
    """Flatten a tree of unpickled TorchScript modules into {dotted.name: tensor}."""
    out = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            out.update(_tensors(value, f"{prefix}{name}."))
    return out


def read_state_dict(path):
    """A TorchScript archive (OpenAI's release format) or a plain torch.save'd state dict -> {name: tensor}."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if any(name.endswith("/constants.pkl") for name in names):  # TorchScript, not torch.save
                    prefix = names[0].split("/")[0]
                    return _tensors(_ArchiveUnpickler(archive, prefix).load())
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways; all mean the same to the user
        raise CLIPError(f"{path} is not a readable CLIP checkpoint ({one_line(e)}): delete it and download it again") \
            from None
    if not isinstance(state_dict, dict):
        raise CLIPError(f"{path} holds a {type(state_dict).__name__}, not a CLIP state dict")
    return state_dict


def load(name, device=None, jit=False, download_root=None):
    """OpenAI model name (see available_models()), hf-hub:ORG/NAME, a folder or a checkpoint file -> (fp32 CLIP in eval
    mode, preprocess). Names, the hub, folders, safetensors and open_clip / transformers layouts are clip_weights.py's,
    imported here only: without it, this file alone loads OpenAI-format files (QuickGELU, as OpenAI's load)."""
    if jit:
        raise CLIPError("jit=True is not supported: this CLIP is plain PyTorch (use jit=False)")
    try:
        import clip_weights
    except ModuleNotFoundError as e:
        if e.name != "clip_weights":  # clip_weights.py is there, but something it imports is not
            raise
        if not os.path.isfile(name):
            raise CLIPError(f"model {name!r}: names, hf-hub: and folders need clip_weights.py beside clip_model.py; "
                            f"or pass the path of an OpenAI checkpoint file") from None
        path, state_dict, quick_gelu = name, read_state_dict(name), True
    else:
        weights = clip_weights.find(name, download_root)
        path, state_dict, quick_gelu = weights.path, clip_weights.read(weights), weights.quick_gelu
        print(f"CLIP weights: {weights.source} (SHA256 {weights.sha256[:12]}...), {weights.why}")
    try:
        model = build_model(state_dict, quick_gelu)
    except CLIPError as e:
        raise CLIPError(f"{path}: {e}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), image_transform(model.visual.input_resolution)
