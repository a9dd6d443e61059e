"""Per-image token budgets (``tb.PerImage``): calibrating the glance's thresholds on training images.

    cfg = tb.adaptive.calibrate_per_image(model, train_images, flops_speedup=2)   # thresholds
    tb.apply(model, cfg)
    out = model(images)                      # each image at its own level, one sub-batch per level
    tb.last_state(model).speedups            # [B] the FLOPs-ideal speedup each image ran at

The running model lives in :mod:`tokenbudget.strategies.per_image` (levels, glance, grouped
forward) and ``tokenbudget.adapters.timm_per_image``; the pure threshold fitting in
:mod:`tokenbudget.ops.budget_fit`. Everything here reads the model through its adapter
(:func:`tokenbudget.adapters.find_adapter`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import Adapter, find_adapter
from ..config import BudgetConfig, PerImage
from ..config.per_image import DEFAULT_PER_IMAGE_LEVELS
from ..ops.budget_fit import (
    fit_staircase,
    fit_staircase_within,
    hold_budget,
    mean_level_flops,
    profile_shares,
    quality_floor_targets,
    thresholds_for_shares,
)
from ..ops.glance import level_index
from ..patch import apply, install_strategy, is_patched, last_state, remove
from ..strategies.per_image import (
    LevelPlan,
    config_levels,
    fastest_rate_speedup,
    mean_flops_target,
    need_scores,
    resolve_levels,
)
from ..strategies.per_image_levels import level_config

#: how :func:`calibrate_per_image` places the thresholds
RULES = ("fit", "spread")


def input_tokens(adapter: Adapter, images: Tensor) -> int:
    """Tokens entering the first block (prefix included) for images [B, 3, H, W] of this size."""
    rows, cols = images.shape[-2] // adapter.patch_size[0], images.shape[-1] // adapter.patch_size[1]
    return rows * cols + adapter.num_prefix


def model_level_plan(model: nn.Module, speedups: Sequence[float], num_tokens: int | None = None) -> LevelPlan:
    """:func:`~tokenbudget.strategies.per_image.resolve_levels` for ``model`` at its default input
    (or ``num_tokens`` tokens, prefix included)."""
    adapter = find_adapter(model)
    if num_tokens is None:
        num_tokens = adapter.default_num_tokens
    if num_tokens is None:
        raise ValueError("the model takes any input size; give num_tokens")
    return resolve_levels(speedups, num_tokens, adapter.num_prefix, adapter.block_dims())


def reachable_levels(
    model: nn.Module, speedups: Sequence[float], num_tokens: int | None = None
) -> tuple[float, ...]:
    """The ``speedups`` the model reaches at ``num_tokens`` tokens (its default input when ``None``)
    with the fastest level schedule, and that fastest speedup itself when some are cut off."""
    adapter = find_adapter(model)
    tokens = num_tokens if num_tokens is not None else adapter.default_num_tokens
    dims = adapter.block_dims()
    fastest = fastest_rate_speedup(tokens, adapter.num_prefix, dims)
    kept = tuple(s for s in speedups if s <= fastest + 1e-9)
    if len(kept) < len(speedups) and fastest - kept[-1] > 0.05:
        kept = (*kept, math.floor(fastest * 100) / 100)  # rounded down: reachable
    if len(kept) < 2:
        raise ValueError(
            f"the model reaches a FLOPs-ideal speedup of at most {fastest:.2f}: too little for levels"
        )
    return kept


def config_level_plan(model: nn.Module, config: PerImage, num_tokens: int | None = None) -> LevelPlan:
    """The levels ``config`` runs on ``model`` (anchored as it says) at its default input or
    ``num_tokens`` tokens."""
    adapter = find_adapter(model)
    tokens = num_tokens if num_tokens is not None else adapter.default_num_tokens
    return config_levels(config, tokens, adapter.num_prefix, adapter.block_dims())


def flops_target(model: nn.Module, config: PerImage, num_tokens: int | None = None) -> float:
    """The mean block FLOPs fraction ``config`` asks of ``model`` (``1 / flops_speedup``, or the
    FLOPs of ``tb.ToMe(keep=keep)``) at its default input or ``num_tokens`` tokens."""
    adapter = find_adapter(model)
    tokens = num_tokens if num_tokens is not None else adapter.default_num_tokens
    return mean_flops_target(config, tokens, adapter.num_prefix, adapter.block_dims())


def load_policy_predictor(config: PerImage) -> Any:
    """The trained predictor of a ``policy="predictor"`` config (``None`` for other policies)."""
    if config.policy != "predictor":
        return None
    from .budget_predictor import load_budget_predictor

    return load_budget_predictor(config.predictor)


def apply_per_image(model: nn.Module, config: PerImage) -> nn.Module:
    """``tb.apply(model, config)``, also for ``policy="predictor"``: loads ``config.predictor`` first."""
    if not isinstance(config, PerImage):
        raise ValueError(f"config must be a tb.PerImage, got {type(config).__name__}")
    if config.policy != "predictor":
        return apply(model, config)
    from ..adapters.timm_per_image import build, prepare

    prepare(model, replace(config, policy="redundancy", predictor=None))  # the same checks
    install_strategy(model, *build(model, config, load_policy_predictor(config)))
    return model


def glance_scores(model: nn.Module, images: Tensor, config: PerImage, batch_size: int = 64) -> Tensor:
    """[N] need scores of ``images`` [N, 3, H, W] (model-ready) under ``config``'s policy, on the
    unpatched model."""
    adapter = find_adapter(model)
    predictor = load_policy_predictor(config)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            tokens = adapter.patch_embeddings(batch)
            out.append(
                need_scores(config.policy, tokens, batch, adapter.patch_size[0], predictor).double().cpu()
            )
    return torch.cat(out)


def pooled_features(model: nn.Module, images: Tensor) -> Tensor:
    """[B, 2C]: the class token and the size-weighted mean of the other output tokens of the model's
    token features (sizes from ``tb.last_state`` when the model is patched)."""
    adapter = find_adapter(model)
    prefix = adapter.num_prefix
    tokens = adapter.features(images)
    if is_patched(model):
        sizes = last_state(model).sizes[:, prefix:, None].to(tokens.dtype)
    else:
        sizes = torch.ones_like(tokens[:, prefix:, :1])
    mean = (tokens[:, prefix:] * sizes).sum(1) / sizes.sum(1)
    return torch.cat([tokens[:, 0], mean], dim=1)


def level_cosines(
    model: nn.Module, images: Tensor, plan: LevelPlan, batch_size: int = 32, reducer: str = "auto"
) -> Tensor:
    """[N, K] cosine similarity of each image's :func:`pooled_features` at each level of ``plan``
    (run by ``reducer``, ``"auto"`` or ``"tome"``) to its full-token ones (level 0 of a plan starting
    at 1.0 gives 1)."""

    def features(config: BudgetConfig | None) -> Tensor:
        if config is not None:
            apply(model, config)
        try:
            with torch.inference_mode():
                return torch.cat(
                    [
                        pooled_features(model, images[i : i + batch_size])
                        for i in range(0, len(images), batch_size)
                    ]
                )
        finally:
            if config is not None:
                remove(model)

    full = features(None).double()
    columns = []
    for rate, merged in zip(plan.rates, plan.merged, strict=True):
        feats = full if rate == 0 else features(level_config(reducer, True, r=list(merged))).double()
        columns.append(torch.nn.functional.cosine_similarity(feats, full, dim=-1))
    return torch.stack(columns, dim=1)


def calibrate_per_image(
    model: nn.Module,
    images: Tensor,
    *,
    keep: float | None = None,
    flops_speedup: float | None = None,
    policy: str = "redundancy",
    levels: Sequence[float] | None = None,
    rule: str = "fit",
    shares: Sequence[float] | None = None,
    predictor: str | None = None,
    glance_images: Tensor | None = None,
    reducer: str = "auto",
    tolerance: float = 0.005,
    batch_size: int = 32,
) -> PerImage:
    """A :class:`~tokenbudget.PerImage` whose thresholds give ``images`` (training images, normalised
    for the model, at the size it will see) a mean block FLOPs of the target.

    ``glance_images``: more training images [M, 3, H, W] (e.g. the whole train split) that only
    the glance sees: with rule ``"fit"`` the thresholds then also keep *their* mean FLOPs within the
    target (:func:`~tokenbudget.ops.budget_fit.fit_staircase_within`), so that the budget holds on
    new images and not only on the few embedded at every level.

    The thresholds then hold the budget: on ``glance_images`` (or on ``images`` without them) the
    mean FLOPs lands within ``tolerance`` (relative, default 0.5 %) of the target
    (:func:`~tokenbudget.ops.budget_fit.hold_budget`), recorded as ``calibrated_flops``.

    ``reducer``: what every level runs, ``"auto"`` (default) or ``"tome"`` (``tb.PerImage.reducer``).

    ``levels``: the FLOPs-ideal speedups images may run at; ``None``: the default ladder
    (1, 1.25, 1.5, 2, 3, 4) up to what the model reaches (a small model on small inputs merges out
    of tokens sooner), stored in the returned config.

    Rules for where the thresholds go (both meet the target on ``images``):

    * ``"fit"``: run ``images`` at every level and place the thresholds where the images' features
      (class token and size-weighted mean token, as the quality harness reads them) stay closest to
      their full-token ones on average (:func:`~tokenbudget.ops.budget_fit.fit_staircase`): the
      levels' shares follow how much the scored images really lose. Costs one forward of
      ``images`` per level.
    * ``"spread"``: no extra forward; spread the images over the levels by the ``shares`` profile
      (default flat) tilted to meet the target (:func:`~tokenbudget.ops.budget_fit.profile_shares`),
      highest scores on the levels with the most tokens.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty batch [N, 3, H, W] of calibration images")
    if levels is None:
        levels = reachable_levels(model, DEFAULT_PER_IMAGE_LEVELS, input_tokens(find_adapter(model), images))
    base = PerImage(
        keep=keep,
        flops_speedup=flops_speedup,
        policy=policy,
        predictor=predictor,
        levels=tuple(levels),
        reducer=reducer,
    )
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 0.5:
        raise ValueError(
            f"tolerance must be a relative FLOPs error in (0, 0.5), e.g. 0.005; got {tolerance!r}"
        )
    if rule not in RULES:
        raise ValueError(f"rule must be 'fit' (run every level on the images) or 'spread', got {rule!r}")
    if is_patched(model):
        raise ValueError("calibrate on the unpatched model; call tb.remove(model) first")
    adapter = find_adapter(model)
    num_tokens = input_tokens(adapter, images)
    plan = config_levels(base, num_tokens, adapter.num_prefix, adapter.block_dims())
    target = flops_target(model, base, num_tokens)
    scores = glance_scores(model, images, base, batch_size)
    budget_scores = scores if glance_images is None else glance_scores(model, glance_images, base, batch_size)
    if rule == "fit":
        quality = level_cosines(model, images, plan, batch_size, reducer)
        if glance_images is None:
            thresholds = fit_staircase(scores, quality, plan.flops, target)
        else:
            thresholds = fit_staircase_within(scores, quality, plan.flops, target, budget_scores)
    else:
        thresholds = thresholds_for_shares(scores, profile_shares(target, plan.flops, shares))
    thresholds = hold_budget(thresholds, budget_scores, plan.flops, target, tolerance)
    index = level_index(budget_scores, torch.tensor(thresholds, dtype=torch.float64), len(plan.flops))
    achieved = mean_level_flops(index, plan.flops)
    return replace(base, thresholds=thresholds, target_flops=target, calibrated_flops=round(achieved, 6))


