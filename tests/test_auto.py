"""The drop-only reducer (tb.AutoDrop) and its experiment options: its ops (one-to-one capped matching,
moment-preserving merge) and its contract. Auto's per-pair choice: tests/test_auto_choice.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenbudget as tb
from conftest import VARIANTS, assert_reduced_at_counts, make_tiny, matching_shapes
from tokenbudget.ops.disjoint import disjoint_bipartite_matching
from tokenbudget.ops.match import bipartite_soft_matching, max_mergeable
from tokenbudget.ops.merge import drop_matched, merge_weighted
from tokenbudget.ops.moments import merge_moment_preserving
from tokenbudget.ops.small_merge import merge_small_groups

shapes = matching_shapes(max_tokens=40, max_r=30, min_tokens=2, min_r=1)


def _second_moment(x: torch.Tensor, size: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B] size-weighted second moment of the non-prefix tokens about their size-weighted mean."""
    t, w = x[:, prefix:], size[:, prefix:]
    mu = (t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    return (w * (t - mu).square().sum(-1, keepdim=True)).sum(dim=(1, 2))


# -- one-to-one matching -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(shapes)
def test_disjoint_matching_is_one_to_one_with_exactly_r_merges(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 6, generator=g)
    matching = disjoint_bipartite_matching(metric, r, prefix)
    r_eff = min(r, max_mergeable(n, prefix))
    assert matching.r == r_eff and matching.kept_idx.shape == (batch, n - r_eff)
    reference = bipartite_soft_matching(metric, r, prefix)
    for b in range(batch):
        dst = matching.dst_idx[b].tolist()
        assert len(set(dst)) == len(dst)  # no token receives two others in one block
        # The same layout as ToMe's: prefix, then the unmerged A tokens, then all of set B.
        assert matching.kept_idx[b, :prefix].tolist() == list(range(prefix))
        num_b = len(range(2 * (prefix // 2) + 1, n, 2)) if n > prefix else 0
        if num_b:
            assert torch.equal(matching.kept_idx[b, -num_b:], reference.kept_idx[b, -num_b:])
    pos = matching.position_map()
    assert pos.min() >= 0 and pos.max() < n - r_eff


def test_disjoint_matching_takes_the_most_similar_pairs_when_they_do_not_collide() -> None:
    # Tokens 1..4 after a class token: A = {2, 4}, B = {1, 3}; 2 ~ 1 and 4 ~ 3 by construction.
    metric = torch.tensor(
        [[[0.0, 0.0, 1.0], [1.0, 0.1, 0.0], [1.0, 0.0, 0.0], [0.1, 1.0, 0.0], [0.0, 1.0, 0.0]]]
    )
    matching = disjoint_bipartite_matching(metric, 2, 1)
    pos = matching.position_map()[0]
    assert pos[2] == pos[1] and pos[4] == pos[3] and pos[1] != pos[3]


def test_greedy_collides_where_disjoint_does_not() -> None:
    # Every A token's best partner is token 1: ToMe merges both into it, the disjoint matching
    # sends the second-best A token to the other B token.
    metric = torch.tensor(
        [[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.98, 0.2, 0.0]]]
    )
    greedy = bipartite_soft_matching(metric, 2, 1)
    disjoint = disjoint_bipartite_matching(metric, 2, 1)
    assert greedy.dst_idx[0, 0] == greedy.dst_idx[0, 1]
    assert disjoint.dst_idx[0, 0] != disjoint.dst_idx[0, 1]


@settings(max_examples=100, deadline=None)
@given(shapes, st.integers(2, 6))
def test_size_cap_holds_whenever_enough_pairs_fit_under_it(shape, cap) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, 6, generator=g)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float()
    matching = disjoint_bipartite_matching(metric, r, prefix, size, max_size=cap)
    _, merged_size = merge_weighted(torch.zeros(batch, n, 1), size, matching)
    a_start, b_start = 2 * ((prefix + 1) // 2), 2 * (prefix // 2) + 1
    for b in range(batch):
        # r disjoint pairs within the cap surely exist when r A tokens and r B tokens have size 1
        # (cap >= 2); a greedy maximal matching then finds r of them (an uncovered pair of size-1
        # tokens would otherwise remain).
        ones_a = int((size[b, a_start::2, 0] == 1).sum())
        ones_b = int((size[b, b_start::2, 0] == 1).sum())
        if min(ones_a, ones_b) >= matching.r:
            received = torch.zeros(n - matching.r, dtype=torch.bool)
            received[matching.dst_idx[b]] = True
            assert bool((merged_size[b, received, 0] <= cap).all())


# -- moment-preserving merge ---------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(shapes)
def test_moment_preserving_merge_keeps_sizes_direction_and_untouched_tokens(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).double()
    matching = bipartite_soft_matching(torch.randn(batch, n, 4, generator=g), r, prefix)
    out, new_size = merge_moment_preserving(x, size, matching, prefix)
    mean, expected_size = merge_weighted(x, size, matching)
    assert torch.equal(new_size, expected_size)
    received = torch.zeros(batch, n - matching.r, dtype=torch.bool)
    for b in range(batch):
        received[b, matching.dst_idx[b]] = True
    assert torch.equal(out[~received], mean[~received])  # untouched tokens, prefix included, exactly
    if matching.r == 0 or n - prefix == 0:
        return
    t, w = x[:, prefix:], size[:, prefix:]
    mu = (t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    # The image's mean token is kept exactly.
    mean_of = lambda t, w: (t[:, prefix:] * w[:, prefix:]).sum(1) / w[:, prefix:].sum(1)  # noqa: E731
    torch.testing.assert_close(mean_of(out, new_size), mu[:, 0])
    # Merged tokens differ from the plain means by a gain on their deviation plus one shared offset.
    for b in range(batch):
        rows = received[b].nonzero()[:, 0]
        if len(rows) < 2:
            continue
        dev_mean = mean[b, rows] - mu[b]
        gain_dev = out[b, rows] - mu[b]  # = g * dev_mean + offset
        diff = (gain_dev - dev_mean)[1:] - (gain_dev - dev_mean)[
            :1
        ]  # offsets cancel: (g_i-1) d_i - (g_0-1) d_0
        assert torch.isfinite(diff).all()


def test_moment_preserving_merge_restores_the_second_moment() -> None:
    # Pairs of similar tokens (a shared deviation each, plus noise): their plain means lose the
    # noise's share of the spread; the corrected merge keeps the image's mean token exactly and
    # its second moment up to the re-centering.
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(4, 1, 16, generator=g, dtype=torch.float64).expand(-1, 2, -1)
    noise = torch.randn(4, 2, 16, generator=g, dtype=torch.float64)
    pairs = (shared + noise).reshape(8, 16)  # tokens 2k and 2k+1 belong together
    # Interleave so that each pair is one A token (even position) and one B token (odd position).
    x = torch.cat([torch.full((1, 16), 5.0, dtype=torch.float64), 3.0 + pairs[[1, 0, 3, 2, 5, 4, 7, 6]]])[
        None
    ]
    size = torch.ones(1, 9, 1, dtype=torch.float64)
    matching = bipartite_soft_matching(x.float(), 4, 1)
    plain, new_size = merge_weighted(x, size, matching)
    out, _ = merge_moment_preserving(x, size, matching, 1)
    assert new_size[0, :, 0].tolist() == [1, 2, 2, 2, 2]  # each pair merged
    before = _second_moment(x, size, 1)
    assert _second_moment(plain, new_size, 1) < 0.9 * before
    assert abs(float(_second_moment(out, new_size, 1) / before) - 1) < 0.02
    mean = lambda t, w: (t[:, 1:] * w[:, 1:]).sum(1) / w[:, 1:].sum(1)  # noqa: E731
    torch.testing.assert_close(mean(out, new_size), mean(x, size))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # the class token is not touched


def test_moment_gain_is_capped_when_a_group_cancels_out() -> None:
    # Two opposite tokens average to the image mean: the gain is capped at sqrt(2), not infinite.
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.5], [0.0, -0.5]]], dtype=torch.float64)
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.01], [0.3, 1.0], [0.31, 1.0]]])
    matching = bipartite_soft_matching(metric, 2, 1)
    out, _ = merge_moment_preserving(x, None, matching, 1)
    assert torch.isfinite(out).all() and out[0, 1:].abs().max() <= 2**0.5 * 1.0 + 1e-9


