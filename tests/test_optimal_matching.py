"""ToMe with matching="optimal": the exact one-to-one assignment, checked against brute force."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenbudget as tb
from conftest import VARIANTS, assert_reduced_at_counts, make_tiny, matching_shapes
from tokenbudget.ops.assignment import best_disjoint_pairs, optimal_bipartite_matching
from tokenbudget.ops.match import bipartite_soft_matching, max_mergeable
from tokenbudget.ops.merge import merge_weighted


def _brute_force_best(scores: np.ndarray, r: int) -> float:
    """Max total score over every set of r disjoint (row, col) pairs."""
    num_a, num_b = scores.shape
    best = -np.inf
    for rows in itertools.combinations(range(num_a), r):
        for cols in itertools.permutations(range(num_b), r):
            best = max(best, scores[list(rows), list(cols)].sum())
    return float(best)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 5), st.integers(0, 2**16))
def test_best_disjoint_pairs_matches_brute_force(num_a, num_b, r, seed) -> None:
    r = min(r, num_a, num_b)
    scores = np.random.default_rng(seed).uniform(-1, 1, size=(num_a, num_b))
    rows, cols = best_disjoint_pairs(scores, r)
    assert len(rows) == len(cols) == r
    assert len(set(rows.tolist())) == r and len(set(cols.tolist())) == r  # disjoint pairs
    assert scores[rows, cols].sum() == pytest.approx(_brute_force_best(scores, r), abs=1e-9)


def test_one_to_one_differs_from_greedy_when_a_tokens_share_their_best_b() -> None:
    # A rows 0 and 1 both like B column 0 most; greedy (many-to-one) takes both edges into it,
    # one-to-one must send one of them elsewhere: 0.9 + 0.8 instead of 0.9 + 0.85.
    scores = np.array([[0.9, 0.1], [0.85, 0.8]])
    rows, cols = best_disjoint_pairs(scores, 2)
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="cannot choose 3 disjoint pairs"):
        best_disjoint_pairs(scores, 3)


def _total(metric: torch.Tensor, matching) -> torch.Tensor:
    """[B] total cosine similarity of the merged (A, B) pairs of a matching."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    dst_input = matching.kept_idx.gather(1, matching.dst_idx)  # input position of each destination
    src = unit.gather(1, matching.src_idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    dst = unit.gather(1, dst_input.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    return (src * dst).sum(dim=(1, 2))


shapes = matching_shapes(max_tokens=30, max_r=20)


@settings(max_examples=100, deadline=None)
@given(shapes)
def test_optimal_matching_keeps_the_layout_contract(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 8, generator=g, dtype=torch.float64)
    greedy = bipartite_soft_matching(metric, r, prefix)
    optimal = optimal_bipartite_matching(metric, r, prefix)
    assert optimal.r == greedy.r == min(r, max_mergeable(n, prefix))
    kept, src = optimal.kept_idx, optimal.src_idx
    everything = torch.cat([kept, src], dim=1).sort(dim=1).values
    assert torch.equal(everything, torch.arange(n).expand(batch, -1))  # a partition of the input
    assert torch.equal(kept[:, :prefix], torch.arange(prefix).expand(batch, -1))  # prefix first
    num_unmerged = kept.shape[1] - prefix - len(range(2 * (prefix // 2) + 1, n, 2)) if n > prefix else 0
    a_part = kept[:, prefix : prefix + num_unmerged]
    assert bool((a_part % 2 == 0).all()) and bool((a_part.diff(dim=1) > 0).all())  # unmerged A, in order
    assert bool((src % 2 == 0).all()) and bool((kept.gather(1, optimal.dst_idx) % 2 == 1).all())
    if optimal.r:
        # one-to-one: no B token receives two A tokens
        assert all(len(set(row)) == optimal.r for row in optimal.dst_idx.tolist())
        # never above greedy (which solves the many-to-one relaxation); equal when greedy's
        # destinations are already distinct
        opt_total, greedy_total = _total(metric, optimal), _total(metric, greedy)
        assert bool((opt_total <= greedy_total + 1e-9).all())
        for b in range(batch):
            if len(set(greedy.dst_idx[b].tolist())) == greedy.r:
                assert float(opt_total[b]) == pytest.approx(float(greedy_total[b]), abs=1e-9)
        # sizes and features merge through the same Matching
        _, size = merge_weighted(metric, None, optimal)
        assert bool((size.sum(dim=1) == n).all()) and float(size.max()) <= 2


def test_optimal_matching_is_exact_on_small_inputs() -> None:
    g = torch.Generator().manual_seed(5)
    metric = torch.randn(2, 11, 4, generator=g, dtype=torch.float64)  # 1 prefix, 5 A and 5 B tokens
    for r in range(0, 6):
        matching = optimal_bipartite_matching(metric, r, 1)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = (unit[:, 2::2] @ unit[:, 1::2].transpose(1, 2)).numpy()
        totals = _total(metric, matching)
        for b in range(2):
            expected = _brute_force_best(scores[b], r) if r else 0.0
            assert float(totals[b]) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tome_optimal_on_every_variant(variant, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        tb.apply(model, tb.ToMe(r=0, matching="optimal"))
        assert (model(images) - expected).abs().max() <= 1e-5
        tb.apply(model, tb.ToMe(r=8))
        model(images)
        greedy_counts = tb.last_state(model).tokens_per_layer
        tb.apply(model, tb.ToMe(r=8, matching="optimal", trace_source=True))
        out = model(images)
        assert_reduced_at_counts(model, images, out, expected, greedy_counts)


def test_config_validation_registry_and_json() -> None:
    assert tb.ToMe(r=4).matching == "greedy"
    with pytest.raises(ValueError, match="matching must be one of 'greedy', 'optimal'"):
        tb.ToMe(r=4, matching="hungarian")
    with pytest.raises(ValueError, match="ToMeOptimal always uses matching='optimal'"):
        tb.ToMeOptimal(r=4, matching="greedy")
    for config in (tb.ToMe(r=4, matching="optimal"), tb.ToMeOptimal(keep=0.5)):
        assert tb.config_from_json(config.to_json()) == config
    assert tb.config_from_dict({"method": "tome-optimal", "keep": 0.5}).matching == "optimal"


def test_missing_scipy_names_the_extra(monkeypatch, images) -> None:
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import scipy.optimize now fails
    model = make_tiny("vit")
    with pytest.raises(ImportError, match=r"tokenbudget\[optimal\]"):
        tb.apply(model, tb.ToMe(r=4, matching="optimal"))
    assert not tb.is_patched(model)
    tb.apply(model, tb.ToMe(r=4))  # greedy matching never needs scipy
    with torch.no_grad():
        model(images)
