"""Budget specs -> per-layer counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenbudget.schedule import (
    clamp_schedule,
    fewest_reachable_tokens,
    layer_schedule,
    resolve_schedule,
    schedule_to_target,
    tokens_after_each_layer,
)


def test_constant_and_list() -> None:
    assert layer_schedule(16, 12) == [16] * 12
    assert layer_schedule([1, 2, 3], 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="one count per block"):
        layer_schedule([1, 2], 3)


def test_inflection_schedule_as_in_the_paper() -> None:
    # (r, 0) is constant; (r, -1) decreases from 2r to 0; the total stays about r per layer.
    assert layer_schedule((8, 0.0), 12) == [8] * 12
    dec = layer_schedule((8, -1.0), 12)
    assert dec[0] == 16 and dec[-1] == 0 and dec == sorted(dec, reverse=True)
    inc = layer_schedule((8, 1.0), 12)
    assert inc[0] == 0 and inc[-1] == 16
    assert abs(sum(dec) - 8 * 12) <= 12
    with pytest.raises(ValueError, match="inflection"):
        layer_schedule((8, 1.5), 12)


def test_clamp_to_half_of_mergeable() -> None:
    merged = clamp_schedule([100] * 4, 197, 1)
    assert merged == [98, 49, 24, 12]
    assert tokens_after_each_layer(merged, 197) == [99, 50, 26, 14]


def test_r_larger_than_the_tokens_is_an_error() -> None:
    with pytest.raises(ValueError, match="larger than the 196 mergeable tokens"):
        resolve_schedule(r=200, keep=None, tokens=None, num_tokens=197, num_prefix=1, num_layers=12)


@given(st.integers(2, 300), st.integers(0, 5), st.integers(1, 24), st.floats(0.0, 1.0))
def test_target_is_met_exactly(n, prefix, layers, frac) -> None:
    prefix = min(prefix, n - 1)
    fewest = fewest_reachable_tokens(n, prefix, layers)
    target = fewest + round(frac * (n - fewest))
    counts = schedule_to_target(n, prefix, layers, target)
    assert len(counts) == layers
    assert clamp_schedule(counts, n, prefix) == counts  # never asks more than a block can merge
    assert n - sum(counts) == target


def test_unreachable_target_names_the_limit() -> None:
    with pytest.raises(ValueError, match="leave at least"):
        schedule_to_target(197, 1, 2, 10)
    with pytest.raises(ValueError, match="prefix"):
        schedule_to_target(197, 5, 12, 3)


def test_keep_ratio() -> None:
    counts = resolve_schedule(r=None, keep=0.25, tokens=None, num_tokens=197, num_prefix=1, num_layers=12)
    assert 197 - sum(counts) == 1 + 49
    # evenly spread, earlier blocks taking the remainder
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_a_budget_cut_by_the_merge_limit_warns_with_the_blocks_and_tokens_left() -> None:
    import warnings

    import tokenbudget as tb
    from conftest import make_tiny

    model = make_tiny("vit")  # 65 tokens (1 prefix), 4 blocks: one step merges at most half of the rest
    with pytest.warns(
        UserWarning, match=r"tb.ToMe\(r=20\).*block 2 merges 12 of 20 \(13 tokens left\)"
    ) as caught:
        tb.apply(model, tb.ToMe(r=20))
    assert "block 3 merges 6 of 20 (7 tokens left)" in str(caught[0].message)
    assert "7 of 65 tokens are left" in str(caught[0].message)
    assert tb.is_patched(model)  # the patch is installed all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb.apply(model, tb.ToMe(r=8))  # within the limit in every block: silent
        tb.apply(model, tb.ToMe(keep=0.1))  # a keep budget is spread to fit
