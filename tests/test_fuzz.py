"""Fuzzing the public API with hypothesis: every call either returns finite outputs that keep the
function's invariants, or raises ValueError / TypeError with a message; never a raw torch or numpy
error, never NaN out of finite input, never a half-patched model.

Shapes are tiny and example counts small so the whole file runs in well under a minute;
``TOKENBUDGET_FUZZ_EXAMPLES=500`` (examples per test) searches longer, and
``TOKENBUDGET_FUZZ_RANDOM=1`` draws new examples on each run instead of the fixed sequence.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import tokenbudget as tb
from conftest import VARIANTS, make_tiny
from tokenbudget.config.base import _REGISTRY
from tokenbudget.vlm import Slots, allocate, cluster_slots, compress_slots, pool, select

EXAMPLES = int(os.environ.get("TOKENBUDGET_FUZZ_EXAMPLES", "0"))
fuzz = settings(
    deadline=None,
    derandomize=not os.environ.get("TOKENBUDGET_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

CLEAR = (ValueError, TypeError)  # what a bad input may raise


def examples(default: int) -> settings:
    return settings(fuzz, max_examples=EXAMPLES or default)


def assert_clear(error: BaseException) -> None:
    """A refused input says what was wrong, in a sentence (not a bare torch message)."""
    assert isinstance(error, CLEAR), f"raw {type(error).__name__}: {error}"
    message = str(error)
    assert len(message) > 15, message
    for raw in (
        "stack expects",
        "linalg",
        "CUDA",
        "size mismatch",
        "index out of range",
        "must match the size",
    ):
        assert raw not in message, message


def outcome(fn, *args, **kwargs):
    """``fn(...)``'s result, or ``None`` after checking that the error it raised is a clear one."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - judged by assert_clear
        assert_clear(error)
        return None


# -- values a hostile user might pass ---------------------------------------------------------------

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["", "greedy", "optimal", "detail", "patch", "resolution", "x"]),
    st.lists(st.integers(-2, 12), max_size=5),
    st.tuples(st.integers(-2, 20), st.floats(-2, 2)),
    st.lists(st.floats(-0.5, 1.5), min_size=1, max_size=3),
)


# Values a careful user would pass, per option name (the tiny models have 4 blocks, 4 px patches).
PLAUSIBLE = {
    "r": st.one_of(
        st.integers(0, 20),
        st.tuples(st.integers(0, 12), st.floats(-1, 1)),
        st.lists(st.integers(0, 8), min_size=4, max_size=4),
    ),
    "keep": st.floats(0.05, 1.0),
    "tokens": st.integers(1, 80),
    "prop_attn": st.booleans(),
    "trace_source": st.booleans(),
    "preserve_detail": st.booleans(),
    "fuse": st.booleans(),
    "matching": st.sampled_from(["greedy", "optimal"]),
    "detail_fraction": st.floats(0, 0.5),
    "entropy_floor": st.one_of(st.none(), st.floats(0, 1)),
    "seed": st.integers(0, 100),
    "switch_layer": st.integers(0, 5),
    "layers": st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
    "predictor": st.none(),
    "score": st.just("detail"),
    "score_block": st.one_of(st.none(), st.sampled_from([2, 4, 8])),
    "mode": st.sampled_from(["patch", "resolution"]),
    "target_tokens": st.none(),
}
BUDGETS = ("r", "keep", "tokens")


