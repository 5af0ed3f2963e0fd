"""ZeroShot, CoOp, CoCoOp, LinearFT and the linear probe on tiny random CLIPs: exactness against zero-shot CLIP, the
token layouts they claim, frozen CLIP, learning on a synthetic task, chunking, random prompts, autocast, bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import clip_model
import zeroshot
from cocoop import CoCoOp
from coop import CoOp
import linear_ft
from linear_ft import LinearFT, fit_linear_probe
from zeroshot import HANDCRAFTED, IMAGENET_TEMPLATES_SELECT, TEMPLATES, ZeroShot

NAMES = ["dog", "golden_retriever", "hot air balloon", "x-ray"]  # 1, 2, 3 and 3 BPE tokens


@pytest.fixture(params=["vit", "rn"])
def clip(request):
    """A private copy of a session fixture: the methods freeze it, training must not touch the shared one."""
    return copy.deepcopy(request.getfixturevalue(f"tiny_{request.param}"))


@pytest.fixture
def vit(tiny_vit):
    return copy.deepcopy(tiny_vit)


def images_for(clip, n=6, seed=0):
    res = clip.visual.input_resolution
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def encode(clip, texts):
    with torch.no_grad():
        return clip.encode_text(clip_model.tokenize(texts))


# ----------------------------------------------------------------------------------------------------------------------
# Exactness at initialisation

def test_coop_from_words_equals_zeroshot(clip):
    images = images_for(clip)
    zs = ZeroShot(clip, NAMES, templates=("a photo of a {}.",))
    coop = CoOp(clip, NAMES, ctx_init="a photo of a")
    assert coop.ctx.shape == (4, 64)  # n_ctx taken from the init's 4 tokens, not the default 16
    with torch.no_grad():
        features = clip.encode_image(images)
        for a, b in [(coop(images), zs(images)), (coop.forward_features(features), zs.forward_features(features))]:
            assert a.shape == (6, 4)
            assert (a - b).abs().max() <= 1e-6


def test_linear_ft_init_equals_zeroshot(clip):
    features = clip.encode_image(images_for(clip)).detach()
    zs = ZeroShot(clip, NAMES, templates=("a photo of a {}, a type of pet.",))
    lft = LinearFT(clip, NAMES, template="a photo of a {}, a type of pet.")
    with torch.no_grad():
        # equal up to one rounding: the weight is renormalised in forward (it is a cosine classifier)
        torch.testing.assert_close(lft.forward_features(features), zs.forward_features(features), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lft(images_for(clip)), zs(images_for(clip)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("position, template", [("end", "a photo of a {}."), ("middle", "a photo {} of a."),
                                                ("front", "{} a photo of a.")])
@pytest.mark.parametrize("csc", [False, True])
def test_class_token_position_builds_the_claimed_sequence(vit, position, template, csc):
    coop = CoOp(vit, NAMES, ctx_init="a_photo_of_a", csc=csc, class_token_position=position)
    expected = encode(vit, [template.format(name.replace("_", " ")) for name in NAMES])
    with torch.no_grad():
        assert (coop.text_features() - expected).abs().max() <= 1e-6


def coop_reference(clip, classnames, ctx, ctx_init, position):
    """CoOp's PromptLearner (trainers/coop.py), class by class as its code does: name_len from the name alone, prefix
    (SOS) and suffix sliced from the embedded "<ctx_init or X..X> name." -> (K, L, D) embeddings and (K, L) tokens."""
    names = [name.replace("_", " ") for name in classnames]
    n_ctx = ctx.shape[-2]
    tokenizer = clip_model.Tokenizer()
    name_lens = [len(tokenizer.encode(name)) for name in names]
    prompt_prefix = ctx_init.replace("_", " ") or " ".join(["X"] * n_ctx)
    tokens = clip_model.tokenize([prompt_prefix + " " + name + "." for name in names])  # (K, L)
    with torch.no_grad():
        embedding = clip.token_embedding(tokens)  # (K, L, D)
    token_prefix, token_suffix = embedding[:, :1], embedding[:, 1 + n_ctx:]
    ctx = ctx.expand(len(names), -1, -1) if ctx.dim() == 2 else ctx  # (K, n_ctx, D)
    prompts = []
    for i, name_len in enumerate(name_lens):
        prefix, suffix, ctx_i = token_prefix[i:i + 1], token_suffix[i:i + 1], ctx[i:i + 1]
        class_i, rest = suffix[:, :name_len], suffix[:, name_len:]
        if position == "end":
            prompts.append(torch.cat([prefix, ctx_i, suffix], dim=1))
        elif position == "middle":
            half = n_ctx // 2
            prompts.append(torch.cat([prefix, ctx_i[:, :half], class_i, ctx_i[:, half:], rest], dim=1))
        else:
            prompts.append(torch.cat([prefix, class_i, ctx_i, rest], dim=1))
    return torch.cat(prompts), tokens


def coop_text_encoder(clip, prompts, tokens):
    """CoOp's TextEncoder: all L positions, the EOT row -> (K, E)."""
    with torch.no_grad():
        x = clip.ln_final(clip.transformer(prompts + clip.positional_embedding))  # (K, L, D)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection


