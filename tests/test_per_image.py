"""tb.PerImage: a glance picks each image's budget level; grouped, in-order, calibrated forwards."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import tokenbudget as tb
from conftest import assert_concurrent_forwards_match, make_tiny
from tokenbudget.adapters import find_adapter
from tokenbudget.adaptive.per_image import calibrate_per_image, model_level_plan
from tokenbudget.ops.budget_fit import (
    fit_staircase,
    fit_staircase_within,
    profile_shares,
    thresholds_for_shares,
)
from tokenbudget.ops.glance import best_match_similarity, level_index, redundancy_need, spread_need
from tokenbudget.strategies.per_image import rate_for_speedup, rate_schedule, resolve_levels, schedule_flops

LEVELS = (1.0, 1.5, 2.0, 3.0)


def _images(batch: int = 12, seed: int = 0) -> torch.Tensor:
    """Random images, a third of them nearly flat (their tokens are near-duplicates)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    x[: batch // 3] *= 0.01
    return x


@pytest.fixture
def model() -> torch.nn.Module:
    return make_tiny("dinov2_layerscale")


@pytest.fixture
def config(model: torch.nn.Module) -> tb.PerImage:
    return calibrate_per_image(model, _images(24, seed=5), flops_speedup=2, levels=LEVELS)


# -- glance scores -----------------------------------------------------------------------------


def test_redundancy_need_is_zero_for_duplicates_and_orders_by_similarity() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 8, generator=g)
    duplicates = base.expand(1, 10, 8).clone()
    noisy = duplicates + 0.3 * torch.randn(1, 10, 8, generator=g)
    random = torch.randn(1, 10, 8, generator=g)
    need = redundancy_need(torch.cat([duplicates, noisy, random]), 0)
    assert need[0].abs() < 1e-6
    assert need[0] < need[1] < need[2]
    # The edges are each A token's best B partner, sorted: the first is the best over all pairs.
    x = random[0:1]
    best = best_match_similarity(x, 0)
    unit = x / x.norm(dim=-1, keepdim=True)
    pairs = unit[0, 0::2] @ unit[0, 1::2].T
    assert torch.allclose(best[0, 0], pairs.max())
    assert (best[0, :-1] >= best[0, 1:]).all()


def test_redundancy_need_skips_prefix_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 4, generator=g)
    odd = x.clone()
    odd[:, 0] = 100.0  # a prefix token: never matched, so it cannot change the score
    assert torch.allclose(redundancy_need(x, 1), redundancy_need(odd, 1))


def test_spread_need_bounds() -> None:
    same = torch.ones(1, 6, 4)
    opposite = torch.cat([torch.ones(1, 3, 4), -torch.ones(1, 3, 4)], dim=1)
    need = spread_need(torch.cat([same, opposite]))
    assert torch.allclose(need, torch.tensor([0.0, 1.0]), atol=1e-6)


def test_level_index_gives_low_scores_the_cheapest_level() -> None:
    scores = torch.tensor([0.0, 0.15, 0.25, 0.9])
    index = level_index(scores, torch.tensor([0.1, 0.2, 0.3]), 4)
    assert index.tolist() == [3, 2, 1, 0]
    with pytest.raises(ValueError, match="3 thresholds"):
        level_index(scores, torch.tensor([0.1, 0.2]), 4)


def test_glance_scores_reject_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        redundancy_need(torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="fraction"):
        redundancy_need(torch.randn(1, 8, 4), 0, fraction=0.0)


# -- levels and calibration ----------------------------------------------------------------------


def test_rate_schedule_is_geometric_and_respects_the_bipartite_limit() -> None:
    counts = rate_schedule(257, 1, 12, 0.5)
    assert counts[0] == 128  # half of the 256 mergeable tokens
    n = 257
    for r in counts:
        assert r <= (n - 1) // 2
        n -= r
    assert rate_schedule(257, 1, 12, 0.0) == [0] * 12
    with pytest.raises(ValueError, match="rate"):
        rate_schedule(257, 1, 12, 0.7)


