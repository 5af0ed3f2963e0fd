"""The text encoder's prefix path (Transformer.forward_prefixed) against the plain path (Transformer.forward on whole
sequences), features and gradients, in every method that shares a prefix; the last layer's read-only rows (EOT, CLS);
the buckets of suffix lengths."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import clip_model
from cocoop import CoCoOp
from coop import CoOp
from linear_ft import LinearFT
from upt import UPT
from zeroshot import IMAGENET_TEMPLATES_SELECT, ZeroShot

# very different lengths (1 to 12 BPE tokens), shared first words ("golden"), last tokens merged with "." (")." "!.")
NAMES = ["dog", "golden retriever", "golden eagle", "yahoo!", "kite (bird of prey)",
         "a very long class name with many words in it", "x-ray", "cat"]


@pytest.fixture
def clip():
    """Text width 128 with 2 heads and 3 layers (multi-head attention, deep prompts); ViT 3 layers."""
    torch.manual_seed(0)
    return clip_model.CLIP(32, 32, 3, 64, 8, 77, 49408, 128, 2, 3).eval()


@pytest.fixture
def prefixes(monkeypatch):
    """Records the prefix shape (G, P) of every prefix-path call."""
    calls, forward_prefixed = [], clip_model.Transformer.forward_prefixed

    def spy(self, prefix, *args, **kwargs):
        calls.append(tuple(prefix.shape[:2]))
        return forward_prefixed(self, prefix, *args, **kwargs)
    monkeypatch.setattr(clip_model.Transformer, "forward_prefixed", spy)
    return calls


def both_paths(clip, run, params):
    """run() -> a tensor; on the prefix path and on the plain path -> [(output, gradients of params)] x 2, the
    gradients of sum(output * a fixed random tensor)."""
    results = []
    for share in (True, False):
        clip.share_prefix = share
        for p in params:
            p.grad = None
        out = run()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        if params:
            (out * weights).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in params]))
    clip.share_prefix = True
    return results


def assert_same(results):
    (out, grads), (ref_out, ref_grads) = results
    scale = ref_out.abs().max()
    torch.testing.assert_close(out / scale, ref_out / scale, rtol=0, atol=1e-5)
    for g, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(g / ref.abs().max(), ref / ref.abs().max(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Methods: features and gradients equal on both paths, and the prefix the method shares

@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
@pytest.mark.parametrize("n_ctx, ctx_init", [(16, ""), (4, "an itap of a")])  # 4 of the init's 5 tokens learned
def test_coop_prefix_path_equals_plain(clip, prefixes, position, csc, n_ctx, ctx_init):
    torch.manual_seed(0)
    coop = CoOp(clip, NAMES, n_ctx=n_ctx, ctx_init=ctx_init, csc=csc, class_token_position=position)
    with torch.no_grad():
        coop.ctx += 0.1 * torch.randn_like(coop.ctx)  # CSC from words: the copies differ, as after training
    assert_same(both_paths(clip, coop.text_features, [coop.ctx]))
    # shared: end [SOS, ctx, fixed words], middle [SOS, ctx[:m/2]], front [SOS]; CSC: [SOS]
    words = 1 if ctx_init else 0  # "an itap of a" with n_ctx=4 keeps "a" as a fixed word
    expected = {"end": 1 + n_ctx + words, "middle": 1 + n_ctx // 2, "front": 1}[position] if not csc else 1
    assert prefixes[0] == (1, expected)


@pytest.mark.parametrize("ctx_init", ["a photo of a", ""])
def test_cocoop_prefix_per_image_equals_plain(clip, prefixes, ctx_init):
    torch.manual_seed(0)
    model = CoCoOp(clip, NAMES, ctx_init=ctx_init, max_sequences=3 * len(NAMES))  # 3 images per text-encoder call
    features = clip.encode_image(torch.randn(4, 3, 32, 32)).detach()  # chunks of 3 and 1 images
    params = [model.ctx, model.meta_net.linear2.bias]  # π(x)'s bias: the sum of the per-image gradients
    assert_same(both_paths(clip, lambda: model.forward_features(features), params))
    assert prefixes[:2] == [(3, 5), (1, 5)]  # one prefix [SOS, ctx + π(x)] per image


@pytest.mark.parametrize("depth, variant", [(1, "attention"), (2, "attention"), (3, "shared"), (1, "joint")])
def test_upt_prefix_path_equals_plain(clip, prefixes, depth, variant):
    torch.manual_seed(0)
    model = UPT(clip, NAMES, depth=depth, variant=variant).eval()
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith(("proj.", "visual_prompts"))]  # all that reach the text
    assert_same(both_paths(clip, lambda: model.prepare()[1], params))
    assert prefixes[0] == (1, 5)  # [SOS, Û_t]: deep prompts replace shared positions, which stay shared


def test_zeroshot_and_classifier_init_share_the_template(clip, prefixes):
    templates = IMAGENET_TEMPLATES_SELECT[:3]  # "itap of a {}.", "a bad photo of the {}.", "a origami {}."
    results = both_paths(clip, lambda: ZeroShot(clip, NAMES, templates=templates).text_features, [])
    assert_same(results)
    assert prefixes[:3] == [(1, 5), (1, 6), (1, 3)]  # one template per call: its tokens before the class
    prefixes.clear()
    assert_same(both_paths(clip, lambda: LinearFT(clip, NAMES).weight.detach(), []))
    assert prefixes[0] == (1, 5)  # [SOS, a, photo, of, a]


@pytest.mark.parametrize("kind", ["token", "embedding"])
def test_random_prompts_share_their_prefix(clip, prefixes, kind):
    make = lambda: ZeroShot(clip, NAMES, templates=("{}.",), random_prompt=kind, n_random=4).text_features
    assert_same(both_paths(clip, make, []))
    assert prefixes[0] == (1, 5)


# ----------------------------------------------------------------------------------------------------------------------
# clip_model: encode_text's prompt sets, the prefix path's contract, the last layer's rows, the buckets

def test_prompt_sets_per_run_of_texts(clip, prefixes):
    """(depth, G, n, D): one set per run of N / G consecutive texts, deep ones too; one per text equals CSC."""
    text = clip_model.tokenize([f"X X X {n}." for n in NAMES[:4]] * 2)  # 2 runs of 4 texts
    prompts = torch.randn(2, 2, 3, 128, requires_grad=True)  # depth 2, 2 runs
    assert_same(both_paths(clip, lambda: clip.encode_text(text, prompts), [prompts]))
    assert prefixes[0] == (2, 4)
    with torch.no_grad():
        per_text = prompts.repeat_interleave(4, dim=1)  # (2, 8, 3, D): the same prompts, given per text
        expected = clip.encode_text(text, prompts)
        torch.testing.assert_close(clip.encode_text(text, per_text), expected, rtol=0, atol=1e-5)
        prefixes.clear()
        clip.encode_text(text, per_text[:1])  # one per text at layer 0 only: [SOS] is shared
        assert prefixes == [(1, 1)]
        with pytest.raises(clip_model.CLIPError, match="3 prompt sets for 8 texts"):
            clip.encode_text(text, torch.zeros(1, 3, 3, 128))


def test_per_text_deep_prompts_take_the_plain_path(clip, prefixes):
    text = clip_model.tokenize([f"X X {n}." for n in NAMES])
    prompts = torch.randn(2, len(NAMES), 2, 128, requires_grad=True)
    (out, grads), (ref, ref_grads) = both_paths(clip, lambda: clip.encode_text(text, prompts), [prompts])
    assert prefixes == [] and torch.equal(out, ref) and torch.equal(grads[0], ref_grads[0])


def test_forward_prefixed_equals_forward_on_whole_sequences(clip):
    """The contract, with several prefixes taken in any order and suffixes of any lengths (padding after the row)."""
    torch.manual_seed(0)
    transformer = clip.transformer
    prefix = torch.randn(3, 5, 128, requires_grad=True)  # (G, P, D)
    suffix = torch.randn(10, 7, 128, requires_grad=True)  # (N, S, D)
    group = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0])
    rows = torch.tensor([6, 0, 3, 2, 6, 1, 4, 5, 0, 2])
    deep = [torch.randn(3, 2, 128, requires_grad=True)]  # replaces positions 1..2 at block 1, one set per prefix
    weights = torch.randn(10, 128)
    out = transformer.forward_prefixed(prefix, suffix, group, rows, deep)  # (N, D)
    grads = torch.autograd.grad((out * weights).sum(), [prefix, suffix, deep[0]])
    whole = torch.cat([prefix[group], suffix], dim=1)  # (N, P + S, D)
    ref = transformer(whole, [deep[0][group]])[torch.arange(10), rows + 5]
    ref_grads = torch.autograd.grad((ref * weights).sum(), [prefix, suffix, deep[0]])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_last_layer_computes_only_the_rows_read(clip, causal):
    torch.manual_seed(0)
    transformer = clip.transformer if causal else clip.visual.transformer
    x = torch.randn(4, 9, transformer.width, requires_grad=True)
    rows = torch.tensor([8, 0, 3, 5])
    out = transformer(x, rows=rows)  # (N, D)
    ref = transformer(x)[torch.arange(4), rows]  # all 9 tokens, then the rows
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompts, after_ln_pre", [(None, False), ((3, 2), False), ((3, 2), True), ((1, 4), False)])
def test_vit_reads_only_cls(clip, prompts, after_ln_pre):
    """encode_image (last layer: CLS only) against the whole sequence through the last layer."""
    torch.manual_seed(0)
    visual, images = clip.visual, torch.randn(2, 3, 32, 32)
    p = None if prompts is None else torch.randn(*prompts, 64, requires_grad=True)
    out = clip.encode_image(images, p, after_ln_pre)
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
    if p is None:
        x = visual.ln_pre(x)
    elif after_ln_pre:
        x = clip_model.insert_prompts(visual.ln_pre(x), p[0], replace=False)
    else:
        x = visual.ln_pre(clip_model.insert_prompts(x, p[0], replace=False))
    ref = visual.ln_post(visual.transformer(x, () if p is None else p[1:])[:, 0]) @ visual.proj
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if p is not None:
        torch.testing.assert_close(torch.autograd.grad(out.sum(), p)[0], torch.autograd.grad(ref.sum(), p)[0],
                                   rtol=1e-5, atol=1e-5)


def padded(lengths, bounds):
    low, total = 0, 0
    for high in bounds:
        total += high * sum(low < n <= high for n in lengths)
        low = high
    return total


@pytest.mark.parametrize("lengths", [[3, 3, 4, 5, 5, 5, 9, 12, 12], [7], [2, 9] * 5 + [4], list(range(1, 12))])
@pytest.mark.parametrize("max_buckets", [1, 2, 3])
def test_buckets_minimise_padding(lengths, max_buckets):
    bounds = clip_model.bucket_bounds(lengths, max_buckets)
    assert len(bounds) <= max_buckets and bounds == sorted(bounds) and bounds[-1] == max(lengths)
    values = sorted(set(lengths))
    best = min(padded(lengths, [*cut, values[-1]]) for k in range(max_buckets)
               for cut in itertools.combinations(values[:-1], k))  # every choice of bounds: brute force
    assert padded(lengths, bounds) == best


def test_coop_m16_at_k_100_runs_in_buckets(clip, monkeypatch):
    """Short names do not pay for the longest: the suffixes run in buckets cut at their own longest length."""
    sizes = []
    block = clip_model.ResidualAttentionBlock.forward
    monkeypatch.setattr(clip_model.ResidualAttentionBlock, "forward",
                        lambda self, x, *args, **kwargs: sizes.append(tuple(x.shape[:2])) or block(self, x, *args,
                                                                                                   **kwargs))
    coop = CoOp(clip, NAMES, n_ctx=16)
    with torch.no_grad():
        coop.text_features()
    suffix_lengths = (coop.tokenized_prompts.argmax(-1) + 1 - 17).tolist()  # [name, ., EOT]: 3..14 tokens
    bounds = clip_model.bucket_bounds(suffix_lengths)
    assert sizes[:2] == [(1, 17)] * 2  # the prefix, once per layer but the last
    assert sorted(set(sizes[2:])) == sorted((sum(low < n <= high for n in suffix_lengths), high)
                                            for low, high in zip([0] + bounds, bounds))
    assert F.normalize(coop.text_features(), dim=-1).shape == (len(NAMES), 32)