# names whose last character merges with the prompt's "." into one BPE token: ")." and "!."
PUNCTUATED = ["kite (bird of prey)", "cherimoya (custard apple)", "yahoo!", "golden_retriever"]


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
@pytest.mark.parametrize("n_ctx, ctx_init", [(5, ""), (4, "an itap of a")])  # 4 of the init's 5 tokens learned
def test_coop_layout_equals_coops_prompt_learner(vit, position, csc, n_ctx, ctx_init):
    torch.manual_seed(0)
    coop = CoOp(vit, PUNCTUATED, n_ctx=n_ctx, ctx_init=ctx_init, csc=csc, class_token_position=position)
    with torch.no_grad():
        coop.ctx += 0.1 * torch.randn_like(coop.ctx)  # as if trained: distinct from the words they replace
    prompts, tokens = coop_reference(vit, PUNCTUATED, coop.ctx.detach(), ctx_init, position)
    expected = coop_text_encoder(vit, prompts, tokens)
    with torch.no_grad():
        assert ((coop.text_features() - expected).norm(dim=-1) / expected.norm(dim=-1)).max() <= 1e-6
        assert torch.equal(coop.prompt_embeddings(), prompts)
    assert torch.equal(coop.tokenized_prompts, tokens)


def test_coop_learns_the_first_n_ctx_init_tokens(vit):
    """CoOp's reading of a 4-word, 5-token init: n_ctx = 4 learned tokens, the 5th ("a") stays a fixed word."""
    tokens = clip_model.tokenize("an itap of a")  # [SOS, an, it, ap, of, a, EOT]
    coop = CoOp(vit, PUNCTUATED, n_ctx=4, ctx_init="an itap of a")
    with torch.no_grad():
        assert torch.equal(coop.ctx, vit.token_embedding(tokens)[0, 1:5])  # (4, D)
        zs_tokens = clip_model.tokenize([f"an itap of a {name.replace('_', ' ')}." for name in PUNCTUATED])
        assert torch.equal(coop.prompt_embeddings(), vit.token_embedding(zs_tokens))  # token for token
        assert (coop.text_features() - vit.encode_text(zs_tokens)).abs().max() <= 1e-6
    assert CoOp(vit, PUNCTUATED, ctx_init="an itap of a").ctx.shape == (5, 64)  # default: all 5 tokens learned
    assert CoCoOp(vit, PUNCTUATED, ctx_init="an itap of a").ctx.shape == (5, 64)
    assert CoCoOp(vit, PUNCTUATED, n_ctx=4, ctx_init="an itap of a").ctx.shape == (4, 64)  # its default is no sentinel
    cocoop = CoCoOp(vit, PUNCTUATED, n_ctx=3, ctx_init="an itap of a")  # the same reading in CoCoOp
    zs = ZeroShot(vit, PUNCTUATED, templates=("an itap of a {}.",))
    with torch.no_grad():
        assert torch.equal(cocoop.ctx, vit.token_embedding(tokens)[0, 1:4])  # (3, D): "of a" stay fixed words
        for p in cocoop.meta_net.linear2.parameters():
            p.zero_()  # π(x) = 0
        features = vit.encode_image(images_for(vit))
        assert (cocoop.forward_features(features) - zs.forward_features(features)).abs().max() <= 1e-5


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_specific_context_is_per_class(vit, position):
    coop = CoOp(vit, NAMES, n_ctx=6, csc=True, class_token_position=position)
    assert coop.ctx.shape == (4, 6, 64)
    with torch.no_grad():
        before = coop.text_features()
        coop.ctx[1] += torch.randn(6, 64, generator=torch.Generator().manual_seed(0))  # not a constant: LN removes it
        changed = (coop.text_features() - before).abs().amax(dim=1) > 1e-4
    assert changed.tolist() == [False, True, False, False]