@st.composite
def configs(draw: st.DrawFn, hostile_odds: int = 2) -> tuple[type, dict]:
    """(config class, kwargs): plausible options with at most one hostile value, or (one draw in
    ``hostile_odds``) hostile ones."""
    cls = draw(st.sampled_from(sorted(_REGISTRY.values(), key=lambda c: c.method)))
    names = [f.name for f in fields(cls)]
    if draw(st.integers(0, hostile_odds - 1)) == 0:  # hostile: a few options, any values
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=4)) if names else []
        return cls, {name: draw(anything) for name in chosen}
    kwargs = {}
    for name in names:
        if name in BUDGETS or name not in PLAUSIBLE or not draw(st.booleans()):
            continue
        if cls is tb.AdaptivePatch and name == "keep":
            continue
        kwargs[name] = draw(PLAUSIBLE[name])
    if "r" in names:  # one budget, as every budget config needs
        budget = draw(st.sampled_from(BUDGETS))
        kwargs[budget] = draw(PLAUSIBLE[budget])
    if cls is tb.AdaptivePatch:
        sizes = draw(st.sampled_from([None, (8, 4, 2), (8, 4), (4,), (16, 8, 4)]))
        kwargs["patch_sizes"] = sizes
        count = 3 if sizes is None else len(sizes)
        kwargs["thresholds"] = tuple(
            sorted(draw(st.lists(st.floats(0, 1), min_size=count - 1, max_size=count - 1)))
        )
    if names and draw(st.integers(0, 3)) == 0:  # one hostile value
        kwargs[draw(st.sampled_from(names))] = draw(anything)
    return cls, kwargs


@examples(150)
@given(configs())
def test_configs_build_or_refuse_and_round_trip(drawn) -> None:
    cls, kwargs = drawn
    config = outcome(cls, **kwargs)
    event("built" if config is not None else "refused")
    if config is None:
        return
    assert tb.config_from_json(config.to_json()) == config
    assert tb.config_from_dict(json.loads(config.to_json())) == config


@examples(80)
@given(
    st.one_of(
        st.text(max_size=30),
        st.dictionaries(st.sampled_from(["method", "r", "keep", "tokens", "x"]), anything, max_size=3).map(
            json.dumps
        ),
        st.builds(
            lambda m, r: json.dumps({"method": m, "r": r}), st.sampled_from(sorted(_REGISTRY)), anything
        ),
        st.sampled_from(["[]", "null", "3", '"tome"', "{", "/", ".", "missing.json"]),
    )
)
def test_config_from_json_parses_or_refuses(text: str) -> None:
    config = outcome(tb.config_from_json, text)
    assert config is None or isinstance(config, tb.ReductionConfig)