def test_levels_meet_their_speedups(model: torch.nn.Module) -> None:
    dims = find_adapter(model).block_dims()
    plan = resolve_levels(LEVELS, 65, 1, dims)
    assert plan.flops[0] == 1.0 and plan.rates[0] == 0.0
    for speedup, flops, merged in zip(plan.speedups, plan.flops, plan.merged, strict=True):
        assert flops == pytest.approx(schedule_flops(65, merged, dims))
        # Integer counts overshoot the target a little, never undershoot it.
        assert 1 / flops >= speedup - 1e-9
        assert 1 / flops < speedup * 1.15
    assert list(plan.flops) == sorted(plan.flops, reverse=True)
    with pytest.raises(ValueError, match="out of reach"):
        rate_for_speedup(65, 1, dims, 50.0)


def test_thresholds_for_shares_split_scores_as_asked() -> None:
    scores = torch.arange(100, dtype=torch.float64)
    shares = [0.1, 0.2, 0.3, 0.4]  # first level (most tokens) gets the top 10 %
    thresholds = thresholds_for_shares(scores, shares)
    counts = torch.bincount(level_index(scores, torch.tensor(thresholds), 4), minlength=4)
    assert counts.tolist() == [10, 20, 30, 40]
    assert (level_index(scores, torch.tensor(thresholds), 4)[scores >= 90] == 0).all()


def test_profile_shares_meet_the_target() -> None:
    flops = [1.0, 0.66, 0.5, 0.33]
    for target in (0.4, 0.5, 0.8):
        shares = profile_shares(target, flops)
        assert sum(shares) == pytest.approx(1.0)
        assert sum(s * f for s, f in zip(shares, flops, strict=True)) == pytest.approx(target, abs=1e-6)
        assert all(s > 0 for s in shares)  # every level stays in use
    with pytest.raises(ValueError, match="out of reach"):
        profile_shares(0.2, flops)


def test_fit_staircase_spends_tokens_where_quality_drops() -> None:
    # 40 images; the 10 with the highest scores lose a lot at the cheap levels, the rest nothing.
    scores = torch.linspace(0, 1, 40, dtype=torch.float64)
    flops = [1.0, 0.5, 0.25]
    quality = torch.ones(40, 3, dtype=torch.float64)
    quality[30:, 1:] = torch.tensor([0.5, 0.2], dtype=torch.float64)
    target = (10 * 1.0 + 30 * 0.25) / 40  # exactly: needy images at full, the rest at the cheapest
    thresholds = fit_staircase(scores, quality, flops, target)
    index = level_index(scores, torch.tensor(thresholds, dtype=torch.float64), 3)
    assert index[30:].tolist() == [0] * 10
    assert index[:30].tolist() == [2] * 30
    # A tighter budget: the mean FLOPs never exceeds it, and the needy images keep the most.
    thresholds = fit_staircase(scores, quality, flops, 0.35)
    index = level_index(scores, torch.tensor(thresholds, dtype=torch.float64), 3)
    assert torch.tensor(flops, dtype=torch.float64)[index].mean() <= 0.35 + 1e-9
    assert index[30:].float().mean() < index[:30].float().mean()
    with pytest.raises(ValueError, match="out of reach"):
        fit_staircase(scores, quality, flops, 0.1)


def test_fit_staircase_within_holds_the_budget_on_more_images() -> None:
    # The calibration images are evenly spread; the other images crowd at high scores, so thresholds
    # fit to the calibration images alone overspend on them.
    scores = torch.linspace(0, 1, 40, dtype=torch.float64)
    flops = [1.0, 0.5, 0.25]
    quality = torch.ones(40, 3, dtype=torch.float64)
    quality[20:, 1:] = torch.tensor([0.6, 0.3], dtype=torch.float64)
    crowd = torch.cat([torch.linspace(0, 1, 100), torch.full((100,), 0.95)]).double()
    target = 0.5

    def spent(thresholds: tuple[float, ...], on: torch.Tensor) -> float:
        index = level_index(on, torch.tensor(thresholds, dtype=torch.float64), 3)
        return float(torch.tensor(flops, dtype=torch.float64)[index].mean())

    alone = fit_staircase(scores, quality, flops, target)
    assert spent(alone, scores) <= target + 1e-9 and spent(alone, crowd) > target + 0.05
    within = fit_staircase_within(scores, quality, flops, target, crowd)
    assert spent(within, crowd) <= target + 1e-9
    assert spent(within, crowd) > target - 0.05  # lowered only as far as needed
    # a budget the other images already meet leaves the fit as it was
    assert fit_staircase_within(scores, quality, flops, target, scores) == alone


