"""Property tests of the pure tensor ops: matching, merging, source tracking."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import matching_shapes
from tokenbudget.ops.limits import max_mergeable
from tokenbudget.ops.match import bipartite_soft_matching
from tokenbudget.ops.merge import merge_weighted, token_map_to_source, update_token_map

shapes = matching_shapes(max_tokens=40, max_r=30)


@settings(max_examples=150, deadline=None)
@given(shapes)
def test_matching_is_a_partition(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 8, generator=g)
    m = bipartite_soft_matching(metric, r, prefix)
    assert m.r == min(r, max_mergeable(n, prefix))
    kept, src = m.kept_idx, m.src_idx
    assert kept.shape == (batch, n - m.r)
    # kept and merged-away positions together are every input token exactly once
    everything = torch.cat([kept, src], dim=1).sort(dim=1).values
    assert torch.equal(everything, torch.arange(n).expand(batch, -1))
    # prefix tokens are kept, first, in order; they are never merged into
    assert torch.equal(kept[:, :prefix], torch.arange(prefix).expand(batch, -1))
    assert bool((m.dst_idx >= prefix).all())
    # merged-away tokens come from set A (even positions) and go into set B tokens (odd positions)
    assert bool((src % 2 == 0).all())
    dst_input_pos = kept.gather(1, m.dst_idx)
    assert bool((dst_input_pos % 2 == 1).all())


@settings(max_examples=150, deadline=None)
@given(shapes)
def test_weighted_merge_conserves_size_and_mass(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).double()
    m = bipartite_soft_matching(torch.randn(batch, n, 8, generator=g), r, prefix)
    merged, new_size = merge_weighted(x, size, m)
    # sizes always sum to the input count; the size-weighted sum of features is conserved
    torch.testing.assert_close(new_size.sum(dim=1), size.sum(dim=1))
    torch.testing.assert_close((merged * new_size).sum(dim=1), (x * size).sum(dim=1))
    # prefix tokens pass through untouched
    torch.testing.assert_close(merged[:, :prefix], x[:, :prefix])


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(2, 60),
    st.integers(0, 5),
    st.lists(st.integers(0, 20), min_size=1, max_size=6),
)
def test_source_map_stays_a_partition(batch, n, prefix, rs) -> None:
    prefix = min(prefix, n)
    x = torch.randn(batch, n, 4)
    size = None
    token_map = torch.arange(n).expand(batch, -1)
    for i, r in enumerate(rs):
        m = bipartite_soft_matching(torch.randn(batch, x.shape[1], 8), r, prefix)
        x, size = merge_weighted(x, size, m)
        token_map = update_token_map(token_map, m)
        source = token_map_to_source(token_map, x.shape[1])  # [B, N, N0]
        # every input token belongs to exactly one current token, and sizes count the members
        assert bool((source.sum(dim=1) == 1).all()), i
        torch.testing.assert_close(source.sum(dim=2).float(), size[..., 0])
    assert torch.equal(token_map[:, :prefix], torch.arange(prefix).expand(batch, -1))


def test_merge_modes_and_unmerge() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 11, 3)
    m = bipartite_soft_matching(torch.randn(2, 11, 6), 3, 1)
    summed = m.merge(x, "sum")
    assert summed.shape == (2, 8, 3)
    torch.testing.assert_close(summed.sum(dim=1), x.sum(dim=1))
    amax = m.merge(x, "amax")
    assert bool((amax >= m.merge(x, "mean") - 1e-6).all())
    back = m.unmerge(summed)
    assert back.shape == x.shape
    # kept tokens that received nothing come back unchanged
    pos = m.position_map()
    receivers = set(m.dst_idx[0].tolist())
    for i in range(11):
        if int(pos[0, i]) not in receivers and i not in m.src_idx[0].tolist():
            torch.testing.assert_close(back[0, i], x[0, i])


def test_unknown_merge_mode() -> None:
    m = bipartite_soft_matching(torch.randn(1, 9, 4), 2, 1)
    try:
        m.merge(torch.randn(1, 9, 4), "median")
    except ValueError as err:
        assert "median" in str(err) and "sum" in str(err)
    else:
        raise AssertionError("no error for an unknown mode")


def test_matching_picks_most_similar_pairs() -> None:
    """Hand-made case: A tokens 2 and 4 duplicate B tokens 3 and 1; they are the ones merged."""
    metric = torch.randn(1, 7, 16)
    metric[0, 2] = metric[0, 3] * 2.0  # same direction: cosine 1
    metric[0, 4] = metric[0, 1] * 0.5
    m = bipartite_soft_matching(metric, 2, 1)
    assert sorted(m.src_idx[0].tolist()) == [2, 4]
    dst_inputs = sorted(m.kept_idx[0, m.dst_idx[0]].tolist())
    assert dst_inputs == [1, 3]
    # output order: prefix, unmerged A (input order), then B (input order)
    assert m.kept_idx[0].tolist() == [0, 6, 1, 3, 5]


def test_sizes_stay_float32_under_bfloat16() -> None:
    """bfloat16 cannot count past 256: sizes are float32 whatever the token dtype."""
    x = torch.randn(1, 601, 8).bfloat16()
    size = None
    for _ in range(8):
        # identical keys: every A token matches the same first B token, which grows past 256
        m = bipartite_soft_matching(torch.ones(1, x.shape[1], 4), 60, 1)
        x, size = merge_weighted(x, size, m)
        assert x.dtype == torch.bfloat16 and size.dtype == torch.float32
    assert float(size.sum()) == 601.0
    assert float(size.max()) > 256
