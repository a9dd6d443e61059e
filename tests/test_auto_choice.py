"""tb.Auto: ToMe's pairs, each averaged or its redundant token dropped, chosen from the pair's keys."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import tokenbudget as tb
from conftest import VARIANTS, assert_reduced_at_counts, make_tiny, matching_shapes
from tokenbudget.ops.gated_merge import merge_gated, pair_similarity
from tokenbudget.ops.match import bipartite_soft_matching
from tokenbudget.ops.merge import drop_matched, merge_mlerp, merge_weighted
from tokenbudget.strategies.auto import averaging_gate

shapes = matching_shapes(max_tokens=40, max_r=30, min_tokens=2, min_r=1)


@settings(max_examples=100, deadline=None)
@given(shapes)
def test_gated_merge_is_tome_when_every_pair_averages_and_drop_when_none(shape) -> None:
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    x, keys = torch.randn(batch, n, 5, generator=g), torch.randn(batch, n, 4, generator=g)
    size = torch.rand(batch, n, 1, generator=g) + 0.5
    matching = bipartite_soft_matching(keys, r, prefix)
    every = torch.ones(batch, matching.r, dtype=torch.bool)
    for got, want in (
        (merge_gated(x, size, matching, every), merge_weighted(x, size, matching)),
        (merge_gated(x, size, matching, ~every), drop_matched(x, size, matching)),
        (merge_gated(x, size, matching, every, "mlerp"), merge_mlerp(x, size, matching)),
    ):
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1])


def test_gated_merge_averages_only_the_chosen_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    x, keys = torch.randn(1, 9, 3, generator=g), torch.randn(1, 9, 4, generator=g)
    matching = bipartite_soft_matching(keys, 2, 1)
    gate = torch.tensor([[True, False]])
    out, size = merge_gated(x, None, matching, gate)
    kept, src, dst = matching.flat_indices
    # the averaged pair's destination is the mean of its two tokens, the dropped pair's is untouched
    assert torch.allclose(out[0, dst[0]], (x[0, src[0]] + x[0, kept[dst[0]]]) / 2)
    if dst[1] != dst[0]:
        assert torch.equal(out[0, dst[1]], x[0, kept[dst[1]]])
    assert size.sum() == 9  # sizes still count every input token


def test_pair_similarity_is_the_cosine_of_each_pair() -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 11, 6, generator=g)
    matching = bipartite_soft_matching(keys, 3, 1)
    sim = pair_similarity(keys, matching)
    dst_in = matching.kept_idx.gather(1, matching.dst_idx)
    for b in range(2):
        for j in range(3):
            want = torch.cosine_similarity(keys[b, matching.src_idx[b, j]], keys[b, dst_in[b, j]], dim=0)
            assert torch.isclose(sim[b, j], want, atol=1e-6)
    assert bool((sim[:, :-1] >= sim[:, 1:] - 1e-6).all())  # ToMe merges the most similar first


def test_gate_rules() -> None:
    sim = torch.tensor([[0.99, 0.95, 0.5], [0.9, 0.9, 0.9]])
    assert averaging_gate(sim, "distinct", 0.92).tolist() == [[False, False, True], [True, True, True]]
    assert averaging_gate(sim, "duplicate", 0.92).tolist() == [[True, True, False], [False, False, False]]
    # dispersion: one choice per image, from the spread of its pairs
    assert averaging_gate(sim, "dispersion", 0.1).tolist() == [[True] * 3, [False] * 3]
    # outlier: per pair, the pairs well below their image's mean; a uniform image averages none
    assert averaging_gate(sim, "outlier", 0.5).tolist() == [[False, False, True], [False] * 3]
    assert averaging_gate(sim, "outlier", -3.0).tolist() == [[True] * 3, [False] * 3]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_auto_spans_drop_and_average(variant, images) -> None:
    """Threshold -1 drops every pair (AutoDrop), threshold 1 averages every pair (ToMe, up to pairs
    whose keys are exactly parallel); any threshold keeps ToMe's counts."""
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        outs = {}
        for name, config in {
            "tome": tb.ToMe(r=6),
            "drop": tb.AutoDrop(r=6),
            "auto-drop": tb.Auto(r=6, rule="distinct", threshold=-1.0),
            "auto-mean": tb.Auto(r=6, rule="distinct", threshold=1.0, fuse="mean"),
        }.items():
            tb.apply(model, config)
            outs[name] = model(images)
            if name == "tome":
                counts = tb.last_state(model).tokens_per_layer
        tb.apply(model, tb.Auto(r=6, trace_source=True))
        out = model(images)
        assert_reduced_at_counts(model, images, out, expected, counts)
    tb.remove(model)
    torch.testing.assert_close(outs["auto-drop"], outs["drop"])
    torch.testing.assert_close(outs["auto-mean"], outs["tome"], atol=1e-4, rtol=1e-4)
    assert (outs["drop"] - outs["tome"]).abs().max() > 1e-4


def test_auto_config_json_and_validation() -> None:
    config = tb.Auto(keep=0.5, rule="dispersion", threshold=0.05, fuse="mlerp")
    assert tb.config_from_json(config.to_json()) == config
    assert tb.config_from_dict({"method": "auto-drop", "r": 4}) == tb.AutoDrop(r=4)
    with pytest.raises(ValueError, match="rule must be one of"):
        tb.Auto(r=4, rule="texture")
    with pytest.raises(ValueError, match="fuse must be one of"):
        tb.Auto(r=4, fuse="max")
    with pytest.raises(ValueError, match="threshold"):
        tb.Auto(r=4, threshold=1.5)
    with pytest.raises(ValueError, match="threshold"):
        tb.Auto(r=4, rule="dispersion", threshold=-0.1)
    assert tb.Auto(r=4, rule="outlier", threshold=1.5).threshold == 1.5  # standard deviations
    with pytest.raises(ValueError, match=r"threshold \(rule 'outlier'\) must be a number in \[-3.0, 3.0\]"):
        tb.Auto(r=4, rule="outlier", threshold=4.0)


def test_mlerp_with_a_mixed_gate_keeps_the_longest_averaged_members_norm() -> None:
    g = torch.Generator().manual_seed(2)
    x, keys = torch.randn(2, 25, 6, generator=g), torch.randn(2, 25, 4, generator=g)
    matching = bipartite_soft_matching(keys, 10, 1)
    gate = torch.rand(2, 10, generator=g) > 0.5
    out, _ = merge_gated(x, None, matching, gate, "mlerp")
    kept, src, dst = matching.flat_indices
    rows, flat_out, flat_gate = x.reshape(-1, 6), out.reshape(-1, 6), gate.reshape(-1)
    for d in dst.unique().tolist():
        pairs = (dst == d).nonzero().flatten()
        members = [src[p] for p in pairs if flat_gate[p]]
        if not members:  # only dropped tokens went here: the destination is untouched
            assert torch.equal(flat_out[d], rows[kept[d]])
            continue
        longest = max(float(rows[i].norm()) for i in [kept[d], *members])
        assert abs(float(flat_out[d].norm()) - longest) < 1e-4