# -- averaging only small groups ------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(shapes)
def test_small_group_merge_spans_drop_and_tome(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    x, metric = torch.randn(batch, n, 5, generator=g), torch.randn(batch, n, 6, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    matching = bipartite_soft_matching(metric, r, prefix)
    mean_x, mean_size = merge_weighted(x, size, matching)
    drop_x, drop_size = drop_matched(x, size, matching)
    for cap, want in ((10**6, mean_x), (1, drop_x)):  # every group small: ToMe; none small: drop
        out, out_size = merge_small_groups(x, size, matching, cap)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(out_size, mean_size)
        torch.testing.assert_close(out_size, drop_size)
    out, out_size = merge_small_groups(x, size, matching, 4)
    small = (out_size <= 4).expand_as(out)
    torch.testing.assert_close(out[small], mean_x[small])  # groups within the cap are averaged
    torch.testing.assert_close(out[~small], drop_x[~small])  # larger ones keep the match's features
    assert torch.equal(out_size.sum(dim=1), size.sum(dim=1))


def test_small_group_merge_rejects_a_bad_cap() -> None:
    matching = bipartite_soft_matching(torch.randn(1, 6, 4), 2, 1)
    with pytest.raises(ValueError, match="max_size must be an int >= 1"):
        merge_small_groups(torch.randn(1, 6, 3), None, matching, 0)


# -- the strategy on tiny models -------------------------------------------------------------------------

VARIANTS_OF_AUTO = [
    tb.AutoDrop(r=8),
    tb.AutoDrop(r=8, mean_up_to=4),
    tb.AutoDrop(r=8, matching="disjoint", max_size=4, merge="moment"),
    tb.AutoDrop(r=8, merge="mlerp", prune_layers=1),
]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_budget_is_unpatched_on_every_variant(variant, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        for config in (tb.AutoDrop(r=0), tb.AutoDrop(keep=1.0, matching="disjoint", merge="moment")):
            tb.apply(model, config)
            assert (model(images) - expected).abs().max() <= 1e-5
    tb.remove(model)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("config", VARIANTS_OF_AUTO, ids=lambda c: f"{c.matching}-{c.merge}-{c.mean_up_to}")
def test_auto_on_every_variant(variant, config, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        tb.apply(model, tb.ToMe(r=8))
        model(images)
        tome_counts = tb.last_state(model).tokens_per_layer
        tb.apply(model, tb.config_from_dict({**config.to_dict(), "trace_source": True}))
        out = model(images)
        assert_reduced_at_counts(model, images, out, expected, tome_counts)  # ToMe's counts: its FLOPs


def test_config_json_and_validation() -> None:
    config = tb.AutoDrop(keep=0.25, matching="disjoint", max_size=8, merge="moment", prune_layers=2)
    assert tb.config_from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="matching must be one of"):
        tb.AutoDrop(r=4, matching="optimal")
    with pytest.raises(ValueError, match="merge must be one of"):
        tb.AutoDrop(r=4, merge="max")
    with pytest.raises(ValueError, match="max_size must be an int >= 2"):
        tb.AutoDrop(r=4, matching="disjoint", max_size=1)
    with pytest.raises(ValueError, match="max_size needs matching='disjoint'"):
        tb.AutoDrop(r=4, matching="greedy", max_size=8)
    with pytest.raises(ValueError, match="prune_layers must be an int >= 0"):
        tb.AutoDrop(r=4, prune_layers=-1)
    with pytest.raises(ValueError, match="mean_up_to must be an int >= 2"):
        tb.AutoDrop(r=4, mean_up_to=1)
    with pytest.raises(ValueError, match="mean_up_to applies to merge='drop'"):
        tb.AutoDrop(r=4, merge="mean", mean_up_to=4)
    with pytest.raises(ValueError, match="AutoDrop needs exactly one budget"):
        tb.AutoDrop()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auto_drop_is_tome_matching_with_the_match_dropped(variant, images) -> None:
    """The default drops in every block: ToFu's pruning step (its blocks before ``switch_layer``)."""
    model = make_tiny(variant)
    beyond_the_last_block = 100
    with torch.no_grad():
        tb.apply(model, tb.ToFu(r=6, switch_layer=beyond_the_last_block))
        pruned = model(images)
        tb.apply(model, tb.AutoDrop(r=6))
        auto = model(images)
        tb.apply(model, tb.ToMe(r=6))
        tome = model(images)
    tb.remove(model)
    torch.testing.assert_close(auto, pruned)
    assert (auto - tome).abs().max() > 1e-4  # and not ToMe's average
