"""PiToMe: energy scores and energy matching as tensor ops, and the strategy's contract on every variant."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import tokenbudget as tb
from conftest import VARIANTS, assert_reduced_at_counts, make_tiny, matching_shapes
from tokenbudget.ops.energy import energy_matching, energy_scores, pitome_margin
from tokenbudget.ops.merge import merge_weighted
from tokenbudget.strategies import make_strategy

shapes = matching_shapes(max_tokens=40, max_r=30, min_tokens=2, min_r=1)


def test_energy_is_high_inside_a_cluster_and_low_for_an_outlier() -> None:
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(16, generator=g)
    cluster = centre + 0.05 * torch.randn(6, 16, generator=g)  # six near-duplicates
    outlier = -centre + 0.05 * torch.randn(1, 16, generator=g)
    pair = torch.randn(2, 16, generator=g)
    metric = torch.cat([cluster, outlier, pair]).unsqueeze(0)  # [1, 9, 16]
    energy = energy_scores(metric, margin=0.5)[0]
    assert energy[:6].min() > energy[6:].max()
    assert energy.argmin() == 6  # the token opposite the cluster is the most isolated


def test_energy_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    cos = unit @ unit.transpose(1, 2)
    margin, alpha = 0.3, 0.7
    f = torch.where(cos >= margin, cos - margin, alpha * (torch.exp(cos - margin) - 1))
    torch.testing.assert_close(energy_scores(metric, margin, alpha), f.mean(-1))


def test_margin_schedule_falls_from_the_papers_start() -> None:
    margins = [pitome_margin(i, 12) for i in range(12)]
    assert margins[0] == pytest.approx(0.9)
    assert all(b < a for a, b in zip(margins, margins[1:], strict=False))
    assert margins[-1] == pytest.approx(0.9 - 0.8 * 11 / 12)


@settings(max_examples=100, deadline=None)
@given(shapes)
def test_energy_matching_merges_the_high_energy_half_and_protects_the_rest(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 8, generator=g)
    matching = energy_matching(metric, r, prefix, margin=0.2)
    r_eff = min(r, max(0, (n - prefix) // 2))
    assert matching.r == r_eff and matching.kept_idx.shape == (batch, n - r_eff)
    pos = matching.position_map()  # every input token lands in exactly one output token
    assert pos.min() >= 0 and pos.max() < n - r_eff
    assert torch.equal(matching.kept_idx[:, :prefix], torch.arange(prefix).expand(batch, -1))
    assert torch.equal(pos[:, :prefix], torch.arange(prefix).expand(batch, -1))  # prefix untouched
    if r_eff == 0:
        return
    energy = energy_scores(metric[:, prefix:], 0.2)  # [B, M]
    for b in range(batch):
        merging = torch.cat([matching.src_idx[b], matching.kept_idx[b, n - 2 * r_eff :]]) - prefix
        protected = matching.kept_idx[b, prefix : n - 2 * r_eff] - prefix
        # The 2r merging tokens are the 2r highest-energy ones (ties aside).
        if len(protected):
            assert energy[b, merging].min() >= energy[b, protected].max() - 1e-6
        # Each merged token went to the most similar token of set B.
        unit = torch.nn.functional.normalize(metric[b], dim=-1)
        b_pos = matching.kept_idx[b, n - 2 * r_eff :]  # set B: the last r of the N - r outputs
        for src, dst in zip(matching.src_idx[b], matching.dst_idx[b], strict=True):
            sims = unit[src] @ unit[b_pos].T
            assert sims[dst - (n - 2 * r_eff)] >= sims.max() - 1e-6


def test_sizes_sum_to_the_input() -> None:
    g = torch.Generator().manual_seed(2)
    x, metric = torch.randn(3, 30, 6, generator=g), torch.randn(3, 30, 4, generator=g)
    matching = energy_matching(metric, 12, 2, margin=0.0)
    merged, size = merge_weighted(x, None, matching)
    assert merged.shape == (3, 18, 6) and bool((size.sum(dim=1) == 30).all())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_budget_is_unpatched_on_every_variant(variant, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        for config in (tb.PiToMe(r=0), tb.PiToMe(keep=1.0)):
            tb.apply(model, config)
            assert (model(images) - expected).abs().max() <= 1e-5
    tb.remove(model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pitome_on_every_variant(variant, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        counts = {}
        for config in (tb.ToMe(r=8), tb.PiToMe(r=8, trace_source=True)):
            tb.apply(model, config)
            out = model(images)
            counts[config.method] = tb.last_state(model).tokens_per_layer
        assert_reduced_at_counts(model, images, out, expected, counts["tome"])  # ToMe's counts: its FLOPs


def test_strategy_uses_the_layer_margin_unless_one_is_given() -> None:
    assert make_strategy(tb.PiToMe(r=2), 12).margin(6) == pytest.approx(pitome_margin(6, 12))
    assert make_strategy(tb.PiToMe(r=2, margin=0.4), 12).margin(6) == 0.4


def test_config_json_and_validation() -> None:
    config = tb.PiToMe(keep=0.25, margin=0.5, alpha=0.5, prop_attn=False)
    assert tb.config_from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="margin"):
        tb.PiToMe(r=4, margin=1.5)
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        tb.PiToMe(r=4, alpha=0)
    with pytest.raises(ValueError, match="PiToMe needs exactly one budget"):
        tb.PiToMe()
