"""The patching contract on tiny Hugging Face transformers models of every supported family,
with the eager and the sdpa attention implementations."""

from __future__ import annotations

import copy

import pytest
import torch

import tokenbudget as tb

transformers = pytest.importorskip("transformers")

from conftest import assert_concurrent_forwards_match  # noqa: E402
from hf_models import COMMON, FAMILIES, make_hf, output  # noqa: E402

IMPLS = ("eager", "sdpa")


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_contract(family: str, impl: str, images: torch.Tensor) -> None:
    """Zero budget = unpatched; a budget changes the output; remove restores it; keys unchanged."""
    model = make_hf(family, impl)
    expected = output(model, family, images)
    keys = list(model.state_dict())
    tb.apply(model, tb.ToMe(r=0))
    assert (output(model, family, images) - expected).abs().max() <= 1e-5
    tb.apply(model, tb.ToMe(r=8, trace_source=True))  # applying again replaces the patch
    assert list(model.state_dict()) == keys
    reduced = output(model, family, images)
    state = tb.last_state(model)
    prefix = FAMILIES[family][0]
    assert state.num_prefix == prefix and state.input_tokens == 64 + prefix
    assert state.tokens_per_layer == [state.input_tokens - 8 * (i + 1) for i in range(4)]
    assert (reduced - expected).abs().max() > 1e-4
    # prefix tokens stay alone, in front, in order; the source map partitions the input
    assert torch.equal(state.token_map[:, :prefix], torch.arange(prefix).expand(len(images), -1))
    assert bool((state.sizes.sum(dim=1) == state.input_tokens).all())
    tb.remove(model)
    assert torch.equal(output(model, family, images), expected)
    assert list(model.state_dict()) == keys and not tb.is_patched(model)


@pytest.mark.parametrize("family", ["vit", "dinov2_registers", "siglip_vision"])
def test_eager_and_sdpa_agree_under_proportional_attention(family: str, images: torch.Tensor) -> None:
    """The size bias rides on the attention mask of both implementations and changes the result."""
    outs = {}
    for impl in IMPLS:
        model = make_hf(family, impl)
        tb.apply(model, tb.ToMe(r=8))
        outs[impl] = output(model, family, images)
    torch.testing.assert_close(outs["eager"], outs["sdpa"], atol=1e-5, rtol=1e-4)
    model = make_hf(family, "sdpa")
    tb.apply(model, tb.ToMe(r=8, prop_attn=False))
    assert (output(model, family, images) - outs["sdpa"]).abs().max() > 1e-5


@pytest.mark.parametrize(
    "config",
    [
        tb.RandomDrop(r=8),
        tb.GridPool(r=8),
        tb.ToMe(keep=0.5),
        tb.ToMe(keep=0.5, preserve_detail=True),
        tb.ToMe(keep=0.5, matching="optimal"),
        tb.ToFu(keep=0.5, switch_layer=1),
    ],
)
@pytest.mark.parametrize("family", ["vit", "dinov2_registers", "siglip_vision"])
def test_every_strategy_runs(family: str, config: tb.ReductionConfig, images: torch.Tensor) -> None:
    model = make_hf(family)
    expected = output(model, family, images)
    tb.apply(model, config)
    got = output(model, family, images)
    state = tb.last_state(model)
    prefix = FAMILIES[family][0]
    assert state.tokens_per_layer[-1] == prefix + 32
    assert got.shape == expected.shape and not torch.allclose(got, expected)


def test_apply_twice_is_the_same_as_once(images: torch.Tensor) -> None:
    model = make_hf("dinov2")
    tb.apply(model, tb.ToMe(r=4))
    tb.apply(model, tb.ToMe(r=8))
    twice = output(model, "dinov2", images)
    fresh = make_hf("dinov2")
    tb.apply(fresh, tb.ToMe(r=8))
    assert torch.equal(twice, output(fresh, "dinov2", images))


def test_concurrent_forwards_match_sequential() -> None:
    model = make_hf("dinov2_registers")
    tb.apply(model, tb.ToMe(r=(8, -1.0), trace_source=True))
    assert_concurrent_forwards_match(model, lambda x: output(model, "dinov2_registers", x))


