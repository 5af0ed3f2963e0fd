"""VPT and UPT (and its ablations) on conftest's tiny CLIPs: exactness, where prompts go, what trains, precision."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import clip_model
from upt import UPT, VARIANTS
from vpt import VPT

# Text features of a random CLIP are nearly collinear; these four names are the least so for conftest's seed-0 tiny ViT,
# which lets VPT (whose classifier is frozen) separate them.
CLASSNAMES = ["green", "water", "apple", "rock"]
BUILDERS = {"vpt": lambda clip, **kw: VPT(clip, CLASSNAMES, **kw),
            "vpt-deep": lambda clip, **kw: VPT(clip, CLASSNAMES, deep=True, **kw),
            **{f"upt-{v}": (lambda clip, v=v, **kw: UPT(clip, CLASSNAMES, variant=v, **kw)) for v in VARIANTS},
            "upt-released": lambda clip, **kw: UPT(clip, CLASSNAMES, released_code=True, **kw)}


@pytest.fixture
def clip(tiny_vit):
    """A private copy: the methods freeze (requires_grad_) the CLIP they get; the session fixture stays untouched."""
    return copy.deepcopy(tiny_vit)


def colour_task(n_per_class=4, seed=0):
    """32x32 noise images whose mean colour is the class (red, green, blue, black): (4n, 3, 32, 32), (4n,)."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]])
    labels = torch.arange(4).repeat_interleave(n_per_class)
    return 0.5 * torch.randn(len(labels), 3, 32, 32, generator=generator) + colours[labels, :, None, None], labels


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------------------
# VPT

