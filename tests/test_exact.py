"""Exactness: the fast ToMe equals a literal, per-token implementation of the paper's algorithm."""

from __future__ import annotations

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny
from reference_tome import reference_tome_logits, reference_tome_tokens


@pytest.mark.parametrize(
    "variant", ["vit", "dinov2_layerscale", "dinov2_registers", "qk_norm", "deit_distilled"]
)
@pytest.mark.parametrize("r", [3, 8, (6, -1.0), [0, 12, 0, 20]])
def test_tokens_match_reference(variant: str, r, images: torch.Tensor) -> None:
    model = make_tiny(variant)
    config = tb.ToMe(r=r)
    tb.apply(model, config)
    with torch.no_grad():
        fast = model.forward_features(images)
    state = tb.last_state(model)
    expected = reference_tome_tokens(model, images, state.merged_per_layer)
    assert sum(state.merged_per_layer) > 0
    for b, (tokens, size) in enumerate(expected):
        assert fast.shape[1] == tokens.shape[0]
        torch.testing.assert_close(fast[b], tokens, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(state.sizes[b], size)


@pytest.mark.parametrize("variant", ["vit", "avgpool_cls", "avgpool_no_cls", "clip_prenorm"])
def test_logits_match_reference(variant: str, images: torch.Tensor) -> None:
    """Pooling included: average pooling over merged tokens is weighted by token size."""
    model = make_tiny(variant)
    tb.apply(model, tb.ToMe(r=10))
    with torch.no_grad():
        fast = model(images)
    expected = reference_tome_logits(model, images, tb.last_state(model).merged_per_layer)
    torch.testing.assert_close(fast, expected, atol=2e-5, rtol=1e-5)


def test_unweighted_pooling_would_differ(images: torch.Tensor) -> None:
    """The weighting matters: plain mean pooling of the merged tokens gives other logits."""
    model = make_tiny("avgpool_cls")
    tb.apply(model, tb.ToMe(r=10))
    with torch.no_grad():
        feats = model.forward_features(images)
        weighted = model.forward_head(feats)
        plain = model.head(model.fc_norm(feats[:, 1:].mean(dim=1)))
    assert (weighted - plain).abs().max() > 1e-3


def test_proportional_attention_is_applied(images: torch.Tensor) -> None:
    model = make_tiny("vit")
    tb.apply(model, tb.ToMe(r=8, prop_attn=False))
    with torch.no_grad():
        plain = model.forward_features(images)
    merged = tb.last_state(model).merged_per_layer
    expected = reference_tome_tokens(model, images, merged, prop_attn=False)
    for b, (tokens, _) in enumerate(expected):
        torch.testing.assert_close(plain[b], tokens, atol=2e-5, rtol=1e-5)
    tb.apply(model, tb.ToMe(r=8, prop_attn=True))
    with torch.no_grad():
        prop = model.forward_features(images)
    assert (prop - plain).abs().max() > 1e-4