def test_deepcopy_and_hidden_states(images: torch.Tensor) -> None:
    model = make_hf("vit")
    tb.apply(model, tb.ToMe(r=8))
    clone = copy.deepcopy(model)
    torch.testing.assert_close(output(clone, "vit", images), output(model, "vit", images))
    with torch.no_grad():
        hidden = model(images, output_hidden_states=True).hidden_states
    assert [h.shape[1] for h in hidden] == [65, 57, 49, 41, 33]


def test_clip_model_reduces_the_image_tower_only() -> None:
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        vision_config=COMMON,
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    images, text = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        image_ref, text_ref = model.get_image_features(images), model.get_text_features(text)
    tb.apply(model, tb.ToMe(r=8))
    with torch.no_grad():
        image_out, text_out = model.get_image_features(images), model.get_text_features(text)
    assert tb.last_state(model).tokens_per_layer == [57, 49, 41, 33]
    assert torch.equal(text_out.pooler_output, text_ref.pooler_output)  # text tower untouched
    assert not torch.allclose(image_out.pooler_output, image_ref.pooler_output)
    text_layers = model.text_model.encoder.layers
    assert all("forward" not in layer.__dict__ for layer in text_layers)


def test_siglip_attention_pool_counts_merged_tokens_as_their_patches() -> None:
    """log(size) in the pooling head's mask == attending over each merged token repeated size times."""
    from tokenbudget.adapters.hf import SizeWeightedAttentionPool
    from tokenbudget.state import TokenState

    model = make_hf("siglip_vision")
    head = model.head
    torch.manual_seed(3)
    tokens = torch.randn(2, 5, 48)
    sizes = torch.tensor([[1, 3, 2, 1, 4], [2, 2, 2, 1, 4]])  # both stand for 11 patches
    state = TokenState(2, int(sizes[0].sum()), 0, None, [0], [0], tokens_per_layer=[5])
    state.size = sizes.unsqueeze(-1).float()

    class Ctx:
        def last_state(self) -> TokenState:
            return state

    expanded = torch.stack([t.repeat_interleave(s, dim=0) for t, s in zip(tokens, sizes, strict=True)])
    with torch.no_grad():
        want = head(expanded)
        handle = head.attention.register_forward_pre_hook(SizeWeightedAttentionPool(Ctx()), with_kwargs=True)
        got = head(tokens)
        handle.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unsupported_hf_models_are_refused() -> None:
    model = transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=32, patch_size=4
        )
    )
    with pytest.raises(ValueError, match="cannot patch transformers' Dinov2ForImageClassification"):
        tb.apply(model, tb.ToMe(r=2))
    tb.apply(model.dinov2, tb.ToMe(r=2))  # the backbone inside is supported
    assert tb.is_patched(model.dinov2)


def test_flash_attention_refuses_proportional_attention() -> None:
    model = make_hf("vit")
    model.vit.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="prop_attn=False"):
        tb.apply(model, tb.ToMe(r=2))
    assert not tb.is_patched(model)
    tb.apply(model, tb.ToMe(r=2, prop_attn=False))
    # A refused re-apply leaves the previous patch in place, as a refused first apply leaves none.
    with pytest.raises(ValueError, match="prop_attn=False"):
        tb.apply(model, tb.ToMe(r=4))
    assert tb.is_patched(model) and tb.patched_config(model) == tb.ToMe(r=2, prop_attn=False)


@pytest.mark.slow
def test_embedded_dinov2_timm_and_hf_agree_under_the_same_budget() -> None:
    """The real DINOv2 weights in timm and in HF Dinov2Model: same features, patched or not."""
    timm_model = tb.models.dinov2_small(img_size=112)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 112, 112)
    for impl in IMPLS:
        hf_model = tb.models.timm_dinov2_to_hf(timm_model, attn_implementation=impl)
        for config in (None, tb.ToMe(keep=0.5, trace_source=True)):
            if config is not None:
                tb.apply(timm_model, config)
                tb.apply(hf_model, config)
            with torch.no_grad():
                want = timm_model.forward_features(x)
                got = hf_model(x).last_hidden_state
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            if config is not None:
                assert torch.equal(tb.last_state(hf_model).token_map, tb.last_state(timm_model).token_map)
                assert tb.last_state(hf_model).tokens_per_layer == tb.last_state(timm_model).tokens_per_layer
        tb.remove(timm_model)