def train_need_predictor(
    glance: Tensor,
    quality: Tensor,
    level_flops: Sequence[float],
    target: float,
    *,
    hidden: int = 128,
    epochs: int = 30,
    seed: int = 0,
    info: dict | None = None,
) -> Any:
    """A :class:`~tokenbudget.adaptive.BudgetPredictor` that predicts each image's level from its
    patch embeddings ``glance`` [N, P, C]: trained on the levels
    :func:`~tokenbudget.ops.budget_fit.quality_floor_targets` asks for at a mean FLOPs of ``target``.
    Its budgets are the levels' FLOPs fractions, cheapest first, so its
    :meth:`~tokenbudget.adaptive.BudgetPredictor.need` is the expected FLOPs of an image."""
    from .budget_predictor import train_budget_predictor

    k = len(level_flops)
    levels = quality_floor_targets(quality, level_flops, target)
    budgets = [float(level_flops[k - 1 - j]) for j in range(k)]  # cheapest first
    predictor, _ = train_budget_predictor(
        glance.float(),
        (k - 1 - levels).long(),
        budgets,
        hidden=hidden,
        epochs=epochs,
        seed=seed,
        info={"kind": "per-image need", **(info or {})},
    )
    return predictor


__all__ = [
    "RULES",
    "apply_per_image",
    "calibrate_per_image",
    "config_level_plan",
    "flops_target",
    "glance_scores",
    "input_tokens",
    "level_cosines",
    "load_policy_predictor",
    "model_level_plan",
    "reachable_levels",
    "pooled_features",
    "train_need_predictor",
]