def test_config_from_json_reads_a_file_path(tmp_path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(tb.ToMe(r=4).to_json())
    assert tb.config_from_json(path) == tb.ToMe(r=4)
    assert tb.config_from_json(str(path)) == tb.ToMe(r=4)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        tb.config_from_json(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="a folder"):
        tb.config_from_json(tmp_path)
    with pytest.raises(ValueError, match='needs a "method" key.*tome'):
        tb.config_from_json('{"r": 4}')


# -- tb.apply on the tiny model matrix --------------------------------------------------------------

_MODELS: dict[str, torch.nn.Module] = {}


def _model(variant: str) -> torch.nn.Module:
    if variant not in _MODELS:
        _MODELS[variant] = make_tiny(variant)
    model = _MODELS[variant]
    tb.remove(model)
    return model


def _snapshot(model: torch.nn.Module) -> list:
    """Everything a patch can change: instance attributes shadowing methods, and hooks."""
    return [
        (
            sorted(k for k, v in m.__dict__.items() if callable(v) and not isinstance(v, torch.nn.Module)),
            list(m._forward_hooks),
            list(m._forward_pre_hooks),
        )
        for m in model.modules()
    ] + [model.__dict__.get("_tokenbudget")]


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@examples(30)
@given(
    configs(hostile_odds=6),
    st.sampled_from(sorted(VARIANTS)),
    st.integers(1, 2),
    st.sampled_from([None, tb.ToMe(r=3)]),
)
def test_apply_patches_fully_or_leaves_the_model_as_it_was(drawn, variant, batch, before) -> None:
    cls, kwargs = drawn
    config = outcome(cls, **kwargs)
    if config is None:
        return
    model = _model(variant)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    if before is not None:
        tb.apply(model, before)
    previous, expected = _snapshot(model), _forward(model, x)
    try:
        tb.apply(model, config)
    except (ValueError, TypeError, NotImplementedError, FileNotFoundError) as error:
        event(f"apply refused {type(config).__name__}")
        assert len(str(error)) > 15
        assert _snapshot(model) == previous  # not half-patched: the previous state, patch included
        assert torch.equal(_forward(model, x), expected)
        return
    try:
        out = _forward(model, x)
    except (ValueError, NotImplementedError) as error:  # e.g. a grid the config needs
        assert_clear(error) if isinstance(error, ValueError) else None
        return
    event(f"applied {type(config).__name__}")
    assert torch.isfinite(out).all()
    state = tb.last_state(model)
    if isinstance(config, tb.AdaptivePatch):
        assert len(state.patch_sizes) == batch
    else:
        counts = state.tokens_per_layer
        assert len(counts) == len(model.blocks)
        assert all(a >= b for a, b in zip([state.input_tokens, *counts], counts, strict=False))
        if state.size is not None:  # every input patch is accounted for exactly once
            real = state.size[..., 0] if state.padding is None else state.size[..., 0] * ~state.padding
            assert torch.allclose(real.sum(1), torch.full((batch,), float(state.input_tokens)))
    tb.remove(model)
    plain = _forward(model, x)
    tb.apply(model, config)
    tb.remove(model)
    assert torch.equal(_forward(model, x), plain)


# -- tb.vlm ---------------------------------------------------------------------------------------


@st.composite
def token_batches(draw: st.DrawFn, corrupt: bool = True) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """(tokens [B, P + h*w, C], P, (h, w)) with small shapes, sometimes corrupted."""
    batch, prefix = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    h, w, channels = draw(st.integers(1, 5)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1.0, 1e-20, 1e20]))
    tokens = (
        torch.randn(batch, prefix + h * w, channels, generator=torch.Generator().manual_seed(seed)) * scale
    )
    if draw(st.integers(0, 9)) == 0:
        tokens[..., 0] = 0.0  # a constant (here: zero) channel
    if corrupt:
        damage = draw(st.integers(0, 12))
        if damage == 0:
            tokens[0, -1, 0] = float("nan")
        elif damage == 1:
            tokens[-1, 0, -1] = float("inf")
        elif damage == 2:
            tokens = tokens[:0]  # an empty batch
        elif damage == 3:
            tokens = tokens.to(torch.int64)
    return tokens, prefix, (h, w)


def _finite_input(tokens: torch.Tensor) -> bool:
    return tokens.is_floating_point() and tokens.shape[0] > 0 and bool(torch.isfinite(tokens).all())


def _check_partition(assignment: torch.Tensor, prefix: int, outputs: list[int], dropped_ok: bool) -> None:
    """Prefix token i -> output i; every patch token goes to one output (or -1 if dropping is allowed)
    and every non-prefix output receives at least one patch."""
    for row, total in zip(assignment, outputs, strict=True):
        assert torch.equal(row[:prefix], torch.arange(prefix))
        patches = row[prefix:]
        if not dropped_ok:
            assert (patches >= 0).all()
        kept = patches[patches >= 0]
        assert ((kept >= prefix) & (kept < total)).all()
        assert set(kept.tolist()) == set(range(prefix, total))