def test_calibration_meets_the_target_on_its_images(model: torch.nn.Module) -> None:
    images = _images(40, seed=3)
    for rule in ("fit", "spread"):
        cfg = calibrate_per_image(model, images, flops_speedup=1.6, levels=LEVELS, rule=rule)
        assert cfg.target_flops == pytest.approx(1 / 1.6)
        # Achieved on the calibration images: within one image's worth of the target.
        assert abs(cfg.calibrated_flops - cfg.target_flops) < 1.0 / len(images)
        # and held within 0.5 % of it (or the closest the images' levels allow)
        assert abs(cfg.calibrated_flops / cfg.target_flops - 1) <= max(0.005, 0.5 / len(images))
        tb.apply(model, cfg)
        model(images)
        assert tb.last_state(model).mean_flops == pytest.approx(cfg.calibrated_flops, abs=1e-6)
        tb.remove(model)
    # keep= targets the FLOPs of ToMe at that keep.
    keep_cfg = calibrate_per_image(model, images, keep=0.5, levels=LEVELS, rule="spread")
    tb.apply(model, tb.ToMe(keep=0.5))
    model(images[:1])
    state = tb.last_state(model)
    tb.remove(model)
    per_layer = state.tokens_per_layer
    dims = find_adapter(model).block_dims()
    merged = [a - b for a, b in zip([state.input_tokens, *per_layer], per_layer, strict=False)]
    assert keep_cfg.target_flops == pytest.approx(schedule_flops(state.input_tokens, merged, dims))


# -- config ------------------------------------------------------------------------------------


def test_config_round_trips_and_validates(config: tb.PerImage) -> None:
    assert config.thresholds is not None and len(config.thresholds) == len(LEVELS) - 1
    again = tb.config_from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["method"] == "per-image"
    with pytest.raises(ValueError, match="exactly one mean budget"):
        tb.PerImage()
    with pytest.raises(ValueError, match="exactly one mean budget"):
        tb.PerImage(keep=0.5, flops_speedup=2)
    with pytest.raises(ValueError, match="unknown policy"):
        tb.PerImage(flops_speedup=2, policy="magic")
    with pytest.raises(ValueError, match="increase"):
        tb.PerImage(flops_speedup=2, levels=(2.0, 1.0))
    with pytest.raises(ValueError, match="thresholds"):
        tb.PerImage(flops_speedup=2, levels=(1.0, 2.0), thresholds=(0.1, 0.2))
    with pytest.raises(ValueError, match="predictor=PATH"):
        tb.PerImage(flops_speedup=2, policy="predictor")


def test_apply_without_thresholds_says_how_to_calibrate(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="calibrate_per_image"):
        tb.apply(model, tb.PerImage(flops_speedup=2))
    assert not tb.is_patched(model)


# -- the patched model -------------------------------------------------------------------------


def test_each_image_runs_at_its_level_in_input_order(model: torch.nn.Module, config: tb.PerImage) -> None:
    x = _images(12, seed=7)
    tb.apply(model, config)
    out = model(x)
    state = tb.last_state(model)
    assert len(state.group_sizes) > 1, "the test needs a batch that mixes levels"
    plan = model_level_plan(model, LEVELS)
    for i in range(len(x)):
        alone = model(x[i : i + 1])
        assert torch.allclose(alone, out[i : i + 1], atol=1e-5)
        # The same image under plain Auto (the levels' reducer) with its level's schedule gives the same output.
        level = int(state.levels[i])
        tb.apply(model, tb.Auto(r=list(plan.merged[level])))
        assert torch.allclose(model(x[i : i + 1]), out[i : i + 1], atol=1e-5)
        tb.apply(model, config)
    assert state.speedups.tolist() == [LEVELS[int(v)] for v in state.levels]
    assert sum(state.group_sizes.values()) == len(x)
    tb.remove(model)