def test_random_context_layout(vit):
    torch.manual_seed(3)
    coop = CoOp(vit, NAMES)
    torch.manual_seed(3)
    again = CoOp(vit, NAMES)
    assert torch.equal(coop.ctx, again.ctx)  # drawn from the global RNG, which train.py seeds
    assert coop.ctx.shape == (16, 64) and 0.017 < coop.ctx.std() < 0.023  # N(0, 0.02²)
    assert (coop.tokenized_prompts[:, 1:17] == 343).all()  # "X X ... X {name}." placeholders
    assert CoOp(vit, NAMES, n_ctx=8, csc=True).ctx.shape == (4, 8, 64)


def test_bad_input_raises_one_line_errors(vit):
    with pytest.raises(ValueError, match="end, middle, front") as e:
        CoOp(vit, NAMES, class_token_position="start")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="n_ctx=8 disagrees"):
        CoOp(vit, NAMES, n_ctx=8, ctx_init="a photo of a")
    with pytest.raises(ValueError, match="n_ctx=16 disagrees"):
        CoCoOp(vit, NAMES, n_ctx=16)  # CoCoOp's default init is 4 tokens: pass ctx_init="" for 16 random ones
    assert CoCoOp(vit, NAMES, n_ctx=16, ctx_init="").ctx.shape == (16, 64)
    assert CoOp(vit, NAMES).ctx.shape == (16, 64) and CoCoOp(vit, NAMES, ctx_init="").ctx.shape == (4, 64)
    assert CoOp(vit, NAMES, n_ctx=4, ctx_init="a photo of a").ctx.shape == (4, 64)
    with pytest.raises(ValueError, match="random_prompt"):
        ZeroShot(vit, NAMES, random_prompt="tokens")


# ----------------------------------------------------------------------------------------------------------------------
# Training: only the method's parameters move, and they learn

METHODS = {
    "coop": (lambda c: CoOp(c, ["dog", "cat", "car", "tree"], ctx_init="a photo of a"), {"ctx"}),
    "coop_middle": (lambda c: CoOp(c, ["dog", "cat", "car", "tree"], ctx_init="a photo of a",
                                   class_token_position="middle"), {"ctx"}),
    "coop_csc_front": (lambda c: CoOp(c, ["dog", "cat", "car", "tree"], n_ctx=4, csc=True,
                                      class_token_position="front"), {"ctx"}),
    "cocoop": (lambda c: CoCoOp(c, ["dog", "cat", "car", "tree"]),
               {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                "meta_net.linear2.bias"}),
    "linear_ft": (lambda c: LinearFT(c, ["dog", "cat", "car", "tree"]), {"weight"}),
}


def synthetic_task(n_per_class=8):
    """4 classes of 32 px images whose mean colour depends on the class."""
    g = torch.Generator().manual_seed(0)
    colours = torch.randn(4, 3, 1, 1, generator=g)
    labels = torch.arange(4).repeat(n_per_class)
    return colours[labels] + 0.5 * torch.randn(len(labels), 3, 32, 32, generator=g), labels