@examples(120)
@given(
    token_batches(),
    st.one_of(st.integers(-1, 30), st.just(2.5), st.lists(st.integers(0, 30), min_size=1, max_size=3)),
    st.sampled_from(["cosine", "dot", "l2"]),
    st.sampled_from([0.0, 0.3, -1.0, float("nan")]),
    st.sampled_from(["random", "zero", "nan", "wide"]),
)
def test_select_keeps_the_best_k_or_refuses(batch, k, score, diversity, query_kind) -> None:
    tokens, prefix, grid = batch
    channels = tokens.shape[-1]
    query = {
        "random": torch.randn(channels, generator=torch.Generator().manual_seed(1)),
        "zero": torch.zeros(channels),
        "nan": torch.full((channels,), float("nan")),
        "wide": torch.randn(channels + 1),
    }[query_kind]
    out = outcome(select, tokens, query, k, grid=grid, num_prefix=prefix, score=score, diversity=diversity)
    if out is None:
        return
    assert _finite_input(tokens) and query_kind == "random"
    ks = out.budgets
    assert ks == ([k] * tokens.shape[0] if isinstance(k, int) else k)
    _check_partition(out.assignment, prefix, [prefix + kb for kb in ks], dropped_ok=True)
    for b, row in enumerate(out.token_list()):
        assert torch.isfinite(row).all()
        assert torch.equal(row[:prefix], tokens[b, :prefix])  # prefix tokens passed through in front
        kept = (out.assignment[b, prefix:] >= 0).nonzero().squeeze(1) + prefix
        assert torch.equal(row[prefix:], tokens[b, kept])  # the kept tokens, in input order
        if diversity == 0.0:  # plain top-k: nothing dropped scores above anything kept
            scores = out.scores[b, prefix:]
            chosen = out.assignment[b, prefix:] >= 0
            if (~chosen).any():
                assert scores[chosen].min() >= scores[~chosen].max()


@examples(80)
@given(token_batches(), st.one_of(st.integers(-1, 30), st.lists(st.integers(1, 30), min_size=1, max_size=3)))
def test_pool_partitions_the_grid_or_refuses(batch, k) -> None:
    tokens, prefix, grid = batch
    out = outcome(pool, tokens, k, grid=grid, num_prefix=prefix)
    if out is None:
        return
    assert tokens.is_floating_point() and tokens.shape[0] > 0
    _check_partition(out.assignment, prefix, [prefix + kb for kb in out.budgets], dropped_ok=False)
    for b, row in enumerate(out.token_list()):
        assert torch.equal(row[:prefix], tokens[b, :prefix])
        counts = torch.bincount(out.assignment[b, prefix:] - prefix, minlength=out.budgets[b])
        sums = torch.zeros(out.budgets[b], tokens.shape[-1]).index_add_(
            0, out.assignment[b, prefix:] - prefix, tokens[b, prefix:]
        )
        if _finite_input(tokens):
            torch.testing.assert_close(
                row[prefix:], sums / counts[:, None], rtol=1e-4, atol=1e-6 * tokens.abs().max()
            )


weights = st.one_of(
    st.floats(0, 1e6, width=64),
    st.sampled_from([0.0, 1e-300, 5e-324, 1e300, float("nan"), float("inf"), -1.0]),
)


@examples(200)
@given(
    st.lists(weights, min_size=1, max_size=6),
    st.integers(-3, 40),
    st.integers(0, 3),
    st.one_of(st.none(), st.integers(0, 12)),
    st.one_of(st.none(), st.lists(weights, min_size=1, max_size=6)),
    st.floats(1e-30, 1e30),
)
def test_allocate_sums_exactly_and_ignores_scale(complexity, total, low, high, relevance, scale) -> None:
    c = torch.tensor(complexity, dtype=torch.float64)
    rel = None if relevance is None else torch.tensor(relevance, dtype=torch.float64)
    budgets = outcome(allocate, c, total, low, high, rel)
    slots = len(complexity)
    usable = all(math.isfinite(v) and v >= 0 for v in complexity + (relevance or []))
    shapes_ok = rel is None or len(rel) in (1, slots)
    feasible = (
        total >= 0 and slots * low <= total and (high is None or (high >= low and slots * high >= total))
    )
    assert (budgets is not None) == (usable and shapes_ok and feasible)
    if budgets is None:
        return
    assert int(budgets.sum()) == total
    assert (budgets >= low).all() and (high is None or (budgets <= high).all())

    # The same budgets whatever the scale of either score (where scaling neither overflows nor
    # underflows a score to zero: that would be another input).
    def representable(x: torch.Tensor) -> bool:
        return bool(torch.isfinite(x * scale).all() and torch.equal(x * scale == 0, x == 0))

    if representable(c):
        assert torch.equal(allocate(c * scale, total, low, high, rel), budgets)
    if rel is not None and representable(rel):
        assert torch.equal(allocate(c, total, low, high, rel * scale), budgets)


