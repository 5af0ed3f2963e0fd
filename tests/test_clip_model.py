"""Tests of clip_model.py on tiny random CLIPs in OpenAI's formats (CPU, no network): loading both checkpoint formats,
the BPE tokenizer against golden ids from OpenAI's own tokenizer, the prompt-injection point against independent
reference computations written here, bf16 autocast, and one-line CLIPErrors for every kind of bad input."""
import copy
import hashlib
import http.client
import io
import math
import os
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

import clip_model
import clip_weights
from clip_model import CLIPError
from conftest import make_tiny_clip, save_state_dict, save_torchscript

SOT, EOT = 49406, 49407


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: fp16 round trip, independent reference forward passes (manual softmax attention, explicit masks)

def fp16_round_trip(model):
    """A copy of `model` whose floating weights went through fp16 and back, as a saved-and-loaded checkpoint's."""
    model = copy.deepcopy(model)
    model.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    return model


def reference_block(block, x, mask=None):
    """Pre-LN residual block, x: (N, L, D), with attention as an explicit softmax (mask added to the scores)."""
    N, L, D = x.shape
    h = block.attn.heads
    y = F.layer_norm(x, (D,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q, k, v = (y @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).split(D, dim=-1)  # 3 x (N, L, D)
    q, k, v = (t.reshape(N, L, h, D // h).transpose(1, 2) for t in (q, k, v))  # 3 x (N, h, L, D / h)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // h)  # (N, h, L, L)
    if mask is not None:
        scores = scores + mask
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(N, L, D)
    x = x + y @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    y = F.layer_norm(x, (D,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    y = y @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    y = y * torch.sigmoid(1.702 * y)  # QuickGELU
    return x + y @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def overwrite(x, p):
    """x: (N, L, D) with tokens 1..n replaced by p: (n, D) or (N, n, D)."""
    x = x.clone()
    x[:, 1:1 + p.shape[-2]] = p
    return x


def reference_text(clip, text, prompts=None):
    """Text features over all L tokens (no EOT truncation) with an explicit -inf upper-triangular mask.
    prompts[0] replaces the word embeddings after SOS (so they get positions 1..n); prompts[i] replaces the same
    tokens at the input of block i."""
    N, L = text.shape
    x = clip.token_embedding.weight[text]  # (N, L, D)
    if prompts is not None:
        x = overwrite(x, prompts[0])
    x = x + clip.positional_embedding[:L]
    mask = torch.full((L, L), float("-inf")).triu(1)
    for i, block in enumerate(clip.transformer.resblocks):
        if prompts is not None and 0 < i < len(prompts):
            x = overwrite(x, prompts[i])
        x = reference_block(block, x, mask)
    eot = (text == EOT).int().argmax(dim=-1)  # first EOT
    ln = clip.ln_final
    return F.layer_norm(x[torch.arange(N), eot], ln.normalized_shape, ln.weight, ln.bias, ln.eps) @ clip.text_projection


def reference_image(clip, images, prompts=None):
    """ViT features: conv1 -> flatten -> [CLS] + patches -> + pos-emb -> prompts[0] inserted after CLS without
    position -> ln_pre -> blocks (prompts[i] overwrite the prompt tokens at block i) -> ln_post(CLS) @ proj."""
    v = clip.visual
    x = F.conv2d(images, v.conv1.weight, stride=v.conv1.stride)  # (B, D, g, g)
    B, D = x.shape[:2]
    x = x.reshape(B, D, -1).permute(0, 2, 1)  # (B, g * g, D)
    x = torch.cat([v.class_embedding.expand(B, 1, D), x], dim=1) + v.positional_embedding  # (B, 1 + g * g, D)
    if prompts is not None:
        x = torch.cat([x[:, :1], prompts[0].expand(B, *prompts.shape[-2:]), x[:, 1:]], dim=1)  # (B, 1 + n + g * g, D)
    x = F.layer_norm(x, (D,), v.ln_pre.weight, v.ln_pre.bias, v.ln_pre.eps)
    for i, block in enumerate(v.transformer.resblocks):
        if prompts is not None and 0 < i < len(prompts):
            x = overwrite(x, prompts[i])
        x = reference_block(block, x)
    return F.layer_norm(x[:, 0], (D,), v.ln_post.weight, v.ln_post.bias, v.ln_post.eps) @ v.proj


def hyperparameters(clip):
    """Every architecture hyperparameter, read from the built modules (not from the state dict)."""
    v, t = clip.visual, clip.transformer
    text = dict(embed_dim=clip.text_projection.shape[1], context_length=clip.context_length, vocab_size=clip.vocab_size,
                text_width=t.width, text_layers=t.layers, text_heads=t.resblocks[0].attn.heads)
    if isinstance(v, clip_model.VisionTransformer):
        return dict(text, kind="vit", resolution=v.input_resolution, patch=v.conv1.kernel_size,
                    width=v.transformer.width, layers=v.transformer.layers,
                    heads=v.transformer.resblocks[0].attn.heads, output_dim=v.output_dim)
    return dict(text, kind="rn", resolution=v.input_resolution, width=v.layer1[0].conv1.out_channels,
                layers=tuple(len(getattr(v, f"layer{b}")) for b in (1, 2, 3, 4)), heads=v.attnpool.heads,
                output_dim=v.output_dim)


def assert_one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message, message


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: fresh tiny models and checkpoints of this module's own, independent of the session fixtures that other
# test files may change (copies are saved, so the fp32 originals stay untouched whatever the savers do)

@pytest.fixture(scope="module")
def vit():
    return make_tiny_clip("vit")


@pytest.fixture(scope="module")
def rn():
    return make_tiny_clip("rn")


FORMATS = [("vit", "torchscript"), ("vit", "state_dict"), ("rn", "torchscript"), ("rn", "state_dict")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, vit, rn):
    """{(kind, format): path}: each tiny model as an fp16 TorchScript archive (OpenAI's release format) and as an
    fp16 plain state dict."""
    root = tmp_path_factory.mktemp("clip-ckpt")
    paths = {}
    for kind, fmt in FORMATS:
        paths[kind, fmt] = str(root / f"tiny-{kind}-{fmt}.pt")
        save = save_torchscript if fmt == "torchscript" else save_state_dict
        save(copy.deepcopy(original(kind, vit, rn)), paths[kind, fmt])
    return paths


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """{(kind, format): (model, preprocess)} from clip_model.load."""
    return {key: clip_model.load(path, device="cpu") for key, path in checkpoints.items()}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def images_for(clip, batch=2, seed=1):
    res = clip.visual.input_resolution
    return torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(seed))


def original(kind, vit, rn):
    return vit if kind == "vit" else rn


# ----------------------------------------------------------------------------------------------------------------------
# Loading

@pytest.mark.parametrize("kind, fmt", FORMATS)
def test_load_gives_fp32_eval_model_equal_to_the_fp16_round_trip(kind, fmt, loaded, vit, rn):
    model, _ = loaded[kind, fmt]
    reference = fp16_round_trip(original(kind, vit, rn))
    assert not any(m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    expected = reference.state_dict()
    assert list(model.state_dict()) == list(expected)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    images, text = images_for(model), clip_model.tokenize(["a photo of a dog.", "", "two cats on a sofa"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reference.encode_image(images))
        assert torch.equal(model.encode_text(text), reference.encode_text(text))
        assert torch.equal(model(images, text)[0], reference(images, text)[0])


@pytest.mark.parametrize("kind, fmt", FORMATS)
def test_preprocess_is_bicubic_resize_center_crop_normalize_at_input_resolution(kind, fmt, loaded):
    model, preprocess = loaded[kind, fmt]
    res = model.visual.input_resolution
    assert res == {"vit": 32, "rn": 64}[kind]
    resize, crop, *_, to_tensor, normalize = preprocess.transforms
    assert isinstance(resize, T.Resize) and resize.size in (res, [res], (res,))  # an int: the short side
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(crop, T.CenterCrop) and tuple(crop.size) == (res, res)
    assert isinstance(to_tensor, T.ToTensor) and isinstance(normalize, T.Normalize)
    assert tuple(normalize.mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert tuple(normalize.std) == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    # A grayscale res x 2res image, white exactly in the centre square: only a centred crop is all white, and the
    # single channel becomes three normalised ones.
    image = Image.new("L", (2 * res, res), 0)
    image.paste(255, (res // 2, 0, res // 2 + res, res))
    out = preprocess(image)
    mean, std = torch.tensor(normalize.mean), torch.tensor(normalize.std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ((1 - mean) / std).view(3, 1, 1).expand(3, res, res))
    for size in [(5 * res, 3 * res), (res // 3, res // 2), (res + 1, 4 * res)]:  # larger, smaller, tall
        assert preprocess(Image.new("RGBA", size)).shape == (3, res, res)


def test_available_models_and_official_urls():
    names = clip_model.available_models()
    assert "ViT-B/16" in names and "RN50" in names
    assert clip_model._MODELS["RN50"].endswith(
        "/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt")
    assert clip_model._MODELS["ViT-B/16"].endswith(
        "/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")


@pytest.mark.parametrize("kind, fmt", FORMATS)
def test_loaded_state_dict_loads_strictly_into_a_fresh_model_with_openai_key_names(kind, fmt, loaded):
    model, _ = loaded[kind, fmt]
    state_dict = model.state_dict()
    openai_keys = ["transformer.resblocks.1.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.weight",
                   "transformer.resblocks.0.mlp.c_fc.weight", "token_embedding.weight", "ln_final.bias",
                   "text_projection", "logit_scale", "positional_embedding"]
    openai_keys += {"vit": ["visual.class_embedding", "visual.proj", "visual.conv1.weight", "visual.ln_pre.weight",
                            "visual.transformer.resblocks.2.attn.in_proj_bias",
                            "visual.transformer.resblocks.0.ln_2.weight"],
                    "rn": ["visual.layer1.0.downsample.0.weight", "visual.layer4.0.downsample.1.running_var",
                           "visual.attnpool.q_proj.weight", "visual.attnpool.c_proj.bias", "visual.bn3.weight"]}[kind]
    assert set(openai_keys) <= set(state_dict)
    fresh = make_tiny_clip(kind, seed=1)
    assert not torch.equal(fresh.text_projection, model.text_projection)
    result = fresh.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    text = clip_model.tokenize("a photo of a dog.")
    with torch.no_grad():
        assert torch.equal(fresh.encode_text(text), model.encode_text(text))
        assert torch.equal(fresh.encode_image(images_for(model)), model.encode_image(images_for(model)))


@pytest.mark.parametrize("kind, fmt", FORMATS)
def test_loaded_architecture_equals_the_original(kind, fmt, loaded, vit, rn):
    assert hyperparameters(loaded[kind, fmt][0]) == hyperparameters(original(kind, vit, rn))


@pytest.mark.parametrize("args", [
    (16, 48, 2, 128, 16, 20, 500, 128, 2, 3),  # ViT: 3 x 3 patches of 16 px, 2 heads, 3 text layers
    (24, 64, 4, 64, 32, 9, 300, 192, 3, 1),  # ViT: 2 x 2 patches of 32 px
    (16, 64, (2, 1, 3, 1), 8, None, 20, 500, 64, 1, 2),  # ResNet with uneven stages
    (8, 96, (1, 2, 1, 2), 16, None, 12, 400, 128, 2, 1),  # ResNet at 96 px (3 x 3 attention-pool grid)
])
def test_build_model_infers_every_hyperparameter_from_the_state_dict(args):
    torch.manual_seed(0)
    model = clip_model.CLIP(*args).eval()
    state_dict = {k: v.half() for k, v in model.state_dict().items()}
    # keys that OpenAI's TorchScript archives carry besides the weights
    state_dict.update({"input_resolution": torch.tensor(args[1]), "context_length": torch.tensor(args[5]),
                       "vocab_size": torch.tensor(args[6]),
                       "transformer.resblocks.0.attn_mask": torch.zeros(args[5], args[5])})
    built = clip_model.build_model(state_dict)
    assert hyperparameters(built) == hyperparameters(model)
    assert not built.training and {p.dtype for p in built.parameters()} == {torch.float32}
    for name, tensor in fp16_round_trip(model).state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor), name


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer

def ids(text, **kwargs):
    """The ids of one text up to its EOT."""
    row = clip_model.tokenize(text, **kwargs)[0].tolist()
    return row[:row.index(EOT) + 1]


def test_tokenize_known_vectors():
    full = clip_model.tokenize("a photo of a dog.")
    assert full.shape == (1, 77) and full.dtype == torch.long
    assert full[0].tolist() == [SOT, 320, 1125, 539, 320, 1929, 269, EOT] + [0] * 69
    assert ids("a photo of a") == [SOT, 320, 1125, 539, 320, EOT]
    assert ids("X X X X") == [SOT, 343, 343, 343, 343, EOT]
    assert ids("Hello  World!!") == [SOT, 3306, 1002, 748, EOT]
    assert ids("&amp; café") == [SOT, 261, 15304, EOT]
    assert ids("") == [SOT, EOT]


def test_tokenize_accepts_a_str_or_a_list():
    batch = clip_model.tokenize(["a photo of a dog.", "Hello  World!!", ""])
    assert batch.shape == (3, 77) and batch.dtype == torch.long
    assert torch.equal(batch[1], clip_model.tokenize("Hello  World!!")[0])
    assert torch.equal(batch[0], clip_model.tokenize(("a photo of a dog.",))[0])  # any iterable of str
    assert clip_model.tokenize([]).shape == (0, 77)
    assert batch.argmax(dim=-1).tolist() == [7, 4, 1]  # EOT is the highest id: argmax finds it


def test_tokenize_cleans_html_whitespace_and_case():
    clean = clip_model.tokenize("a photo of a dog & a café.")
    for messy in ["  A   PHOTO of\ta\n\ndog &amp; a CAFÉ.  ", "a&nbsp;photo of a dog &amp;amp; a caf&eacute;.",
                  "A\u00a0Photo\u3000of a Dog\r\n&#38; a caf\u00e9.", "a photo of a dog & a cafÃ©.",
                  "a photo of a dog &amp;amp;amp;amp; a café."]:  # OpenAI's gives "&" for this too
        assert torch.equal(clip_model.tokenize(messy), clean), messy


def test_too_long_text_raises_unless_truncated():
    assert ids("a " * 75)[-2:] == [320, EOT] and len(ids("a " * 75)) == 77  # exactly fits: SOT + 75 + EOT
    with pytest.raises(CLIPError, match="truncate") as excinfo:
        clip_model.tokenize(["short", "a " * 76])
    assert_one_line(excinfo)
    tokens = clip_model.tokenize(["short", "a " * 200], truncate=True)
    assert tokens.shape == (2, 77)
    assert tokens[1].tolist() == [SOT] + [320] * 75 + [EOT]
    assert tokens[0].tolist() == clip_model.tokenize("short")[0].tolist()


def test_custom_context_length():
    tokens = clip_model.tokenize(["a photo of a dog.", "a"], context_length=10)
    assert tokens.shape == (2, 10)
    assert tokens[0].tolist() == [SOT, 320, 1125, 539, 320, 1929, 269, EOT, 0, 0]
    with pytest.raises(CLIPError, match="truncate"):
        clip_model.tokenize("a photo of a dog.", context_length=5)
    assert clip_model.tokenize("a photo of a dog.", context_length=5, truncate=True)[0].tolist() == \
        [SOT, 320, 1125, 539, EOT]


# Golden ids produced by OpenAI's own tokenizer (`clip.tokenize(texts, truncate=True)` of the clip-anytorch package, run
# outside this project, which does not depend on it); each list stops at its last nonzero id, zeros pad it to 77.
GOLDEN = [
    ('Café crème brûlée à la française',
     [49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 21259, 1210, 38381, 30505, 49407]),
    ('naïve résumé Ångström Øresund straße',
     [49406, 1097, 35689, 563, 29106, 7054, 4166, 23176, 10352, 807, 7255, 332, 17483, 515, 40735, 1894, 127,
      253, 324, 49407]),
    ('東京タワーの写真',
     [49406, 48338, 21078, 105, 34941, 2429, 107, 13457, 21575, 44653, 33440, 509, 49407]),
    ('사진 속의 강아지',
     [49406, 31061, 105, 38890, 15115, 235, 8276, 502, 45758, 23233, 16279, 478, 49407]),
    ('a photo of a 🐶 dog 🐕\u200d🦺 and a 👍🏽',
     [49406, 320, 1125, 539, 320, 10631, 1929, 2074, 243, 4244, 6040, 374, 537, 320, 43722, 49407]),
    ('&lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;quoted&quot; &#39;x&#39;',
     [49406, 283, 321, 285, 8911, 34308, 321, 285, 261, 257, 27706, 257, 262, 343, 262, 49407]),
    ('<b>dog &amp;amp; cat</b>',  # with a tag, ftfy leaves entities alone: the two html.unescape calls decode them
     [49406, 283, 321, 285, 1929, 261, 2368, 34308, 321, 285, 49407]),
    ('<i>&amp;amp;amp;</i>',
     [49406, 283, 328, 29, 261, 6259, 26, 34308, 328, 285, 49407]),
    ('tab\tseparated\nnew line\r\nwindows\xa0nbsp\u200bzero-width\u3000ideographic',
     [49406, 14724, 22163, 686, 1148, 5437, 6459, 4393, 9844, 5848, 268, 23571, 1909, 78, 4245, 49407]),
    ("I'm sure it's what they've said they'll do, didn't we? You're RIGHT'd",
     [49406, 328, 880, 1650, 585, 568, 768, 889, 1200, 1946, 889, 1342, 818, 267, 2376, 713, 649, 286, 592,
      982, 1155, 1896, 49407]),
    ('3.14159 and 2024-06-01, 1,000,000 items #42 @user',
     [49406, 274, 269, 272, 275, 272, 276, 280, 537, 273, 271, 273, 275, 268, 271, 277, 268, 271, 272, 267,
      272, 267, 271, 271, 271, 267, 271, 271, 271, 6207, 258, 275, 273, 287, 7031, 49407]),
    ('<|startoftext|> literal <|endoftext|> tokens',
     [49406, 49406, 24269, 49407, 23562, 49407]),
    ('mojibake: cafÃ© and â€œquotesâ€\x9d',
     [49406, 617, 3252, 11878, 281, 15304, 537, 257, 5808, 257, 49407]),
    ('Ελληνικά κείμενο and Русский текст and العربية',
     [49406, 138, 113, 138, 119, 138, 119, 138, 115, 138, 121, 138, 117, 138, 118, 138, 361, 138, 118, 138,
      113, 138, 107, 138, 120, 138, 113, 138, 121, 138, 379, 537, 16370, 39729, 23669, 23669, 27152, 29503,
      373, 17875, 22176, 27152, 23669, 141, 480, 537, 12973, 18843, 10948, 16378, 12046, 20915, 49407]),
    ('xxx supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis',
     [49406, 8352, 1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466, 28714, 749, 20253, 9800, 535, 532,
      1065, 901, 1556, 13697, 9916, 78, 39031, 13903, 49407]),
    (" ".join(f"word{i}" for i in range(60)),
     [49406, 2653, 271, 2653, 272, 2653, 273, 2653, 274, 2653, 275, 2653, 276, 2653, 277, 2653, 278, 2653,
      279, 2653, 280, 2653, 272, 271, 2653, 272, 272, 2653, 272, 273, 2653, 272, 274, 2653, 272, 275, 2653,
      272, 276, 2653, 272, 277, 2653, 272, 278, 2653, 272, 279, 2653, 272, 280, 2653, 273, 271, 2653, 273,
      272, 2653, 273, 273, 2653, 273, 274, 2653, 273, 275, 2653, 273, 276, 2653, 273, 277, 2653, 273, 278,
      2653, 49407]),
    ("🙂" * 100, [49406] + [32006] * 75 + [49407]),
]


@pytest.mark.parametrize("text, expected", GOLDEN, ids=range(len(GOLDEN)))
def test_tokenize_matches_openai_golden_ids(text, expected):
    tokens = clip_model.tokenize(text, truncate=True)
    assert tokens[0].tolist() == expected + [0] * (77 - len(expected))


def test_tokenizer_vocabulary():
    tokenizer = clip_model.Tokenizer(clip_model.BPE_PATH)
    assert len(tokenizer.encoder) == 49408 and (tokenizer.sot, tokenizer.eot) == (SOT, EOT)
    assert tokenizer.encode("a photo of a") == [320, 1125, 539, 320]


def test_missing_bpe_file_raises_clip_error(tmp_path):
    with pytest.raises(CLIPError, match="missing") as excinfo:
        clip_model.Tokenizer(bpe_path="/nonexistent")
    assert_one_line(excinfo)
    with pytest.raises(CLIPError):
        clip_model.Tokenizer(bpe_path=str(tmp_path))  # a directory


@pytest.mark.parametrize("damage", ["random", "truncated", "one byte"])
def test_corrupt_bpe_file_raises_clip_error_mentioning_sha256(tmp_path, damage):
    with open(clip_model.BPE_PATH, "rb") as f:
        good = f.read()
    bad = {"random": os.urandom(4096), "truncated": good[:len(good) // 2],
           "one byte": good[:1000] + bytes([good[1000] ^ 1]) + good[1001:]}[damage]
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    path.write_bytes(bad)
    with pytest.raises(CLIPError, match="SHA256") as excinfo:
        clip_model.Tokenizer(bpe_path=str(path))
    assert_one_line(excinfo)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt injection: text

def test_text_prompts_equal_to_word_embeddings_reproduce_the_sentence(vit):
    with torch.no_grad():
        ctx = vit.token_embedding(clip_model.tokenize("a photo of a"))[0, 1:5]  # (n=4, D)
        expected = vit.encode_text(clip_model.tokenize("a photo of a dog."))
        got = vit.encode_text(clip_model.tokenize("X X X X dog."), prompts=ctx[None])  # prompts (depth=1, n, D)
        plain = vit.encode_text(clip_model.tokenize("X X X X dog."))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert (plain - expected).abs().max() > 1e-3  # the prompts did replace the X tokens


def test_per_sequence_text_prompts(vit):
    contexts = ["a photo of a", "a sketch of the"]
    context_tokens = clip_model.tokenize(contexts)
    assert context_tokens.argmax(dim=-1).tolist() == [5, 5]  # 4 tokens each
    with torch.no_grad():
        prompts = vit.token_embedding(context_tokens)[None, :, 1:5]  # (depth=1, N=2, n=4, D)
        got = vit.encode_text(clip_model.tokenize(["X X X X dog.", "X X X X cat."]), prompts=prompts)
        expected = vit.encode_text(clip_model.tokenize(["a photo of a dog.", "a sketch of the cat."]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


TEXTS = ["a photo of a dog.", "", "hi", " ".join(["word"] * 75), "<|startoftext|> two <|endoftext|> eots"]


def test_eot_truncation_equals_the_full_length_masked_computation(vit):
    text = clip_model.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(vit.encode_text(text), reference_text(vit, text), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3), (2, 3), (2, len(TEXTS), 3)], ids=["shallow", "deep", "deep-per-sequence"])
def test_text_prompts_equal_the_reference(vit, shape):
    text = clip_model.tokenize(TEXTS)
    prompts = torch.randn(*shape, vit.transformer.width, generator=torch.Generator().manual_seed(2)) * 0.02
    with torch.no_grad():
        got = vit.encode_text(text, prompts=prompts)
        torch.testing.assert_close(got, reference_text(vit, text, prompts), rtol=1e-5, atol=1e-6)
        assert (got - vit.encode_text(text)).abs().max() > 1e-4


def test_text_prompt_errors_and_empty_prompts(vit):
    text = clip_model.tokenize(["a photo of a dog.", "hi"])
    width = vit.transformer.width
    with torch.no_grad():
        assert torch.equal(vit.encode_text(text, prompts=torch.zeros(1, 0, width)), vit.encode_text(text))
        vit.encode_text(text, prompts=torch.zeros(2, 1, width))  # one prompt set per layer: allowed
        with pytest.raises(CLIPError) as excinfo:
            vit.encode_text(text, prompts=torch.zeros(3, 1, width))  # the text encoder has 2 layers
    assert_one_line(excinfo)


# ----------------------------------------------------------------------------------------------------------------------
# Prompt injection: image

@pytest.mark.parametrize("shape", [None, (1, 3), (1, 2, 3), (3, 2), (3, 2, 2)],
                         ids=["none", "shallow", "shallow-per-image", "deep", "deep-per-image"])
def test_encode_image_equals_the_reference(vit, shape):
    images = images_for(vit)
    prompts = None if shape is None else torch.randn(*shape, vit.visual.transformer.width,
                                                    generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(vit.encode_image(images, prompts), reference_image(vit, images, prompts),
                                   rtol=1e-5, atol=1e-6)


def test_visual_prompts_empty_shallow_and_deep(vit):
    images, width = images_for(vit), vit.visual.transformer.width
    prompts = torch.randn(3, 2, width, generator=torch.Generator().manual_seed(4))  # (depth=3, n=2, D)
    with torch.no_grad():
        plain = vit.encode_image(images)
        assert torch.equal(vit.encode_image(images, torch.zeros(1, 0, width)), plain)
        shallow = vit.encode_image(images, prompts[:1])
        assert (shallow - plain).abs().max() > 1e-3
        deep = vit.encode_image(images, prompts)
        for layer in (1, 2):  # changing only the prompts of block `layer` changes the output
            changed = prompts.clone()
            changed[layer] += torch.randn(changed[layer].shape)  # not a constant shift: LayerNorm would hide it
            assert (vit.encode_image(images, changed) - deep).abs().max() > 1e-4, layer


def test_visual_prompt_errors(vit, rn):
    with torch.no_grad():
        with pytest.raises(CLIPError) as excinfo:
            vit.encode_image(images_for(vit), torch.zeros(4, 1, vit.visual.transformer.width))  # 3 layers
        assert_one_line(excinfo)
        with pytest.raises(CLIPError, match="ViT") as excinfo:
            rn.encode_image(images_for(rn), torch.zeros(1, 1, 64))
        assert_one_line(excinfo)


def test_gradients_reach_prompts_and_no_clip_parameter(vit):
    model = copy.deepcopy(vit).requires_grad_(False)
    text_prompts = (torch.randn(2, 4, model.transformer.width) * 0.02).requires_grad_()  # every text layer
    visual_prompts = (torch.randn(3, 2, model.visual.transformer.width) * 0.02).requires_grad_()  # every ViT layer
    text = clip_model.tokenize(["X X X X dog.", "X X X X cat."])
    loss = model.encode_text(text, text_prompts).square().sum() + model.encode_image(images_for(model),
                                                                                    visual_prompts).square().sum()
    loss.backward()
    for prompts in (text_prompts, visual_prompts):
        assert prompts.grad is not None and torch.isfinite(prompts.grad).all()
        assert all(prompts.grad[layer].abs().sum() > 0 for layer in range(len(prompts)))
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------------
# Autocast

@pytest.mark.parametrize("kind", ["vit", "rn"])
def test_bf16_autocast_runs_close_to_fp32_and_keeps_fp32_weights(kind, vit, rn):
    model = original(kind, vit, rn)
    images, text = images_for(model), clip_model.tokenize(["a photo of a dog.", "hi"])
    visual_prompts = torch.randn(2, 2, model.visual.transformer.width) if kind == "vit" else None
    text_prompts = torch.randn(1, 4, model.transformer.width) * 0.02
    with torch.no_grad():
        fp32 = [model.encode_image(images, visual_prompts), model.encode_text(text),
                model.encode_text(text, text_prompts)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = [model.encode_image(images, visual_prompts), model.encode_text(text),
                    model.encode_text(text, text_prompts)]
    for low, high in zip(bf16, fp32):
        assert low.shape == high.shape and torch.isfinite(low).all()
        assert F.cosine_similarity(low.float(), high, dim=-1).min() > 0.99
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: names, files, options

def test_unknown_model_name_lists_available_models():
    with pytest.raises(CLIPError, match="not found") as excinfo:
        clip_model.load("ViT-B/99", device="cpu")
    assert "ViT-B/16" in str(excinfo.value) and "RN50" in str(excinfo.value)
    assert_one_line(excinfo)


def test_missing_file_raises_clip_error(tmp_path):
    with pytest.raises(CLIPError) as excinfo:
        clip_model.load(str(tmp_path / "nowhere" / "model.pt"), device="cpu")
    assert_one_line(excinfo)


@pytest.mark.parametrize("damage", ["random bytes", "empty", "text file",
                                    "torchscript 1/2", "torchscript -100 bytes",
                                    "state dict 1/2", "state dict -100 bytes"])
def test_corrupt_checkpoint_raises_one_line_clip_error(tmp_path, checkpoints, damage):
    kind, _, cut = damage.partition(" ")
    source = {"torchscript": checkpoints["vit", "torchscript"], "state": checkpoints["rn", "state_dict"]}.get(kind)
    if source is not None:
        with open(source, "rb") as f:
            good = f.read()
        bad = good[:len(good) // 2] if cut.endswith("1/2") else good[:-100]
    else:
        bad = {"random": os.urandom(10_000), "empty": b"", "text": b"not a checkpoint\nat all\n"}[kind]
    path = tmp_path / "model.pt"
    path.write_bytes(bad)
    with pytest.raises(CLIPError) as excinfo:
        clip_model.load(str(path), device="cpu")
    assert_one_line(excinfo)


@pytest.mark.parametrize("drop", ["ln_final.weight", "visual.proj", "transformer.resblocks.1.mlp.c_fc.bias",
                                  "visual.transformer.resblocks.0.attn.out_proj.weight"])
def test_state_dict_missing_a_key_raises_clip_error(tmp_path, vit, drop):
    state_dict = {k: v.half() for k, v in vit.state_dict().items() if k != drop}
    path = tmp_path / "incomplete.pt"
    torch.save(state_dict, path)
    with pytest.raises(CLIPError) as excinfo:
        clip_model.load(str(path), device="cpu")
    assert_one_line(excinfo)


def test_a_file_holding_no_state_dict_raises_clip_error(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CLIPError) as excinfo:
        clip_model.load(str(path), device="cpu")
    assert_one_line(excinfo)


def test_jit_true_raises_clip_error(checkpoints):
    with pytest.raises(CLIPError, match="jit") as excinfo:
        clip_model.load(checkpoints["rn", "state_dict"], device="cpu", jit=True)
    assert_one_line(excinfo)


# ----------------------------------------------------------------------------------------------------------------------
# Download (urllib.request.urlopen replaced: no network)

class FakeUrlopen:
    """Stands in for urllib.request.urlopen: records the URLs, serves `payload` or raises `error`."""

    def __init__(self, payload=b"", error=None):
        self.payload, self.error, self.urls = payload, error, []

    def __call__(self, url, *args, **kwargs):
        self.urls.append(url)
        if self.error is not None:
            raise self.error
        return io.BytesIO(self.payload)


class BrokenStream(io.BytesIO):
    """A response whose connection fails after the first few bytes."""

    def __init__(self, payload, error):
        super().__init__(payload)
        self.error, self.reads = error, 0

    def read(self, size=-1):
        self.reads += 1
        if self.reads > 1:
            raise self.error
        return super().read(10)


def url_for(payload, name="tiny.pt"):
    """A URL of the official shape, .../clip/models/<sha256 of the file>/<file name>."""
    return f"https://example/clip/models/{hashlib.sha256(payload).hexdigest()}/{name}"


def leftovers(root):
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_download_saves_the_verified_file_once(tmp_path, monkeypatch):
    payload = os.urandom(3000)
    fake = FakeUrlopen(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    root = tmp_path / "cache" / "clip"  # created on demand
    path = clip_weights.download(url_for(payload), str(root))
    assert path == str(root / "tiny.pt") and (root / "tiny.pt").read_bytes() == payload
    assert fake.urls == [url_for(payload)] and leftovers(root) == ["tiny.pt"]
    assert clip_weights.download(url_for(payload), str(root)) == path
    assert len(fake.urls) == 1  # the cached, verified file is not downloaded again


def test_download_replaces_a_corrupt_cached_file(tmp_path, monkeypatch):
    payload = os.urandom(3000)
    (tmp_path / "tiny.pt").write_bytes(payload[:1000])
    fake = FakeUrlopen(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    assert clip_weights.download(url_for(payload), str(tmp_path)) == str(tmp_path / "tiny.pt")
    assert len(fake.urls) == 1 and (tmp_path / "tiny.pt").read_bytes() == payload


@pytest.mark.parametrize("served", ["truncated", "wrong", "empty"])
def test_download_of_bad_bytes_raises_and_leaves_no_file(tmp_path, monkeypatch, served):
    payload = os.urandom(3000)
    monkeypatch.setattr(urllib.request, "urlopen",
                        FakeUrlopen({"truncated": payload[:1500], "wrong": os.urandom(3000), "empty": b""}[served]))
    with pytest.raises(CLIPError, match="incomplete or corrupt") as excinfo:
        clip_weights.download(url_for(payload), str(tmp_path))
    assert_one_line(excinfo)
    assert leftovers(tmp_path) == []  # neither tiny.pt nor tiny.pt.part


def test_download_offline_tells_what_to_do(tmp_path, monkeypatch):
    payload = os.urandom(100)
    monkeypatch.setattr(urllib.request, "urlopen", FakeUrlopen(error=OSError("Network is unreachable")))
    with pytest.raises(CLIPError) as excinfo:
        clip_weights.download(url_for(payload), str(tmp_path))
    message = str(excinfo.value)
    assert "Network is unreachable" in message and str(tmp_path / "tiny.pt") in message  # where to copy the file
    assert "path" in message  # or pass a checkpoint path instead of the name
    assert_one_line(excinfo)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [ConnectionResetError("reset by peer"), http.client.IncompleteRead(b"")],
                         ids=["reset", "incomplete-read"])
def test_download_failing_mid_stream_raises_and_leaves_no_part_file(tmp_path, monkeypatch, error):
    payload = os.urandom(3000)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: BrokenStream(payload, error))
    with pytest.raises(CLIPError):
        clip_weights.download(url_for(payload), str(tmp_path))
    assert leftovers(tmp_path) == []


def test_load_official_name_offline_raises_clip_error(tmp_path, monkeypatch):
    fake = FakeUrlopen(error=urllib.error.URLError("[Errno -3] Temporary failure in name resolution"))
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    with pytest.raises(CLIPError, match="RN50") as excinfo:
        clip_model.load("RN50", device="cpu", download_root=str(tmp_path))
    assert fake.urls == [clip_model._MODELS["RN50"]]
    assert_one_line(excinfo)
    assert leftovers(tmp_path) == []


def test_load_by_name_downloads_verifies_and_then_uses_the_cache(tmp_path, monkeypatch, checkpoints, rn):
    with open(checkpoints["rn", "torchscript"], "rb") as f:
        payload = f.read()
    monkeypatch.setitem(clip_model._MODELS, "tiny-RN", url_for(payload, "tiny-RN.pt"))
    fake = FakeUrlopen(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    model, _ = clip_model.load("tiny-RN", device="cpu", download_root=str(tmp_path))
    assert "tiny-RN" in clip_model.available_models() and len(fake.urls) == 1
    fake.error = OSError("offline now")
    again, _ = clip_model.load("tiny-RN", device="cpu", download_root=str(tmp_path))
    assert len(fake.urls) == 1  # served from download_root
    reference, text = fp16_round_trip(rn), clip_model.tokenize("a photo of a dog.")
    with torch.no_grad():
        for loaded_model in (model, again):
            assert torch.equal(loaded_model.encode_image(images_for(rn)), reference.encode_image(images_for(rn)))
            assert torch.equal(loaded_model.encode_text(text), reference.encode_text(text))