@pytest.mark.parametrize("method", METHODS)
def test_only_method_parameters_change(vit, method):
    build, trainable = METHODS[method]
    torch.manual_seed(0)
    model = build(vit)
    clip_before = {k: v.clone() for k, v in vit.state_dict().items()}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    assert {k for k in model.state_dict() if not k.startswith("clip.")} == trainable  # class-name buffers not saved
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    images, labels = synthetic_task(1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    assert all(torch.equal(v, clip_before[k]) for k, v in vit.state_dict().items())
    assert all(p.grad is None for p in vit.parameters())
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", METHODS)
def test_method_learns_a_synthetic_task(vit, method):
    torch.manual_seed(0)
    model = METHODS[method][0](vit)
    images, labels = synthetic_task()
    with torch.no_grad():
        features = vit.encode_image(images)  # the image path is frozen: forward(x) = forward_features(encode_image(x))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model.forward_features(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(images)
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    assert F.cross_entropy(logits, labels).item() < 0.6 * losses[0]
    assert accuracy >= 0.6  # chance is 0.25


# ----------------------------------------------------------------------------------------------------------------------
# CoCoOp: batched over images x classes, chunked

def test_cocoop_chunking_and_per_image_conditioning(vit):
    torch.manual_seed(0)
    model = CoCoOp(vit, NAMES, max_sequences=4096)
    assert [model.meta_net.linear1.in_features, model.meta_net.linear1.out_features,
            model.meta_net.linear2.out_features] == [32, 2, 64]  # E -> E // 16 -> D
    with torch.no_grad():
        features = vit.encode_image(images_for(vit, n=5))
        full = model.forward_features(features)
        for max_sequences in (1, 2 * len(NAMES) + 1):  # one image per chunk; two per chunk with a short last one
            model.max_sequences = max_sequences  # matmuls over fewer rows (prefixes, suffix buckets) round differently
            torch.testing.assert_close(model.forward_features(features), full, rtol=0, atol=1e-5)
        # one image alone: the meta-net's matmul on 1 row rounds differently from 5 rows
        torch.testing.assert_close(model.forward_features(features[3:4]), full[3:4], rtol=0, atol=1e-5)
    assert not torch.allclose(full[0], full[1])


# ----------------------------------------------------------------------------------------------------------------------
# ZeroShot: ensembles, chunking, random prompts, constants

def test_zeroshot_ensemble_and_chunking(vit, monkeypatch):
    templates = IMAGENET_TEMPLATES_SELECT[:3]
    per_template = torch.stack([F.normalize(encode(vit, [t.format(n.replace("_", " ")) for n in NAMES]), dim=-1)
                                for t in templates])  # (T, K, E)
    model = ZeroShot(vit, NAMES, templates=templates)
    torch.testing.assert_close(model.text_features, F.normalize(per_template.mean(0), dim=-1), rtol=0, atol=1e-6)
    monkeypatch.setattr(zeroshot, "TEXT_CHUNK", 3)  # each template's 4 texts in chunks of 3, 1
    torch.testing.assert_close(ZeroShot(vit, NAMES, templates=templates).text_features, model.text_features,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_random_prompts_are_seeded_and_private(vit, kind):
    rng = torch.get_rng_state()
    make = lambda seed: ZeroShot(vit, NAMES, templates=("{}.",), random_prompt=kind, seed=seed).text_features
    first, again, other = make(1), make(1), make(2)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    placeholders = F.normalize(encode(vit, [f"X X X X {n.replace('_', ' ')}." for n in NAMES]), dim=-1)
    assert not torch.allclose(first, placeholders)  # the random tokens / vectors are really in the prompt


def test_random_token_prompt_layout(vit):
    words = torch.randint(0, 49152, (3,), generator=torch.Generator().manual_seed(7))
    tokens = clip_model.tokenize([f"{n.replace('_', ' ')}." for n in NAMES])  # [SOS, class, ., EOT]
    tokens = torch.cat([tokens[:, :1], words.expand(4, 3), tokens[:, 1:-3]], dim=1)  # [SOS, r1..r3, class, ., EOT]
    with torch.no_grad():
        expected = F.normalize(vit.encode_text(tokens), dim=-1)
    model = ZeroShot(vit, NAMES, templates=("{}.",), random_prompt="token", n_random=3, seed=7)
    torch.testing.assert_close(model.text_features, expected, rtol=0, atol=1e-6)


def test_template_constants():
    assert len(TEMPLATES) == 15 and TEMPLATES["dtd"] == "{} texture."
    assert TEMPLATES["eurosat"] == "a centered satellite photo of {}."
    assert TEMPLATES["food101"] == "a photo of {}, a type of food."
    assert TEMPLATES["ucf101"] == "a photo of a person doing {}."
    assert TEMPLATES["imagenet_r"] == TEMPLATES["sun397"] == "a photo of a {}."
    assert all(t.count("{}") == 1 for t in [*TEMPLATES.values(), *IMAGENET_TEMPLATES_SELECT, *HANDCRAFTED.values()])
    assert len(IMAGENET_TEMPLATES_SELECT) == 7 and IMAGENET_TEMPLATES_SELECT[0] == "itap of a {}."
    assert HANDCRAFTED == {"classname": "{}", "basic": "a photo of a {}.", "revised": "this is a photo of a {}.",
                           "negative": "this is not a photo of a {}."}


# ----------------------------------------------------------------------------------------------------------------------
# Linear probe

def separable_features(n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3).repeat(n_per_class)
    return means[labels] + torch.randn(len(labels), 16, generator=g), labels


def lpclip_reference(accuracy_of, steps=8):
    """CoOp lpclip/linear_probe.py's search, transcribed line by line (np.argmax over its list; the binary search in
    log10 C, refitting both ends every round): -> the C it keeps."""
    search_list = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    acc_list = [accuracy_of(c) for c in search_list]
    c_peak = search_list[acc_list.index(max(acc_list))]
    c_left, c_right = 1e-1 * c_peak, 1e1 * c_peak
    for _ in range(steps):
        acc_left, acc_right = accuracy_of(c_left), accuracy_of(c_right)
        if acc_left < acc_right:
            c_final = c_right
            c_left, c_right = 0.5 * (math.log10(c_right) + math.log10(c_left)), math.log10(c_right)
        else:
            c_final = c_left
            c_right, c_left = 0.5 * (math.log10(c_right) + math.log10(c_left)), math.log10(c_left)
        c_left, c_right = 10 ** c_left, 10 ** c_right
    return c_final


@pytest.mark.parametrize("peak", [0.3, -2.71, 5.5, 0.0])
def test_cost_search_is_coops_lpclip_search(peak):
    """A validation accuracy that falls with the distance of log10 C from `peak` (in steps of 1/64, so ties happen):
    the C kept and the C's tried are lpclip's, each fitted once."""
    accuracy_of = lambda c: -round(abs(math.log10(c) - peak) * 64) / 64  # noqa: E731
    calls = []
    cost, accuracy, fit, tried = linear_ft.search_cost(lambda c: calls.append(c) or (accuracy_of(c), ("fit", c)))
    expected = lpclip_reference(accuracy_of)
    assert cost == pytest.approx(expected, rel=1e-9) and accuracy == accuracy_of(expected) and fit == ("fit", calls[
        [round(math.log10(c), 9) for c in calls].index(round(math.log10(cost), 9))])
    assert len(calls) == len({round(math.log10(c), 9) for c in calls}) == len(tried)  # each C fitted once
    assert calls[:7] == list(linear_ft.COSTS) == [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]


def test_linear_probe_searches_c_on_the_validation_split(vit):
    train, val, test = separable_features(20, 1), separable_features(10, 2), separable_features(50, 3)
    probe = fit_linear_probe(vit, *train, *val, max_iter=40)
    assert probe.val_accuracy >= 0.9 and "validation split (30 images)" in probe.cost_search
    assert (probe.forward_features(test[0]).argmax(-1) == test[1]).float().mean() >= 0.9
    assert probe.weight.shape == (3, 16) and probe.bias.shape == (3,)
    x = torch.nn.functional.normalize(train[0], dim=-1)  # the probe is the train-only fit at the C found
    weight, bias = linear_ft.fit_logistic(x, train[1], 3, probe.cost, 40)
    assert torch.equal(probe.weight, weight) and torch.equal(probe.bias, bias)


def test_linear_probe_without_val_holds_out_training_shots(vit):
    (features, labels), empty = separable_features(6, 1), (torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    search = dict(costs=(1e-2, 1.0, 1e2), steps=2)  # a short search: the protocol, not its length, is under test
    probe = fit_linear_probe(vit, features, labels, *empty, max_iter=20, seed=3, **search)
    assert "3 of 6 training shots per class held out" in probe.cost_search and probe.val_accuracy is not None
    kept, held = linear_ft.holdout(labels, 3, torch.Generator().manual_seed(3))
    x = torch.nn.functional.normalize(features, dim=-1)
    cost, accuracy, _, _ = linear_ft.search_cost(linear_ft.validated(x[kept], labels[kept], x[held], labels[held], 3,
                                                                     20), **search)
    assert (probe.cost, probe.val_accuracy) == (cost, accuracy)
    weight, bias = linear_ft.fit_logistic(x, labels, 3, cost, 20)  # refitted on every shot
    assert torch.equal(probe.weight, weight) and torch.equal(probe.bias, bias)
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(18))
    assert torch.bincount(labels[held]).tolist() == [3, 3, 3]
    one = fit_linear_probe(vit, features[:3], labels[:3], *empty, max_iter=20)  # 1 shot: nothing to hold out
    assert one.cost == 1.0 and one.val_accuracy is None and one.cost_search.startswith("not searched")


def test_linear_probe_classifies_images(vit):
    features = vit.encode_image(images_for(vit, n=8)).detach()
    labels = torch.arange(2).repeat(4)
    probe = fit_linear_probe(vit, features, labels, features, labels, costs=(1e-2, 1e4), max_iter=100)
    with torch.no_grad():
        assert torch.equal(probe(images_for(vit, n=8)), probe.forward_features(features))


# ----------------------------------------------------------------------------------------------------------------------
# Mixed precision

@pytest.mark.parametrize("build", [
    lambda c: ZeroShot(c, NAMES), lambda c: CoOp(c, NAMES, class_token_position="middle", csc=True),
    lambda c: CoCoOp(c, NAMES), lambda c: LinearFT(c, NAMES)], ids=["zeroshot", "coop", "cocoop", "linear_ft"])
def test_autocast_bf16_matches_fp32(vit, build):
    torch.manual_seed(0)
    model, images = build(vit), images_for(vit)
    with torch.no_grad():
        reference = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images)
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.15)
    if any(p.requires_grad for p in model.parameters()):
        F.cross_entropy(logits.float(), torch.arange(6) % 4).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