def test_forward_features_pads_with_size_zero_tokens(model: torch.nn.Module, config: tb.PerImage) -> None:
    x = _images(12, seed=7)
    tb.apply(model, config)
    tokens = model.forward_features(x)
    state = tb.last_state(model)
    assert tokens.shape[:2] == (12, state.num_tokens)
    final = state.real_tokens_per_layer[:, -1]
    assert int(final.max()) == tokens.shape[1] and int(final.min()) < tokens.shape[1]
    for i in range(len(x)):
        n = int(final[i])
        assert (state.sizes[i, :n] > 0).all() and (state.sizes[i, n:] == 0).all()
        assert (tokens[i, n:] == 0).all()
        assert state.sizes[i].sum() == 64 + 1  # every patch and the class token, counted once
        alone = model.forward_features(x[i : i + 1])
        assert torch.allclose(alone[0], tokens[i, :n], atol=1e-5)
    # The head pools the padded batch as it pools each image alone.
    head = model.forward_head(model.forward_features(x))
    assert torch.allclose(head, model(x), atol=1e-5)
    tb.remove(model)


def test_patch_embedding_runs_once_per_forward(model: torch.nn.Module, config: tb.PerImage) -> None:
    calls = []
    handle = model.patch_embed.proj.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    tb.apply(model, config)
    model(_images(12, seed=7))
    assert calls == [12]  # the glance; every group reuses its rows
    tb.remove(model)
    handle.remove()


def test_remove_restores_outputs_and_state_dict(model: torch.nn.Module, config: tb.PerImage) -> None:
    x = _images(6, seed=2)
    before, keys = model(x), list(model.state_dict())
    tb.apply(model, config)
    assert not torch.allclose(model(x), before)
    assert list(model.state_dict()) == keys
    tb.apply(model, config)  # applying again is safe
    tb.remove(model)
    assert torch.equal(model(x), before)
    assert "forward" not in model.__dict__ and "forward" not in model.patch_embed.__dict__


def test_deepcopy_and_concurrent_forwards(model: torch.nn.Module, config: tb.PerImage) -> None:
    tb.apply(model, config)
    twin = copy.deepcopy(model)
    x = _images(5, seed=9)
    assert torch.equal(twin(x), model(x))
    assert tb.last_state(twin).levels.tolist() == tb.last_state(model).levels.tolist()
    assert_concurrent_forwards_match(model, model)


def test_per_image_refuses_other_frameworks_and_bad_input(
    config: tb.PerImage, model: torch.nn.Module
) -> None:
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        tb.apply(torch.nn.Linear(3, 3), config)
    tb.apply(model, config)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(NotImplementedError):
        model.get_intermediate_layers(_images(2))
    tb.remove(model)


# -- evaluation helpers --------------------------------------------------------------------------


def test_oracle_picks_the_cheapest_good_level_within_the_target() -> None:
    from tokenbudget.evaluate.per_image_eval import oracle_for_target, oracle_levels

    flops = [1.0, 0.5, 0.25]
    cosine = torch.tensor([[1.0, 0.99, 0.98], [1.0, 0.90, 0.80], [1.0, 0.999, 0.995]], dtype=torch.float64)
    ok = cosine >= 0.95
    assert oracle_levels(ok, flops).tolist() == [2, 0, 2]
    index, floor = oracle_for_target(cosine, flops, target=0.5)
    assert torch.tensor(flops)[index].mean() <= 0.5 + 1e-9
    assert index[1] == 0  # the image that loses most keeps its tokens
    assert index[2] == 2


