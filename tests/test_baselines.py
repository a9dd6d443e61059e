"""Baselines at ToMe's per-layer counts: random drop and spatial pooling."""

from __future__ import annotations

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny
from tokenbudget.ops.prune import random_keep_indices, select_tokens


@pytest.mark.parametrize("config", [tb.RandomDrop(r=0), tb.GridPool(r=0)])
def test_zero_budget_is_exact(config, images) -> None:
    model = make_tiny("dinov2_registers")
    with torch.no_grad():
        expected = model(images)
        tb.apply(model, config)
        assert torch.equal(model(images), expected)
        tb.remove(model)


@pytest.mark.parametrize("variant", ["vit", "dinov2_registers", "deit_distilled", "avgpool_no_cls"])
@pytest.mark.parametrize(
    "config", [tb.RandomDrop(r=8), tb.GridPool(r=8), tb.RandomDrop(keep=0.5), tb.GridPool(keep=0.5)]
)
def test_same_counts_as_tome(variant, config, images) -> None:
    model = make_tiny(variant)
    counts = {}
    for cfg in (config, tb.ToMe(r=config.r, keep=config.keep)):
        tb.apply(model, cfg)
        with torch.no_grad():
            out = model(images)
        counts[cfg.method] = tb.last_state(model).tokens_per_layer
        assert torch.isfinite(out).all()
    assert counts[config.method] == counts["tome"]
    tb.remove(model)


def test_random_drop_is_seeded_and_keeps_prefix(images) -> None:
    model = make_tiny("dinov2_registers")
    outs = []
    for seed in (0, 0, 1):
        tb.apply(model, tb.RandomDrop(r=8, seed=seed))
        with torch.no_grad():
            outs.append(model.forward_features(images))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    g = torch.Generator().manual_seed(0)
    keep = random_keep_indices(3, 69, 20, 5, g, torch.device("cpu"))
    assert keep.shape == (3, 49)
    assert torch.equal(keep[:, :5], torch.arange(5).expand(3, -1))
    assert bool((keep[:, 5:].diff(dim=1) > 0).all())  # input order
    x = torch.randn(3, 69, 4)
    assert torch.equal(select_tokens(x, keep)[1], x[1, keep[1]])


def test_grid_pool_merges_neighbours(images) -> None:
    """Every pooled group covers a compact patch of the grid, unlike content-based merging."""
    model = make_tiny("vit")  # 8x8 grid
    tb.apply(model, tb.GridPool(r=8, trace_source=True))
    with torch.no_grad():
        model(images)
    state = tb.last_state(model)
    groups = state.token_map[0, 1:].reshape(8, 8)
    for g in groups.unique():
        rows, cols = (groups == g).nonzero(as_tuple=True)
        # 65 -> 33 tokens: groups of about 2 patches; each fits in a small box
        assert int(rows.max() - rows.min()) <= 3 and int(cols.max() - cols.min()) <= 3
    assert bool((state.sizes.sum(dim=1) == 65).all())


def test_json_and_validation() -> None:
    for cfg in (tb.RandomDrop(r=4, seed=3), tb.GridPool(keep=0.5, prop_attn=False)):
        assert tb.config_from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="RandomDrop needs exactly one budget"):
        tb.RandomDrop()
    with pytest.raises(ValueError, match="seed must be an int"):
        tb.RandomDrop(r=2, seed="a")