@pytest.mark.parametrize("deep", [False, True])
def test_vpt_without_prompts_is_zero_shot_clip(clip, deep):
    template = "a blurry photo of a {}."
    images = torch.randn(3, 3, 32, 32)
    model = VPT(clip, CLASSNAMES, n_ctx=0, deep=deep, template=template).eval()
    with torch.no_grad():
        text = F.normalize(clip.encode_text(clip_model.tokenize([template.format(c) for c in CLASSNAMES])), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ text.t()
        assert torch.equal(model(images), expected)
    assert not any(k.startswith("text_features") for k in model.state_dict())  # class-derived buffer: not persistent


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompts_shape_init_effect_and_gradient(clip, deep):
    torch.manual_seed(0)
    model = VPT(clip, CLASSNAMES, n_ctx=4, deep=deep)
    assert model.prompts.shape == (3 if deep else 1, 4, 64)
    bound = math.sqrt(6 / (3 * 8 ** 2 + 64))  # VPT's uniform init: patch 8, width 64
    assert 0.8 * bound < model.prompts.abs().max() <= bound
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(clip.encode_image(images, model.prompts), clip.encode_image(images))
    F.cross_entropy(model(images), torch.tensor([0, 1])).backward()
    assert (model.prompts.grad.flatten(1).abs().sum(1) > 0).all()  # every prompted layer gets a gradient
    assert list(trainable(model)) == ["prompts"]


def test_vpt_deep_prompts_of_every_layer_matter(clip):
    torch.manual_seed(0)
    model = VPT(clip, CLASSNAMES, deep=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        for layer in range(model.prompts.shape[0]):
            saved = model.prompts[layer].clone()
            model.prompts[layer] = torch.randn_like(saved)  # not a constant shift: LayerNorm would remove it
            assert not torch.allclose(model(images), reference), f"layer {layer}'s prompts are ignored"
            model.prompts[layer] = saved


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_released_code_init_and_where_layer_0_prompts_go(clip, deep):
    """The UPT release: normal(0, 0.02) prompts; its VPT-deep inserts layer 0's after ln_pre, its VPT-shallow before."""
    torch.manual_seed(0)
    model = VPT(clip, CLASSNAMES, n_ctx=64, deep=deep, released_code=True).eval()
    assert 0.017 < model.prompts.std() < 0.023 and model.prompts.abs().max() > 0.0625  # not VPT's uniform(±0.0625)
    ours = VPT(clip, CLASSNAMES, n_ctx=64, deep=deep).eval()
    images, visual = torch.randn(2, 3, 32, 32), clip.visual
    with torch.no_grad():
        ours.prompts.copy_(model.prompts)
        x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
        cls, patches = visual.ln_pre(x).split([1, x.shape[1] - 1], dim=1)
        x = torch.cat([cls, model.prompts[0].expand(2, -1, -1), patches], dim=1)  # after ln_pre: [CLS, P, patches]
        features = visual.ln_post(visual.transformer(x, model.prompts[1:])[:, 0]) @ visual.proj
        expected = clip.logit_scale.exp() * F.normalize(features, dim=-1) @ model.text_features.t()
        assert torch.allclose(model(images), expected, atol=1e-5) == deep
        assert torch.equal(model(images), ours(images)) == (not deep)


# ----------------------------------------------------------------------------------------------------------------------
# UPT: θ, layer-wise prompts, parameter budget, errors

def test_upt_theta_is_eq5_with_token_mixing_and_released_code_is_not(clip):
    torch.manual_seed(0)
    paper, released = (UPT(copy.deepcopy(clip), CLASSNAMES, released_code=r).eval() for r in (False, True))
    u = torch.randn(1, 8, 64)
    with torch.no_grad():
        for model in (paper, released):
            theta, D = model.theta, 64
            q, k, v = F.linear(u, theta.attn.in_proj_weight, theta.attn.in_proj_bias).split(D, dim=-1)
            if model is released:  # sequence length 1: softmax over one key is 1, SA(u) = out_proj(v)
                x = theta.ln_1(u + theta.attn.out_proj(v))
                expected = x + theta.ffn(theta.ln_2(x))
            else:  # Eq. (5) with attention across the 8 tokens
                x = theta.attn.out_proj(torch.softmax(q @ k.transpose(1, 2) / D ** 0.5, dim=-1) @ v) + theta.ln_1(u)
                expected = theta.ffn(theta.ln_2(x)) + theta.ln_2(x)
            torch.testing.assert_close(theta(u), expected)
            perturbed = u.clone()
            perturbed[:, 0] += 1.0
            mixed = not torch.allclose(theta(perturbed)[:, 1:], theta(u)[:, 1:])
            assert mixed == (model is paper)


@pytest.mark.parametrize("released_code", [False, True])
def test_upt_theta_runs_once_per_forward_released_twice(clip, released_code):
    model = UPT(clip, CLASSNAMES, released_code=released_code)
    calls = []
    model.theta.register_forward_hook(lambda *args: calls.append(1))
    model(torch.randn(1, 3, 32, 32))
    assert len(calls) == (2 if released_code else 1)


@pytest.mark.parametrize("variant", ["attention", "shared", "mlp"])
def test_upt_layerwise_prompts_reach_both_encoders(clip, variant):
    torch.manual_seed(0)
    model = UPT(clip, CLASSNAMES, depth=2, variant=variant).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text, visual = model.prompt_pair()
        assert text.shape == (2, 4, 64) and visual.shape == (2, 4, 64)
        assert not torch.allclose(text[0], text[1]) and not torch.allclose(visual[0], visual[1])
        text_features, image_features = clip.encode_text(model.tokens, text), clip.encode_image(images, visual)
        model.prompts[1] = torch.randn_like(model.prompts[1])  # layer 1's unified prompts only
        text, visual = model.prompt_pair()
        assert not torch.allclose(clip.encode_text(model.tokens, text), text_features)
        assert not torch.allclose(clip.encode_image(images, visual), image_features)


def test_upt_parameter_count_matches_the_release():
    """As released: U 4,096 + MHA 1,050,624 + 2 LN 2,048 + FFN 525,312 + Linear(512 -> 768) 393,984."""
    torch.manual_seed(0)
    clip = clip_model.CLIP(512, 32, 1, 768, 16, 77, 49408, 512, 8, 1)  # text width 512, ViT width 768, one layer each
    for released_code in (True, False):
        model = UPT(clip, CLASSNAMES, n_ctx=4, released_code=released_code)
        assert sum(p.numel() for p in trainable(model).values()) == 1_976_064


def test_upt_rejects_impossible_options(clip):
    with pytest.raises(ValueError, match="1 <= depth <= 2"):
        UPT(clip, CLASSNAMES, depth=3)  # the tiny text encoder has 2 layers
    with pytest.raises(ValueError, match="depth"):
        UPT(clip, CLASSNAMES, depth=0)
    with pytest.raises(ValueError, match="attention, joint, shared, mlp"):
        UPT(clip, CLASSNAMES, variant="cross")
    with pytest.raises(ValueError, match="variant='attention'"):
        UPT(clip, CLASSNAMES, variant="mlp", released_code=True)
    with pytest.raises(ValueError, match="depth=1"):
        UPT(clip, CLASSNAMES, depth=2, released_code=True)


@pytest.mark.parametrize("method", BUILDERS)
def test_resnet_backbone_gives_one_line_error(tiny_rn, method):
    with pytest.raises(clip_model.CLIPError, match="ViT backbone such as ViT-B/16"):
        BUILDERS[method](copy.deepcopy(tiny_rn))


# ----------------------------------------------------------------------------------------------------------------------
# Every method: what an optimizer step touches, learning, mixed precision

@pytest.mark.parametrize("method", BUILDERS)
def test_a_step_changes_method_parameters_only(clip, method):
    torch.manual_seed(0)
    model = BUILDERS[method](clip).train()
    model.clip.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = trainable(model)
    assert params and not any(name.startswith("clip.") for name in params)
    assert all(k.startswith("clip.") or k in params for k in before)  # class-derived buffers are not persistent
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    images, labels = colour_task(n_per_class=2)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("clip."))
    assert any(not torch.equal(after[k], before[k]) for k in params)


@pytest.mark.parametrize("method", BUILDERS)
def test_learns_a_colour_task(clip, method):
    torch.manual_seed(0)
    model = BUILDERS[method](clip).train()
    model.clip.eval()
    optimizer = torch.optim.Adam(trainable(model).values(), lr=0.01)  # faster than the paper's SGD 0.002, for a test
    images, labels = colour_task()
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        accuracy = (model.eval()(images).argmax(dim=1) == labels).float().mean().item()
    assert losses[-1] < 0.5 * losses[0] and accuracy >= 0.75, (losses[0], losses[-1], accuracy)  # chance: 0.25


@pytest.mark.parametrize("method", BUILDERS)
def test_bf16_autocast_matches_fp32(clip, method):
    torch.manual_seed(0)
    model = BUILDERS[method](clip, n_ctx=2).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
    assert logits.shape == (2, len(CLASSNAMES)) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference, atol=0.2, rtol=0)  # logit scale 1 / 0.07: cosines to ~1e-2