def test_evaluate_per_image_runs_end_to_end_on_a_tiny_model(model: torch.nn.Module) -> None:
    from tokenbudget.evaluate.per_image_eval import evaluate_per_image, format_per_image_runs

    g = torch.Generator().manual_seed(4)
    train, test = _images(24, seed=11), _images(12, seed=12)
    y_train, y_test = torch.randint(0, 3, (24,), generator=g), torch.randint(0, 3, (12,), generator=g)
    runs = evaluate_per_image(
        model,
        train,
        y_train,
        test,
        y_test,
        speedups=(1.5,),
        policy="redundancy",
        levels=LEVELS,
        calibration_images=16,
    )
    (run,) = runs
    names = [r.condition for r in run.rows]
    assert names == ["full", f"fixed keep={run.fixed_keep:g}", "per-image"]
    fixed, per_image = run.rows[1], run.rows[2]
    assert fixed.knn_gain == 0.0 and fixed.knn_gain_se == 0.0
    assert abs(fixed.speedup - 1.5) < 0.1
    assert per_image.mean_flops < 1.0 and sum(run.level_counts.values()) == 12
    assert run.config["thresholds"] is not None
    assert "per-image" in format_per_image_runs(runs, "tiny")


def test_the_anchored_level_is_the_fixed_budget_itself(model: torch.nn.Module) -> None:
    from tokenbudget.adaptive.per_image import config_level_plan

    keep = 0.5
    x = _images(6, seed=3)
    plan = config_level_plan(model, tb.PerImage(keep=keep, levels=LEVELS))
    assert plan.anchor is not None and plan.anchor_keep == keep
    geometric = config_level_plan(model, tb.PerImage(keep=keep, levels=LEVELS, anchor=False))
    assert geometric.anchor is None and geometric.flops[plan.anchor] != plan.flops[plan.anchor]
    # thresholds that send every image to the anchored level: i thresholds below every score
    below = len(LEVELS) - 1 - plan.anchor
    thresholds = (-1e9,) * below + (1e9,) * (len(LEVELS) - 1 - below)
    config = tb.PerImage(keep=keep, levels=LEVELS, thresholds=thresholds)
    with torch.inference_mode():
        tb.apply(model, tb.Auto(keep=keep))  # the levels' reducer
        fixed = model(x)
        tb.apply(model, config)
        per_image = model(x)
        state = tb.last_state(model)
        tb.remove(model)
    assert state.levels.tolist() == [plan.anchor] * len(x)
    assert torch.allclose(per_image, fixed, atol=1e-6)
    assert state.mean_flops == pytest.approx(plan.flops[plan.anchor])


@pytest.mark.slow
def test_embedded_dinov2_runs_each_mix_image_at_its_own_level() -> None:
    """On the real weights and real mixed images: calibrated thresholds meet the target on their
    images, and each image's output under the grouped model is its level's Auto output."""
    from tokenbudget.adaptive.per_image import config_level_plan
    from tokenbudget.data.images import model_normalization, rgb_uint8_to_model_input
    from tokenbudget.data.mix import dev_mix

    torch.set_num_threads(1)
    model = tb.models.dinov2_small().eval()
    mix = dev_mix("train", 10)  # 10 images of each of the five sources
    x = rgb_uint8_to_model_input(mix.images[::2], *model_normalization(model))  # 25 images
    config = calibrate_per_image(model, x, flops_speedup=1.5, rule="spread")
    assert abs(config.calibrated_flops - config.target_flops) < 1.0 / len(x)  # shares of 25 images
    plan = config_level_plan(model, config)
    with torch.inference_mode():
        tb.apply(model, config)
        pooled = model(x[:8])
        state = tb.last_state(model)
        for level in state.levels.unique().tolist():
            members = (state.levels == level).nonzero().flatten()
            tb.apply(model, tb.Auto(r=list(plan.merged[level])))
            assert torch.allclose(pooled[members], model(x[members]), atol=1e-4)
        tb.remove(model)
    assert len(state.group_sizes) > 1  # real mixed images spread over levels
