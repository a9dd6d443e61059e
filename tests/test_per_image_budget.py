"""Per-image budgets spend what they are given: hold_budget, calibration within 1 %, Auto levels, eval's warning."""

from __future__ import annotations

import pytest
import torch

import tokenbudget as tb
from conftest import make_tiny
from tokenbudget.adapters import find_adapter
from tokenbudget.adaptive.per_image import calibrate_per_image, config_level_plan, glance_scores, input_tokens
from tokenbudget.evaluate.quality import EvalRow
from tokenbudget.evaluate.tables import budget_warnings
from tokenbudget.ops.budget_fit import hold_budget, mean_level_flops
from tokenbudget.ops.glance import level_index
from tokenbudget.strategies.auto import AutoStrategy
from tokenbudget.strategies.per_image_levels import level_strategy
from tokenbudget.strategies.tome import ToMeStrategy

FLOPS = (1.0, 0.8, 0.5, 0.33)


def _spent(thresholds, scores) -> float:
    index = level_index(scores.double(), torch.tensor(thresholds, dtype=torch.float64), len(FLOPS))
    return mean_level_flops(index, FLOPS)


@pytest.mark.parametrize("target", [0.4, 0.5, 0.62, 0.9])
def test_hold_budget_lands_on_the_target_from_any_start(target) -> None:
    scores = torch.rand(300, generator=torch.Generator().manual_seed(3))
    for start in [
        (-1.0, -1.0, -1.0),
        (2.0, 2.0, 2.0),
        (0.2, 0.5, 0.8),
    ]:  # all dearest, all cheapest, a spread
        held = hold_budget(start, scores, FLOPS, target, 0.005)
        assert abs(_spent(held, scores) / target - 1) <= 0.005
        assert list(held) == sorted(held)  # still a staircase


def test_hold_budget_moves_a_block_of_equal_scores_together() -> None:
    """Equal scores cannot be split by a threshold: the held budget counts them as one block."""
    scores = torch.cat([torch.zeros(100), torch.linspace(0.1, 1.0, 100)])
    held = hold_budget((2.0, 2.0, 2.0), scores, FLOPS, 0.6, 0.005)
    levels = level_index(scores.double(), torch.tensor(held, dtype=torch.float64), len(FLOPS))
    assert len(set(levels[:100].tolist())) == 1
    assert abs(_spent(held, scores) / 0.6 - 1) <= 0.02


def test_hold_budget_rejects_an_unreachable_target() -> None:
    with pytest.raises(ValueError, match="out of reach"):
        hold_budget((0.0, 0.0, 0.0), torch.rand(10), FLOPS, 0.2)


def _images(batch: int, seed: int) -> torch.Tensor:
    """Random images, a third of them black but for one bright patch (most tokens exact duplicates)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    x[: batch // 3] = 0.0
    for i in range(batch // 3):
        r, c = (int(v) for v in torch.randint(0, 28, (2,), generator=g))
        x[i, :, r : r + 4, c : c + 4] = 1.0 + torch.rand(1, generator=g)
    return x


@pytest.mark.parametrize("rule", ["fit", "spread"])
def test_calibration_holds_the_mean_flops_within_one_percent(rule) -> None:
    model = make_tiny("dinov2_layerscale")
    images, glance = _images(30, 1), _images(90, 2)
    levels = (1.0, 1.5, 2.0, 3.0)
    for speedup in (1.4, 2.0):
        for extra in (None, glance):
            cfg = calibrate_per_image(
                model, images, flops_speedup=speedup, levels=levels, rule=rule, glance_images=extra
            )
            held = images if extra is None else extra
            plan = config_level_plan(model, cfg, input_tokens(find_adapter(model), images))
            scores = glance_scores(model, held, cfg)
            index = level_index(scores, torch.tensor(cfg.thresholds, dtype=torch.float64), len(plan.flops))
            spent = mean_level_flops(index, plan.flops)
            assert abs(spent / cfg.target_flops - 1) <= 0.01, (speedup, rule, spent, cfg.target_flops)
            assert cfg.calibrated_flops == pytest.approx(spent, abs=1e-6)


def test_levels_run_auto_by_default_and_tome_on_request() -> None:
    assert tb.PerImage(flops_speedup=2).reducer == "auto"
    assert isinstance(level_strategy("auto", True, 4, keep=0.5), AutoStrategy)
    assert isinstance(level_strategy("auto", True, 4, rate=0.2), AutoStrategy)
    assert isinstance(level_strategy("tome", True, 4, rate=0.2), ToMeStrategy)
    with pytest.raises(ValueError, match="reducer must be one of"):
        tb.PerImage(flops_speedup=2, reducer="pool")
    model = make_tiny("dinov2_layerscale")
    images = _images(24, 4)
    cfg = calibrate_per_image(model, images, keep=0.2, levels=(1.0, 1.5, 2.0, 3.0))
    assert cfg.reducer == "auto"
    plan = config_level_plan(model, cfg, input_tokens(find_adapter(model), images))
    with torch.no_grad():
        tb.apply(model, cfg)
        out = model(images)
        state = tb.last_state(model)
        tb.apply(model, tb.Auto(keep=plan.anchor_keep))
        fixed = model(images)
        tb.remove(model)
    at_anchor = torch.tensor([s == plan.speedups[plan.anchor] for s in state.speedups.tolist()])
    assert at_anchor.any()
    # images at the anchored level are exactly the fixed Auto budget
    torch.testing.assert_close(out[at_anchor], fixed[at_anchor], atol=1e-4, rtol=1e-4)


def _row(method: str, keep: float, flops: float, config: dict | None = None) -> EvalRow:
    return EvalRow(method, keep, config or {}, 0.5, 0.0, 0.5, 0.0, 0.99, 1.0, 2.0, flops, None, 10, 20)


def test_eval_warns_when_a_row_misses_its_flops_target_by_more_than_three_percent() -> None:
    rows = [
        _row("full", 1.0, 1.0),
        _row("tome", 0.3, 0.499),
        _row("per-image", 0.3, 0.395, {"target_flops": 0.499}),
        _row("auto", 0.3, 0.51),
    ]
    lines = budget_warnings(rows, {0.3: 0.5})
    assert len(lines) == 1 and "per-image" in lines[0] and "-20.8 %" in lines[0]
    rows[2] = _row("per-image", 0.3, 0.490, {"target_flops": 0.499})
    assert budget_warnings(rows, {0.3: 0.5}) == []
    assert len(budget_warnings(rows, {0.3: 0.45})) == 2  # tome and auto now miss 0.45 by > 3 %
