"""Token Fusion: MLERP merge and prune-style drop as tensor ops, and the ToFu strategy on every variant."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

import tokenbudget as tb
from conftest import VARIANTS, make_tiny, matching_shapes
from tokenbudget.ops.match import bipartite_soft_matching
from tokenbudget.ops.merge import drop_matched, merge_mlerp, merge_weighted, update_token_map
from tokenbudget.state import TokenState
from tokenbudget.strategies import make_strategy

shapes = matching_shapes(max_tokens=40, max_r=30, min_tokens=2, min_r=1)


def _groups(matching) -> list[list[tuple[int, list[int]]]]:
    """Per image: (output position, input positions merged into it) for every output token."""
    pos = matching.position_map()  # [B, N] output position of every input token
    out = []
    for b in range(pos.shape[0]):
        out.append([(j, (pos[b] == j).nonzero()[:, 0].tolist()) for j in range(matching.kept_idx.shape[1])])
    return out


def _case(shape):
    batch, n, prefix, r, seed = shape
    prefix = min(prefix, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 6, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).double()
    matching = bipartite_soft_matching(torch.randn(batch, n, 8, generator=g), r, prefix)
    return x, size, matching


@settings(max_examples=100, deadline=None)
@given(shapes)
def test_mlerp_norm_is_the_group_max_and_direction_the_weighted_mean(shape) -> None:
    x, size, matching = _case(shape)
    merged, new_size = merge_mlerp(x, size, matching)
    _, expected_size = merge_weighted(x, size, matching)
    torch.testing.assert_close(new_size, expected_size)  # sizes add up exactly as in ToMe's merge
    for b, groups in enumerate(_groups(matching)):
        for j, members in groups:
            token = merged[b, j]
            if len(members) == 1:  # received nothing: not renormalized
                torch.testing.assert_close(token, x[b, members[0]])
                continue
            norms = x[b, members].norm(dim=-1)
            torch.testing.assert_close(token.norm(), norms.max())
            mean = (x[b, members] * size[b, members]).sum(0) / size[b, members].sum()
            torch.testing.assert_close(token / token.norm(), mean / mean.norm())


def test_mlerp_of_identical_tokens_is_identity() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 1, 16, generator=g)
    x = base.repeat(1, 21, 1)  # 1 prefix + 20 identical tokens per image
    x[:, 0] = torch.randn(2, 16, generator=g)
    size = torch.randint(1, 5, (2, 21, 1), generator=g).float()
    matching = bipartite_soft_matching(torch.randn(2, 21, 8, generator=g), 10, 1)
    merged, _ = merge_mlerp(x, size, matching)
    torch.testing.assert_close(merged[:, 1:], base.expand(-1, 10, -1))
    torch.testing.assert_close(merged[:, 0], x[:, 0])


def test_mlerp_keeps_norm_where_the_average_shrinks_it() -> None:
    """Two orthogonal unit tokens: the plain average has norm 1/sqrt(2), MLERP norm 1."""
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # prefix, B token, A token
    matching = bipartite_soft_matching(torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.1, 1.0]]]), 1, 1)
    assert matching.r == 1
    avg, _ = merge_weighted(x, None, matching)
    mlerp, size = merge_mlerp(x, None, matching)
    torch.testing.assert_close(avg[0, 1].norm(), torch.tensor(0.5**0.5))
    torch.testing.assert_close(mlerp[0, 1], torch.tensor([0.5**0.5, 0.5**0.5]))
    assert size[0, :, 0].tolist() == [1.0, 2.0]


@settings(max_examples=100, deadline=None)
@given(shapes)
def test_drop_matched_keeps_rows_and_moves_sizes(shape) -> None:
    x, size, matching = _case(shape)
    kept, new_size = drop_matched(x, size, matching)
    assert torch.equal(kept, x.gather(1, matching.kept_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])))
    _, expected_size = merge_weighted(x, size, matching)
    torch.testing.assert_close(new_size, expected_size)  # the match absorbs the dropped token's size
    _, ones = drop_matched(x, None, matching)
    assert bool((ones.sum(dim=1) == x.shape[1]).all())


@pytest.mark.parametrize("switch_layer", [0, 2, 4, 10])
def test_strategy_prunes_before_the_switch_and_merges_after(switch_layer) -> None:
    g = torch.Generator().manual_seed(3)
    x, keys = torch.randn(2, 33, 8, generator=g), torch.randn(2, 33, 5, generator=g)
    strategy = make_strategy(tb.ToFu(r=4, switch_layer=switch_layer), num_layers=4)
    matching = bipartite_soft_matching(keys, 4, 1)
    for layer in range(4):
        state = TokenState(2, 33, 1, None, [4] * 4, [4] * 4, token_map=torch.arange(33).expand(2, -1))
        out = strategy.reduce(x, keys, state, layer)
        op = drop_matched if layer < switch_layer else merge_mlerp
        expected, expected_size = op(x, None, matching)
        assert torch.equal(out, expected) and torch.equal(state.size, expected_size)
        assert torch.equal(state.token_map, update_token_map(torch.arange(33).expand(2, -1), matching))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_zero_budget_is_unpatched_on_every_variant(variant, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        for config in (tb.ToFu(r=0), tb.ToFu(keep=1.0, switch_layer=0)):
            tb.apply(model, config)
            assert (model(images) - expected).abs().max() <= 1e-5
    tb.remove(model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tofu_on_every_variant(variant, images) -> None:
    model = make_tiny(variant)
    with torch.no_grad():
        expected = model(images)
        counts = {}
        for config in (tb.ToMe(r=8), tb.ToFu(r=8, trace_source=True)):
            tb.apply(model, config)
            out = model(images)
            counts[config.method] = tb.last_state(model).tokens_per_layer
        state = tb.last_state(model)
        assert torch.isfinite(out).all() and (out - expected).abs().max() > 1e-4
        assert counts["tofu"] == counts["tome"]  # the same per-layer counts as ToMe
        p = model.num_prefix_tokens
        assert torch.equal(state.token_map[:, :p], torch.arange(p).expand(len(images), -1))
        assert bool((state.sizes.sum(dim=1) == state.input_tokens).all())
        assert bool((state.source.sum(dim=1) == 1).all())  # dropped patches belong to their match
        tb.remove(model)
        assert torch.equal(model(images), expected)


def test_switch_layer_changes_the_output(images) -> None:
    model = make_tiny("vit")
    outs = []
    with torch.no_grad():
        for switch in (0, 2, 4):
            tb.apply(model, tb.ToFu(r=8, switch_layer=switch))
            outs.append(model(images))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_config_json_and_validation() -> None:
    config = tb.ToFu(keep=0.25, switch_layer=5, prop_attn=False)
    assert tb.config_from_json(config.to_json()) == config
    assert tb.ToFu(r=4).switch_layer == 3  # documented default
    with pytest.raises(ValueError, match="switch_layer must be an int >= 0"):
        tb.ToFu(r=4, switch_layer=-1)
    with pytest.raises(ValueError, match="switch_layer must be an int >= 0"):
        tb.ToFu(r=4, switch_layer=1.5)
    with pytest.raises(ValueError, match="ToFu needs exactly one budget"):
        tb.ToFu()


@pytest.mark.parametrize("method", ["tofu", "tome-optimal"])
def test_reachable_from_bench_and_eval_names(method) -> None:
    from tokenbudget.cli import build_parser
    from tokenbudget.evaluate.budgets import method_config

    assert method_config(method, 0.25) == tb.config_from_dict({"method": method, "keep": 0.25})
    args = build_parser().parse_args(["bench", "--methods", method, "--keep", "0.5"])
    assert args.methods == [method]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tofu", "tome-optimal"])
def test_bench_runs_the_method(method, capsys) -> None:
    import json

    from tokenbudget.cli import main

    argv = ["bench", "--model", "vit_tiny_patch16_224", "--methods", method, "--r", "8", "--batch-size", "1",
            "--samples", "1", "--warmup", "1", "--no-memory", "--no-ceiling", "--json", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["config"]["method"] == method and row["tokens_per_layer"][-1] == 197 - 8 * 12
