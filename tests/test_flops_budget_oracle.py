"""FLOPs budgets beyond the even schedule's reach (the geometric schedule, `ScheduledKeep`) and the
oracle headroom of per-image budgets: the pure allocation, the harness rows and the eval CLI."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import tokenbudget as tb
from conftest import write_two_class_folder
from tokenbudget.bench import reach
from tokenbudget.cli import main
from tokenbudget.evaluate import (
    ScheduledKeep,
    budget_for_flops_speedup,
    keep_for_flops_speedup,
    method_config,
)
from tokenbudget.evaluate.oracle import oracle_allocation, oracle_headroom
from tokenbudget.strategies.per_image import schedule_flops
from tokenbudget.strategies.per_image_levels import MAX_RATE, rate_schedule

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tb.models.load_model("vit_tiny_patch16_224", img_size=64).eval()


def beyond_even_reach(model: torch.nn.Module) -> float:
    """A speedup past the even schedule's reach and within the geometric schedule's, from the model."""
    g = reach.geometry_of(model)
    geometric = 1.0 / schedule_flops(g.tokens, rate_schedule(g.tokens, g.prefix, g.layers, MAX_RATE), g.dims)
    even = reach.fastest_keep(g)[1]
    assert geometric > even + 0.2, (geometric, even)  # the geometric schedule front-loads: it reaches further
    return round((even + geometric) / 2, 2)


# -- budgets -------------------------------------------------------------------------------------
def test_reachable_speedups_stay_the_even_keep(model) -> None:
    budget = budget_for_flops_speedup(model, 1.5)
    assert type(budget) is float and budget == keep_for_flops_speedup(model, 1.5)
    assert method_config("tome", budget) == tb.ToMe(keep=budget)


def test_beyond_the_even_reach_every_method_runs_one_geometric_schedule(model) -> None:
    speedup = beyond_even_reach(model)
    with pytest.raises(ValueError, match="out of reach"):
        keep_for_flops_speedup(model, speedup)
    budget = budget_for_flops_speedup(model, speedup)
    assert isinstance(budget, ScheduledKeep)
    g = reach.geometry_of(model)
    cost = schedule_flops(g.tokens, budget.counts, g.dims)
    assert budget.speedup == pytest.approx(1.0 / cost)
    assert speedup <= budget.speedup < speedup * 1.1  # reaches it; 17 tokens leave coarse integer steps
    assert float(budget) == pytest.approx((g.tokens - sum(budget.counts) - g.prefix) / (g.tokens - g.prefix))
    for method in ("tome", "auto", "tofu", "random", "pool"):
        config = method_config(method, budget)
        assert config.r == list(budget.counts) and config.keep is None
        assert reach.config_speedup(g, config) == pytest.approx(budget.speedup)
    per_image = method_config("per-image", budget)
    assert per_image.flops_speedup == budget.speedup and per_image.keep is None
    with pytest.raises(ValueError, match="no per-layer schedule"):
        method_config("prune", budget)
    # a budget is a value: copies and pickles keep its schedule, and it keys as its float
    for twin in (copy.deepcopy(budget), pickle.loads(pickle.dumps(budget))):
        assert twin == budget and twin.counts == budget.counts and twin.speedup == budget.speedup
    assert {float(budget): 1}[budget] == 1


def test_a_speedup_past_merging_half_of_every_block_names_the_reach(model) -> None:
    with pytest.raises(
        ValueError, match=r"merging half of the tokens in every block gives [\d.]+; choose one in"
    ):
        budget_for_flops_speedup(model, 50.0)


# -- the oracle ----------------------------------------------------------------------------------
FLOPS = (1.0, 0.5, 0.25)  # levels from the most tokens to the fewest


def test_oracle_moves_the_cheapest_fixes_first_within_the_budget() -> None:
    ok = torch.tensor(
        [
            [True, True, True],  # right everywhere: stays at the cheapest level, free
            [True, True, False],  # needs 0.5: costs 0.25 more
            [True, False, False],  # needs full tokens: costs 0.75 more
            [False, False, False],  # never right: stays at the cheapest
        ]
    )
    # spare above all-cheapest: 4 * (target - 0.25); 0.3125 leaves 0.25, enough for image 1 only
    levels = oracle_allocation(ok, FLOPS, 0.3125)
    assert levels.tolist() == [2, 1, 2, 2]
    assert float(torch.tensor(FLOPS)[levels].mean()) <= 0.3125
    assert oracle_allocation(ok, FLOPS, 0.5).tolist() == [2, 1, 0, 2]  # room for both fixes
    assert oracle_allocation(ok, FLOPS, 0.25).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="below the cheapest level"):
        oracle_allocation(ok, FLOPS, 0.2)
    with pytest.raises(ValueError, match=r"one column per level"):
        oracle_allocation(ok[:, :2], FLOPS, 0.5)


def test_oracle_is_never_below_any_single_level_at_the_same_flops() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=g)
    # level k: each image is right with probability falling with the level's FLOPs
    right = torch.rand(200, 3, generator=g) < torch.tensor([0.9, 0.7, 0.5])
    feats = torch.stack([torch.where(right[:, k], labels, (labels + 1) % 3) for k in range(3)], dim=1)
    predict = lambda f: (f, f)  # noqa: E731 - the "features" are the predictions
    oracle = oracle_headroom(
        feats[..., None].float(), FLOPS, (1.0, 2.0, 4.0), 0.5, lambda f: predict(f[:, 0].long()), labels
    )
    assert oracle.knn_flops <= 0.5 + 1e-9 and oracle.linear_flops <= 0.5 + 1e-9
    assert oracle.knn_acc >= float(right[:, 1].float().mean())  # the fixed level at 0.5 FLOPs
    assert oracle.knn_acc == oracle.linear_acc and oracle.level_speedups == (1.0, 2.0, 4.0)


# -- the eval command ----------------------------------------------------------------------------
def test_eval_runs_a_speedup_beyond_the_even_reach_and_reports_the_oracle(model, tmp_path, capsys) -> None:
    folder = str(write_two_class_folder(tmp_path / "data"))
    speedup = beyond_even_reach(model)
    argv = ["eval", *TINY, "--data", folder, "--methods", "tome,auto,per-image", "--speed-samples", "1"]
    assert main([*argv, "--flops-speedup", f"1.5,{speedup}", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    far = [r for r in rows if r["config"].get("r") is not None or r["config"].get("flops_speedup")]
    assert {r["method"] for r in far} == {"tome", "auto", "per-image"}
    for r in far:
        if r["method"] == "per-image":
            assert r["config"]["target_flops"] == pytest.approx(1.0 / speedup, rel=0.1)
        else:
            assert r["flops_ratio"] == pytest.approx(1.0 / speedup, rel=0.1)  # the budget is spent
    per_image = [r for r in rows if r["method"] == "per-image"]
    assert len(per_image) == 2 and all(
        0 <= r["oracle_knn"] <= 1 and 0 <= r["oracle_linear"] <= 1 for r in per_image
    )
    assert all(r["oracle_knn"] is None for r in rows if r["method"] != "per-image")
    assert main([*argv, "--flops-speedup", str(speedup)]) == 0
    out = capsys.readouterr().out
    assert "oracle headroom" in out and "best fixed at this budget" in out and "SE <=" in out
