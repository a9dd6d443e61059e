"""The patching contract on tiny OpenCLIP models: the image tower is reduced, the text tower untouched."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import tokenbudget as tb

open_clip = pytest.importorskip("open_clip")

from conftest import assert_concurrent_forwards_match  # noqa: E402
from openclip_models import make_openclip  # noqa: E402


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def _encode(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_image(images)


@pytest.mark.parametrize("pool_type, ls", [("tok", None), ("avg", 0.5)])
def test_contract(pool_type: str, ls: float | None, images: torch.Tensor) -> None:
    model = make_openclip(pool_type, ls)
    text = torch.randint(0, 100, (2, 8))
    expected = _encode(model, images)
    with torch.no_grad():
        text_expected = model.encode_text(text)
    keys = list(model.state_dict())
    tb.apply(model, tb.ToMe(r=0))
    assert (_encode(model, images) - expected).abs().max() <= 1e-5
    tb.apply(model, tb.ToMe(r=8, trace_source=True))
    assert list(model.state_dict()) == keys
    reduced = _encode(model, images)
    state = tb.last_state(model)
    assert state.num_prefix == 1 and state.tokens_per_layer == [57, 49, 41, 33]
    assert torch.equal(state.token_map[:, 0], torch.zeros(len(images), dtype=torch.long))
    assert (reduced - expected).abs().max() > 1e-4
    with torch.no_grad():
        assert torch.equal(model.encode_text(text), text_expected)  # text tower untouched
    with pytest.raises(NotImplementedError, match="patch grid"):
        model.visual.forward_intermediates(images)
    tb.apply(model, tb.ToMe(r=4))  # applying twice is safe
    tb.remove(model)
    assert torch.equal(_encode(model, images), expected)
    assert list(model.state_dict()) == keys and not tb.is_patched(model)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_same_tokens_and_features_as_timm_with_the_same_weights(pool_type: str, images: torch.Tensor) -> None:
    """OpenCLIP's tower and timm's ViT with converted weights agree under ToMe: the keys read from
    ``in_proj_weight``, the per-head proportional-attention mask and the weighted avg pool are right."""
    from timm.models.vision_transformer import VisionTransformer, _convert_openai_clip

    model = make_openclip(pool_type)
    reference = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=48,
        depth=4,
        num_heads=3,
        num_classes=16,
        pre_norm=True,
        global_pool="token" if pool_type == "tok" else "avg",
        fc_norm=False,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-5),
    ).eval()
    reference.load_state_dict(_convert_openai_clip(model.state_dict(), reference))
    torch.testing.assert_close(_encode(model, images), reference(images), atol=1e-5, rtol=1e-5)
    for config in (tb.ToMe(r=8, trace_source=True), tb.GridPool(r=8, trace_source=True)):
        tb.apply(model, config)
        tb.apply(reference, config)
        got = _encode(model, images)
        with torch.no_grad():
            want = reference(images)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert torch.equal(tb.last_state(model).token_map, tb.last_state(reference).token_map)


@pytest.mark.parametrize(
    "config",
    [
        tb.RandomDrop(keep=0.5),
        tb.GridPool(keep=0.5),
        tb.ToMe(keep=0.5),
        tb.ToMe(keep=0.5, preserve_detail=True),
        tb.ToMe(keep=0.5, matching="optimal"),
        tb.ToFu(keep=0.5, switch_layer=1),
    ],
)
def test_every_strategy_runs(config: tb.ReductionConfig, images: torch.Tensor) -> None:
    model = make_openclip("avg")
    expected = _encode(model, images)
    tb.apply(model.visual, config)  # the image tower alone is a supported target too
    got = _encode(model, images)
    assert tb.last_state(model.visual).tokens_per_layer[-1] == 1 + 32
    assert got.shape == expected.shape and not torch.allclose(got, expected)


def test_concurrent_forwards_match_sequential() -> None:
    model = make_openclip("avg", 0.5)
    tb.apply(model, tb.ToMe(r=(8, -1.0)))
    assert_concurrent_forwards_match(model, lambda x: _encode(model, x))


def test_unsupported_openclip_towers_are_refused() -> None:
    from open_clip.transformer import TextTransformer

    text_tower = TextTransformer(context_length=8, vocab_size=100, width=32, heads=2, layers=1)
    with pytest.raises(ValueError, match="cannot patch open_clip's TextTransformer"):
        tb.apply(text_tower, tb.ToMe(r=2))
