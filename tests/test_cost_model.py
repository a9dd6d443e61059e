"""The cost model: merge only where it pays, decided from a cost table (fixed tables here, so the
schedules do not depend on timing noise; one test measures a real table and checks only its form)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenbudget as tb
from conftest import make_tiny
from tokenbudget.bench.ceiling import free_reduction_copy
from tokenbudget.cost import MIN_GAIN, CostModel, CostTable, plan_with_costs, schedule_time
from tokenbudget.ops.match import max_mergeable
from tokenbudget.schedule import clamp_schedule

COUNTS = (5, 20, 40, 65)  # the tiny models have 65 tokens


def table(reduce_s: float, batch_size: int = 2, threads: int | None = None, **kwargs) -> CostTable:
    """Block times affine in the tokens (1 ms + 20 us/token each branch), a fixed merge cost."""
    branch = tuple(1e-3 + 20e-6 * n for n in COUNTS)
    return CostTable(
        token_counts=COUNTS,
        attention_s=branch,
        masked_attention_s=branch,
        mlp_s=branch,
        reduce_s=(reduce_s,) * len(COUNTS),
        batch_size=batch_size,
        threads=torch.get_num_threads() if threads is None else threads,
        **kwargs,
    )


def vit_s_batch1_table() -> CostTable:
    """Roughly ViT-S/16 at batch 1 on 2 CPU threads: 0.25 ms to merge, branches of a few ms."""
    counts = (10, 50, 100, 150, 197)
    return CostTable(
        token_counts=counts,
        attention_s=tuple(0.3e-3 + 12e-6 * n + 2e-8 * n * n for n in counts),
        masked_attention_s=tuple(0.31e-3 + 12e-6 * n + 2e-8 * n * n for n in counts),
        mlp_s=tuple(0.35e-3 + 18e-6 * n for n in counts),
        reduce_s=(0.25e-3,) * len(counts),
    )


def test_free_merging_keeps_the_plan() -> None:
    """A merge that costs nothing always pays: the schedule is the plan, exactly."""
    planned = clamp_schedule([8] * 4, 65, 1)
    plan = plan_with_costs(planned, 65, 1, table(0.0))
    assert plan.merged == planned and plan.skipped == [] and plan.met


@pytest.mark.parametrize("r", [1, 2, 4, 8, 16])
def test_small_budgets_at_batch_1_merge_fewer_times_and_meet_the_budget(r: int) -> None:
    t = vit_s_batch1_table()
    planned = clamp_schedule([r] * 12, 197, 1)
    plan = plan_with_costs(planned, 197, 1, t)
    assert plan.met and sum(plan.merged) == sum(planned)  # the same final token count
    assert plan.seconds <= plan.planned_seconds and plan.seconds < plan.unreduced_seconds
    assert plan.skipped == [layer for layer, m in enumerate(plan.merged) if m == 0 and planned[layer] > 0]
    if r <= 4:
        assert plan.skipped  # the late, small merges do not pay at batch 1
    assert clamp_schedule(plan.merged, 197, 1) == plan.merged  # within the bipartite limit


def test_a_budget_that_cannot_pay_merges_nothing_and_says_so() -> None:
    planned = clamp_schedule([1] * 4, 65, 1)
    plan = plan_with_costs(planned, 65, 1, table(1.0))  # a second per merge
    assert plan.merged == [0, 0, 0, 0] and not plan.met and plan.skipped == [0, 1, 2, 3]
    assert plan.seconds == plan.unreduced_seconds


@settings(max_examples=150, deadline=None)
@given(
    st.integers(20, 120),
    st.integers(0, 3),
    st.lists(st.integers(0, 30), min_size=2, max_size=10),
    st.floats(0.0, 5e-3),
    st.floats(1e-6, 1e-4),
)
def test_cost_plans_are_feasible_and_never_slower(num_tokens, prefix, requested, reduce_s, per_token) -> None:
    counts = (2, num_tokens // 2, num_tokens)
    t = CostTable(
        token_counts=tuple(sorted(set(counts))),
        attention_s=tuple(per_token * n for n in sorted(set(counts))),
        masked_attention_s=tuple(1.05 * per_token * n for n in sorted(set(counts))),
        mlp_s=tuple(1e-4 + per_token * n for n in sorted(set(counts))),
        reduce_s=(reduce_s,) * len(set(counts)),
    )
    planned = clamp_schedule(requested, num_tokens, prefix)
    plan = plan_with_costs(planned, num_tokens, prefix, t)
    n = num_tokens
    for m in plan.merged:  # every block within the bipartite limit
        assert 0 <= m <= max_mergeable(n, prefix)
        n -= m
    # never slower than the plan; slower than no reduction at most within the noise margin
    margin = MIN_GAIN * plan.unreduced_seconds
    assert plan.seconds <= plan.planned_seconds + 1e-12
    assert plan.seconds <= plan.unreduced_seconds + margin + 1e-12
    if plan.merged != planned:  # leaving the plan must be worth it
        assert plan.seconds <= plan.planned_seconds - margin + 1e-12
    if plan.met:
        assert sum(plan.merged) == sum(planned)
    else:  # only when no schedule of the planned total beats no reduction: a subset of the plan
        assert plan.planned_seconds >= plan.unreduced_seconds
        assert all(m in (0, p) for m, p in zip(plan.merged, planned, strict=True))
    assert abs(plan.seconds - schedule_time(t, num_tokens, plan.merged)) < 1e-12


def test_table_fit_ignores_a_slow_outlier_and_round_trips() -> None:
    counts = (4, 9, 19, 41, 90, 138, 197)
    values = [1e-3 + 10e-6 * n for n in counts]
    values[-1] *= 5  # one timing hit by another process
    t = CostTable(counts, tuple(values), tuple(values), tuple(values), tuple(values))
    assert t.mlp(197) == pytest.approx(1e-3 + 10e-6 * 197, rel=1e-6)
    assert CostTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="ascending"):
        CostTable((5, 4), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="one non-negative time"):
        CostTable((4, 5), (1.0,), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))


def test_cost_model_option_is_validated_and_off_by_default() -> None:
    assert tb.ToMe(r=4).cost_model == "off"
    config = tb.ToMe(r=4, cost_model="auto")
    assert tb.config_from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="cost_model"):
        tb.ToMe(r=4, cost_model="fast")
    model = tb.apply(make_tiny("vit"), tb.ToMe(r=4))
    with pytest.raises(ValueError, match="without a cost model"):
        tb.cost_model(model)


def _run(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("variant", ["vit", "dinov2_registers"])
def test_a_table_where_everything_pays_changes_nothing(variant: str, images: torch.Tensor) -> None:
    """Bit for bit ToMe when the cost model skips nothing."""
    reference = tb.apply(make_tiny(variant), tb.ToMe(r=6))
    model = tb.apply(make_tiny(variant), tb.ToMe(r=6, cost_model="auto"))
    tokens = 65 + model.num_prefix_tokens - 1
    tb.set_cost_table(model, table(0.0, batch_size=images.shape[0]), tokens)
    assert torch.equal(_run(model, images), _run(reference, images))
    state = tb.last_state(model)
    assert state.skipped_layers == [] and state.merged_per_layer == tb.last_state(reference).merged_per_layer


def test_costly_merges_move_to_the_blocks_that_pay(images: torch.Tensor) -> None:
    """With a fixed table the schedule is the cost plan's, the budget is met, and the output is
    ToMe's with that schedule."""
    model = tb.apply(make_tiny("vit"), tb.ToMe(r=3, cost_model="auto"))
    costly = table(0.5e-3, batch_size=images.shape[0])  # 3 merges save 60-420 us, 6 save 600-840 us
    tb.set_cost_table(model, costly, 65)
    out = _run(model, images)
    state = tb.last_state(model)
    expected = plan_with_costs(clamp_schedule([3] * 4, 65, 1), 65, 1, costly)
    assert expected.merged == [6, 6, 0, 0] and state.skipped_layers == expected.skipped == [2, 3]
    assert state.merged_per_layer == expected.merged and state.tokens_per_layer[-1] == 65 - 12
    assert state.requested_per_layer == [3] * 4
    assert state.summary()["skipped_layers"] == expected.skipped
    same_schedule = tb.apply(make_tiny("vit"), tb.ToMe(r=expected.merged))
    assert torch.equal(out, _run(same_schedule, images))
    # the ceiling model of the bench follows the same schedule
    free = free_reduction_copy(make_tiny("vit"), model)
    _run(free, images)
    assert tb.last_state(free).merged_per_layer == expected.merged