@examples(60)
@given(
    token_batches(), st.one_of(st.none(), st.integers(-1, 8)), st.sampled_from([0.0, 2.0, -1.0, float("nan")])
)
def test_cluster_slots_partition_the_patches_or_refuse(batch, num_slots, position_weight) -> None:
    tokens, prefix, grid = batch
    slots = outcome(
        cluster_slots,
        tokens,
        num_slots,
        grid=grid,
        num_prefix=prefix,
        max_slots=4,
        position_weight=position_weight,
    )
    if slots is None:
        return
    assert _finite_input(tokens)
    masks = slots.masks.flatten(2)  # [B, S, P]
    assert torch.equal(masks.sum(1), torch.ones_like(masks[:, 0], dtype=torch.long))  # one slot per patch
    for b in range(tokens.shape[0]):
        used = slots.assignment[b].unique().tolist()
        assert used == list(range(int(slots.num_slots[b])))  # ids 0..S_b-1, none skipped
        if num_slots is not None:
            assert len(used) <= num_slots


@examples(60)
@given(token_batches(corrupt=False), st.integers(0, 4), st.integers(-1, 30), st.integers(0, 2), st.booleans())
def test_compress_slots_hit_the_total_without_mixing_slots(batch, num_slots, total, low, with_query) -> None:
    tokens, prefix, grid = batch
    patches = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(total + 7)
    labels = torch.randint(0, max(num_slots, 1), (tokens.shape[0], patches), generator=gen)
    slots = Slots.from_assignment(labels, grid)
    query = torch.randn(tokens.shape[-1], generator=gen) if with_query else None
    out = outcome(compress_slots, tokens, slots, total, num_prefix=prefix, min_per_slot=low, query=query)
    counts = slots.counts()
    floor = int(torch.minimum(counts, torch.full_like(counts, max(low, 1))).sum(1).max())  # a slot keeps >= 1
    feasible = floor <= total <= int(counts.sum(1).min())
    assert (out is not None) == feasible
    if out is None:
        return
    assert out.budgets == [total] * tokens.shape[0]
    _check_partition(out.assignment, prefix, [prefix + total] * tokens.shape[0], dropped_ok=False)
    for b in range(tokens.shape[0]):
        assert torch.isfinite(out.token_list()[b]).all()
        assert torch.equal(out.token_list()[b][:prefix], tokens[b, :prefix])
        ids, sizes, assign = out.slot_ids[b], out.sizes[b], out.assignment[b, prefix:] - prefix
        assert torch.equal(ids[assign], slots.assignment[b])  # every patch's output is in its own slot
        assert float(sizes.sum()) == patches  # sizes account for every patch once
        assert int(out.slot_budgets[b].sum()) == total


@examples(100)
@given(token_batches(), st.sampled_from(["none", "ones", "random", "zeros", "negative", "nan"]))
def test_token_entropy_is_a_fraction_or_refuses(batch, sizes_kind) -> None:
    tokens = batch[0]
    shape = tokens.shape[:2]
    sizes = {
        "none": None,
        "ones": torch.ones(shape),
        "random": torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 4,
        "zeros": torch.zeros(shape),
        "negative": -torch.ones(shape),
        "nan": torch.full(shape, float("nan")),
    }[sizes_kind]
    entropy = outcome(tb.token_entropy, tokens, sizes)
    if entropy is None:
        return
    assert bool(torch.isfinite(tokens.double()).all())
    assert sizes is None or bool(((sizes >= 0) & torch.isfinite(sizes)).all())
    assert entropy.shape == (tokens.shape[0],)
    assert torch.isfinite(entropy).all() and ((entropy >= 0) & (entropy <= 1)).all()
    if tokens.is_floating_point() and sizes_kind in ("none", "ones"):  # directions only: scale-free
        torch.testing.assert_close(tb.token_entropy(tokens * 1e15, sizes), entropy, atol=1e-4, rtol=1e-4)