def test_tables_are_per_batch_size(images: torch.Tensor) -> None:
    model = tb.apply(make_tiny("vit"), tb.ToMe(r=3, cost_model="auto"))
    tb.set_cost_table(model, table(1.0, batch_size=1), 65)  # batch 1: nothing pays
    tb.set_cost_table(model, table(0.0, batch_size=3), 65)  # batch 3: everything pays
    with pytest.warns(UserWarning, match="merging does not pay"):
        _run(model, images[:1])
    assert tb.last_state(model).merged_per_layer == [0, 0, 0, 0]
    _run(model, images)
    assert tb.last_state(model).merged_per_layer == [3, 3, 3, 3]


def test_measured_table_has_the_form_and_is_cached_on_disk(tmp_path, monkeypatch, images) -> None:
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path))
    model = tb.apply(make_tiny("vit"), tb.ToMe(r=3, cost_model="auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # whether merging pays on this machine is not the point
        _run(model, images)
    (measured,) = tb.cost_model(model).tables.values()
    assert measured.token_counts[-1] == 65 and measured.batch_size == images.shape[0]
    assert all(v > 0 for v in measured.attention_s + measured.mlp_s + measured.reduce_s)
    files = list((tmp_path / "costs").glob("*.json"))
    assert len(files) == 1 and CostTable.from_dict(json.loads(files[0].read_text())) == measured
    # A second model of the same architecture reads the table instead of measuring.
    again = tb.apply(make_tiny("vit", seed=1), tb.ToMe(r=3, cost_model="auto"))

    def no_measuring(x: torch.Tensor) -> CostTable:
        raise AssertionError("measured again")

    tb.cost_model(again).measure = no_measuring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(again, images)
    assert tb.cost_model(again).tables[CostModel.key(torch.empty(3, 65, 1))] == measured
    # the forward that measured left the model's outputs as a plain ToMe forward on that schedule
    schedule = tb.last_state(model).merged_per_layer
    plain = tb.apply(make_tiny("vit"), tb.ToMe(r=schedule))
    assert torch.equal(_run(model, images), _run(plain, images))


@pytest.mark.parametrize("family", ["hf_vit", "openclip"])
def test_cost_tables_are_measured_on_hf_and_openclip(family: str, tmp_path, monkeypatch, images) -> None:
    """The measurement runs each adapter's own branches; with a table that makes merging costly, the
    schedule moves as on timm."""
    monkeypatch.setenv("TOKENBUDGET_COST_CACHE", str(tmp_path))
    if family == "hf_vit":
        pytest.importorskip("transformers")
        from hf_models import make_hf

        model, run = make_hf("vit"), None
    else:
        pytest.importorskip("open_clip")
        from openclip_models import make_openclip

        model = make_openclip("avg")
        run = model.encode_image
    tb.apply(model, tb.ToMe(r=3, cost_model="auto"))
    forward = run or model
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        forward(images)
    (measured,) = tb.cost_model(model).tables.values()
    assert measured.token_counts[-1] == 65 and all(v > 0 for v in measured.attention_s + measured.reduce_s)
    tb.set_cost_table(model, table(0.5e-3, batch_size=images.shape[0]), 65)
    with torch.no_grad():
        forward(images)
    assert tb.last_state(model).merged_per_layer == [6, 6, 0, 0]
