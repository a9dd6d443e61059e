"""Per-image token budgets (``tb.PerImage``): a glance at each image picks its budget level.

    cfg = tb.PerImage.calibrate(model, train_images, flops_speedup=2)   # thresholds on train images
    tb.apply(model, cfg)
    out = model(images)                      # each image at its own level, one sub-batch per level
    tb.last_state(model).speedups            # [B] the FLOPs-ideal speedup each image ran at

How it works:

* **levels**: each level is a FLOPs-ideal speedup of the blocks; it runs as ToMe whose blocks each
  merge the same share ``rate`` of their mergeable tokens (a geometric schedule:
  :func:`rate_schedule`), ``rate`` solved so the level's FLOPs meet its speedup
  (:func:`resolve_levels`). A geometric schedule reaches far beyond the ~2x that ToMe's even
  ``keep`` schedule can on a 12-block model, so cheap images can run much cheaper than the mean;
* **glance**: the policy scores each image's need (:func:`glance_scores`) from its patch
  embeddings, which the grouped forward then reuses (the patch embedding runs once);
* **thresholds** split the scores into levels (:func:`tokenbudget.ops.glance.level_index`);
  :func:`calibrate_per_image` fits them on training images so their mean FLOPs meet the target;
* **grouped forward**: images of one level run as one sub-batch through the model's own entry
  point (never padded), outputs return in input order
  (:func:`tokenbudget.adaptive.patching.run_groups`); ``forward_features`` pads shorter token
  sequences with size-0 tokens so the batch stacks (``last_state(model).sizes`` is 0 there, so
  size-weighted pooling ignores them).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..config import PerImage, ToMe
from ..context import PatchContext
from ..ops.entropy import token_entropy
from ..ops.glance import level_index, redundancy_need, spread_need
from ..ops.match import max_mergeable
from ..state import TokenState
from ..strategies.tome import ToMeStrategy
from .complexity import detail_score

#: merge rate of the fastest schedule: every block merges half of its mergeable tokens
MAX_RATE = 0.5


# -- levels ------------------------------------------------------------------------------------
def rate_schedule(num_tokens: int, num_prefix: int, num_layers: int, rate: float) -> list[int]:
    """Tokens merged by each block when each merges ``rate`` of its mergeable (non-prefix) tokens,
    rounded, at most half of them (the bipartite limit): a geometric decay of the token count."""
    if not 0.0 <= rate <= MAX_RATE:
        raise ValueError(f"rate must be in [0, {MAX_RATE}], got {rate}")
    counts, n = [], num_tokens
    for _ in range(num_layers):
        r = min(round(rate * (n - num_prefix)), max_mergeable(n, num_prefix))
        counts.append(r)
        n -= r
    return counts


def schedule_flops(num_tokens: int, merged: Sequence[int], dims: Sequence[Any]) -> float:
    """Block FLOPs of one image under per-block merge counts ``merged``, over the unreduced blocks'."""
    from ..bench.flops import model_flops

    per_layer, n = [], num_tokens
    for r in merged:
        n -= r
        per_layer.append(n)
    return model_flops(num_tokens, per_layer, dims) / model_flops(num_tokens, [num_tokens] * len(dims), dims)


def rate_for_speedup(num_tokens: int, num_prefix: int, dims: Sequence[Any], speedup: float) -> float:
    """The smallest merge rate whose :func:`rate_schedule` reaches a FLOPs-ideal ``speedup``
    (bisection; the counts are integers, so the speedup reached can overshoot slightly)."""
    layers = len(dims)

    def reached(rate: float) -> float:
        return 1.0 / schedule_flops(num_tokens, rate_schedule(num_tokens, num_prefix, layers, rate), dims)

    if speedup <= 1.0:
        return 0.0
    fastest = reached(MAX_RATE)
    if speedup > fastest + 1e-9:
        raise ValueError(
            f"a FLOPs-ideal speedup of {speedup} is out of reach: merging half of the tokens in every "
            f"block gives {fastest:.2f}; choose levels up to that"
        )
    lo, hi = 0.0, MAX_RATE
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reached(mid) < speedup else (lo, mid)
    return hi


@dataclass(frozen=True)
class LevelPlan:
    """The budget levels resolved for one model and input length.

    Attributes:
        speedups: the config's levels (FLOPs-ideal speedups), increasing.
        rates: merge rate of each level (0: all tokens).
        merged: per level, the tokens each block merges.
        flops: per level, block FLOPs over the unreduced model's (what the level really costs).
        final_tokens: per level, tokens after the last block (prefix included).
    """

    speedups: tuple[float, ...]
    rates: tuple[float, ...]
    merged: tuple[tuple[int, ...], ...]
    flops: tuple[float, ...]
    final_tokens: tuple[int, ...]


def resolve_levels(
    speedups: Sequence[float], num_tokens: int, num_prefix: int, dims: Sequence[Any]
) -> LevelPlan:
    """A :class:`LevelPlan` for ``num_tokens`` input tokens (prefix included) through blocks ``dims``
    (:func:`tokenbudget.bench.flops.block_dims` of each)."""
    rates, merged, flops, final = [], [], [], []
    for speedup in speedups:
        rate = rate_for_speedup(num_tokens, num_prefix, dims, speedup)
        counts = rate_schedule(num_tokens, num_prefix, len(dims), rate)
        rates.append(rate)
        merged.append(tuple(counts))
        flops.append(schedule_flops(num_tokens, counts, dims))
        final.append(num_tokens - sum(counts))
    return LevelPlan(tuple(speedups), tuple(rates), tuple(merged), tuple(flops), tuple(final))


def model_level_plan(model: nn.Module, speedups: Sequence[float], num_tokens: int | None = None) -> LevelPlan:
    """:func:`resolve_levels` for a timm ViT at its default input (or ``num_tokens`` tokens)."""
    from ..bench.flops import block_dims

    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if num_tokens is None:
        num_tokens = int(model.patch_embed.num_patches) + prefix
    return resolve_levels(speedups, num_tokens, prefix, [block_dims(b) for b in model.blocks])


def mean_flops_target(model: nn.Module, config: PerImage) -> float:
    """The mean FLOPs fraction ``config`` asks for: ``1 / flops_speedup``, or the FLOPs of
    ``tb.ToMe(keep=keep)`` on ``model`` at its default input."""
    if config.flops_speedup is not None:
        return 1.0 / config.flops_speedup
    from ..bench.flops import block_dims
    from ..strategies.base import ScheduledStrategy

    prefix = int(getattr(model, "num_prefix_tokens", 1))
    tokens = int(model.patch_embed.num_patches) + prefix
    _, merged = ScheduledStrategy(ToMe(keep=config.keep), len(model.blocks)).compute_plan(tokens, prefix)
    return schedule_flops(tokens, merged, [block_dims(b) for b in model.blocks])


class _RateToMe(ToMeStrategy):
    """ToMe whose blocks each merge ``rate`` of their mergeable tokens (:func:`rate_schedule`)."""

    def __init__(self, rate: float, num_layers: int, prop_attn: bool) -> None:
        super().__init__(ToMe(r=0, prop_attn=prop_attn), num_layers)
        self.rate = rate

    def compute_plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        counts = rate_schedule(num_tokens, num_prefix, self.num_layers, self.rate)
        return counts, list(counts)


# -- glance ------------------------------------------------------------------------------------
def patch_tokens_of(raw: Tensor) -> Tensor:
    """Patch embeddings [B, N, C] from a patch embedding's output ([B, N, C], or [B, H, W, C] for
    models built with ``dynamic_img_size``)."""
    return raw.flatten(1, 2) if raw.ndim == 4 else raw


def need_scores(
    policy: str, patch_tokens: Tensor, images: Tensor, patch_size: int, predictor: Any = None
) -> Tensor:
    """[B] need scores (higher: more tokens) of ``policy`` from the patch embeddings [B, N, C]
    (no prefix) and the model-ready ``images`` [B, 3, H, W]."""
    if policy == "redundancy":
        return redundancy_need(patch_tokens, 0)
    if policy == "spread":
        return spread_need(patch_tokens, 0)
    if policy == "entropy":
        return token_entropy(patch_tokens)
    if policy == "detail":
        return detail_score(images, patch_size)
    if policy == "predictor":
        if predictor is None:
            raise ValueError("policy 'predictor' needs a trained budget predictor")
        return predictor.need(patch_tokens)
    raise ValueError(f"unknown policy {policy!r}")


# -- calibration -------------------------------------------------------------------------------
def thresholds_for_shares(scores: Tensor, shares: Sequence[float]) -> tuple[float, ...]:
    """Thresholds that give ``shares[l]`` of ``scores`` (fractions summing to 1) level ``l``: the
    highest scores the first level (most tokens), the lowest the last (cheapest). Cuts fall midway
    between neighbouring scores; a level with share 0 is skipped (two equal thresholds)."""
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty [N], got shape {tuple(scores.shape)}")
    if any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"shares must be non-negative fractions summing to 1, got {list(shares)}")
    ordered = scores.double().sort().values  # ascending: cheapest level first
    n = len(ordered)
    thresholds = []
    # Level l (0 = most tokens) takes the top shares[0] of the scores, and so on; threshold j
    # separates level K-1-j-1 from level K-1-j, counting from the cheap end.
    below = 0.0
    for share in reversed(shares[1:]):
        below += share
        k = round(below * n)  # images below this cut
        if k <= 0:
            cut = float(ordered[0]) - 1.0
        elif k >= n:
            cut = float(ordered[-1]) + 1.0
        else:
            cut = float((ordered[k - 1] + ordered[k]) / 2)
        thresholds.append(cut)
    return tuple(thresholds)


def mean_level_flops(level: Tensor, flops: Sequence[float]) -> float:
    """Mean FLOPs fraction of images at levels ``level`` [N] of a plan with per-level ``flops``."""
    return float(torch.tensor(flops, dtype=torch.float64)[level].mean())


def bracket_shares(target: float, flops: Sequence[float]) -> list[float]:
    """Shares per level that meet a mean FLOPs ``target`` with the two adjacent levels around it."""
    k = len(flops)
    if not flops[-1] <= target <= flops[0]:
        raise ValueError(
            f"a mean FLOPs fraction of {target:.3f} is out of reach of these levels "
            f"({flops[-1]:.3f} to {flops[0]:.3f}); add faster or slower levels"
        )
    shares = [0.0] * k
    for j in range(k - 1):
        hi, lo = flops[j], flops[j + 1]
        if lo <= target <= hi:
            w = (target - lo) / (hi - lo) if hi > lo else 1.0
            shares[j], shares[j + 1] = w, 1.0 - w
            return shares
    shares[0] = 1.0
    return shares


def fit_staircase(
    scores: Tensor, quality: Tensor, level_flops: Sequence[float], target: float
) -> tuple[float, ...]:
    """Thresholds that maximise the total ``quality`` [N, K] of images at their levels subject to a
    mean FLOPs of at most ``target``, among assignments monotone in the score (higher score, a level
    with at least as many tokens: what thresholds can express).

    Lagrangian relaxation: for a price ``lam`` per unit FLOPs each image's value at level ``l`` is
    ``quality[n, l] - lam * flops[l]``; the best monotone assignment is a dynamic programme over the
    images sorted by score (O(N K)); ``lam`` is bisected to the smallest price whose mean FLOPs meets
    the target. The relaxation's solutions jump between budgets, so the remaining budget is then
    filled greedily (:func:`_fill_budget`). Levels are ordered from the most tokens (0) to the
    fewest, as in ``tb.PerImage``.
    """
    n, k = quality.shape
    if scores.shape != (n,) or len(level_flops) != k:
        raise ValueError(
            f"expected scores [N], quality [N, K] and K level FLOPs; got {tuple(scores.shape)}, "
            f"{tuple(quality.shape)} and {len(level_flops)}"
        )
    flops = torch.tensor(level_flops, dtype=torch.float64)
    if not float(flops.min()) <= target <= float(flops.max()):
        raise ValueError(
            f"a mean FLOPs fraction of {target:.3f} is out of reach of these levels "
            f"({float(flops.min()):.3f} to {float(flops.max()):.3f})"
        )
    order = scores.double().argsort(descending=True)  # most need first: levels only get cheaper
    q = quality.double()[order]

    def assign(lam: float) -> Tensor:
        value = q - lam * flops[None, :]  # [N, K]
        best = torch.empty(n, k, dtype=torch.float64)
        choice = torch.empty(n, k, dtype=torch.long)  # argmax over levels <= l of the previous row
        best[0] = value[0]
        for i in range(1, n):
            prev_max, prev_arg = torch.cummax(best[i - 1], dim=0)
            choice[i] = prev_arg
            best[i] = prev_max + value[i]
        levels = torch.empty(n, dtype=torch.long)
        levels[-1] = int(best[-1].argmax())
        for i in range(n - 1, 0, -1):
            levels[i - 1] = int(choice[i, levels[i]])
        return levels

    lo, hi = 0.0, 1.0
    while float(flops[assign(hi)].mean()) > target:  # find a price high enough
        hi *= 2
        if hi > 1e9:
            break
    for _ in range(50):
        mid = (lo + hi) / 2
        if float(flops[assign(mid)].mean()) > target:
            lo = mid
        else:
            hi = mid
    levels = _fill_budget(assign(hi), q, flops, target)
    sorted_scores = scores.double()[order]
    thresholds = []
    for level in range(k - 1):  # threshold between level ``level`` (more tokens) and ``level + 1``
        # images at level <= ``level`` are a prefix of the sorted order: cut below the last of them
        count = int((levels <= level).sum())
        if count == 0:
            thresholds.append(float(sorted_scores[0]) + 1.0)
        elif count == n:
            thresholds.append(float(sorted_scores[-1]) - 1.0)
        else:
            thresholds.append(float((sorted_scores[count - 1] + sorted_scores[count]) / 2))
    return tuple(reversed(thresholds))


def _fill_budget(levels: Tensor, quality: Tensor, flops: Tensor, target: float) -> Tensor:
    """Move images of a monotone assignment (``levels`` [N] non-decreasing, images sorted by need)
    to dearer levels, one at a time, the move with the best quality gain per FLOPs first, while the
    mean FLOPs stays within ``target``. A move gives the first image beyond the images at levels
    ``<= l`` level ``l``, so the assignment stays monotone."""
    levels = levels.clone()
    n, k = quality.shape
    budget = target * n - float(flops[levels].sum())
    while True:
        best = None
        for level in range(k - 1):
            position = int((levels <= level).sum())
            if position >= n:
                continue
            old = int(levels[position])
            cost = float(flops[level] - flops[old])
            if cost <= 0 or cost > budget + 1e-12:
                continue
            ratio = float(quality[position, level] - quality[position, old]) / cost
            if best is None or ratio > best[0]:
                best = (ratio, position, level, cost)
        if best is None:
            return levels
        _, position, level, cost = best
        levels[position] = level
        budget -= cost


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
    batch_size: int = 32,
) -> PerImage:
    """A :class:`~tokenbudget.PerImage` whose thresholds give ``images`` (training images, normalised
    for the model, at the size it will see) a mean block FLOPs of the target.

    Rules for where the thresholds go (both meet the target on ``images``):

    * ``"fit"``: run ``images`` at every level and place the thresholds where the images' features
      (class token and size-weighted mean token, as the quality harness reads them) stay closest to
      their full-token ones on average (:func:`fit_staircase`): the levels' shares follow how much
      the scored images really lose. Costs one forward of ``images`` per level.
    * ``"spread"``: no extra forward; spread the images over the levels by the ``shares`` profile
      (default flat) tilted to meet the target (:func:`profile_shares`), highest scores on the
      levels with the most tokens.
    """
    base = PerImage(
        keep=keep,
        flops_speedup=flops_speedup,
        policy=policy,
        predictor=predictor,
        **({} if levels is None else {"levels": tuple(levels)}),
    )
    if rule not in ("fit", "spread"):
        raise ValueError(f"rule must be 'fit' (run every level on the images) or 'spread', got {rule!r}")
    if not isinstance(images, Tensor) or images.dim() != 4 or len(images) == 0:
        raise ValueError("images must be a non-empty batch [N, 3, H, W] of calibration images")
    from ..patch import is_patched

    if is_patched(model):
        raise ValueError("calibrate on the unpatched model; call tb.remove(model) first")
    num_tokens = _input_tokens(model, images)
    plan = model_level_plan(model, base.levels, num_tokens)
    target = mean_flops_target(model, base)
    scores = glance_batches(model, images, base, batch_size)
    if rule == "fit":
        quality = level_cosines(model, images, plan, batch_size)
        thresholds = fit_staircase(scores, quality, plan.flops, target)
    else:
        thresholds = thresholds_for_shares(scores, profile_shares(target, plan.flops, shares))
    index = level_index(scores, torch.tensor(thresholds, dtype=torch.float64), len(plan.flops))
    achieved = mean_level_flops(index, plan.flops)
    return replace(base, thresholds=thresholds, target_flops=target, calibrated_flops=round(achieved, 6))


def quality_floor_targets(quality: Tensor, level_flops: Sequence[float], target: float) -> Tensor:
    """[N] each image's cheapest level whose ``quality`` [N, K] reaches a floor, the floor set so that
    the mean FLOPs of those levels is ``target`` (bisection): the per-image budget the calibration
    images ask for, as training targets of a budget predictor."""
    flops = torch.tensor(level_flops, dtype=torch.float64)

    def at(floor: float) -> Tensor:
        ok = quality >= floor
        ok[:, 0] = True
        cost = torch.where(ok, flops[None, :], torch.full(ok.shape, float("inf"), dtype=torch.float64))
        return cost.argmin(dim=1)

    lo, hi = float(quality.min()) - 1.0, float(quality.max()) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(flops[at(mid)].mean()) <= target else (lo, mid)
    return at(lo)


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
    patch embeddings ``glance`` [N, P, C]: trained on the levels :func:`quality_floor_targets` asks
    for at a mean FLOPs of ``target``. Its budgets are the levels' FLOPs fractions, cheapest first, so
    its :meth:`~tokenbudget.adaptive.BudgetPredictor.need` is the expected FLOPs of an image."""
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


def pooled_features(model: nn.Module, images: Tensor) -> Tensor:
    """[B, 2C]: the class token and the size-weighted mean of the other output tokens of
    ``model.forward_features(images)`` (sizes from ``tb.last_state`` when the model is patched)."""
    from ..patch import is_patched, last_state

    prefix = int(getattr(model, "num_prefix_tokens", 1))
    tokens = model.forward_features(images)
    if is_patched(model):
        sizes = last_state(model).sizes[:, prefix:, None].to(tokens.dtype)
    else:
        sizes = torch.ones_like(tokens[:, prefix:, :1])
    mean = (tokens[:, prefix:] * sizes).sum(1) / sizes.sum(1)
    return torch.cat([tokens[:, 0], mean], dim=1)


def level_cosines(model: nn.Module, images: Tensor, plan: LevelPlan, batch_size: int = 32) -> Tensor:
    """[N, K] cosine similarity of each image's :func:`pooled_features` at each level of ``plan`` to
    its full-token ones (level 0 of a plan starting at 1.0 gives 1)."""
    from ..patch import apply, remove

    def features(config: ToMe | None) -> Tensor:
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
        feats = full if rate == 0 else features(ToMe(r=list(merged), prop_attn=True)).double()
        columns.append(torch.nn.functional.cosine_similarity(feats, full, dim=-1))
    return torch.stack(columns, dim=1)


def profile_shares(
    target: float, flops: Sequence[float], profile: Sequence[float] | None = None
) -> list[float]:
    """Shares per level with mean FLOPs ``target``: the ``profile`` (default flat) tilted
    exponentially, ``share_l ~ profile_l * exp(-beta * flops_l)``, ``beta`` solved by bisection.

    The tilt keeps every level of the profile in use while moving mass to the cheap (``beta > 0``) or
    the dear levels, so the result is the maximum-entropy spread around the profile that meets the
    target."""
    k = len(flops)
    if not min(flops) <= target <= max(flops):
        raise ValueError(
            f"a mean FLOPs fraction of {target:.3f} is out of reach of these levels "
            f"({min(flops):.3f} to {max(flops):.3f}); add faster or slower levels"
        )
    prior = (
        torch.ones(k, dtype=torch.float64) if profile is None else torch.tensor(profile, dtype=torch.float64)
    )
    if prior.shape != (k,) or bool((prior < 0).any()) or float(prior.sum()) <= 0:
        raise ValueError(f"shares must be {k} non-negative numbers, got {profile!r}")
    cost = torch.tensor(flops, dtype=torch.float64)

    def shares_at(beta: float) -> torch.Tensor:
        logits = torch.log(prior) - beta * cost
        return torch.softmax(logits, dim=0)

    lo, hi = -500.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        mean = float((shares_at(mid) * cost).sum())
        lo, hi = (mid, hi) if mean > target else (lo, mid)
    return shares_at((lo + hi) / 2).tolist()


def _input_tokens(model: nn.Module, images: Tensor) -> int:
    patch = model.patch_embed.patch_size
    rows, cols = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
    return rows * cols + int(getattr(model, "num_prefix_tokens", 1))


def glance_batches(model: nn.Module, images: Tensor, config: PerImage, batch_size: int = 64) -> Tensor:
    """[N] need scores of ``images`` [N, 3, H, W] under ``config``'s policy, on the unpatched model."""
    predictor = load_policy_predictor(config)
    patch_size = int(model.patch_embed.patch_size[0])
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            tokens = patch_tokens_of(model.patch_embed(batch))
            out.append(need_scores(config.policy, tokens, batch, patch_size, predictor).double().cpu())
    return torch.cat(out)


def load_policy_predictor(config: PerImage) -> Any:
    """The trained predictor of a ``policy="predictor"`` config (``None`` for other policies)."""
    if config.policy != "predictor":
        return None
    from .budget_predictor import load_budget_predictor

    return load_budget_predictor(config.predictor)


# -- the patched model -------------------------------------------------------------------------
@dataclass
class PerImageState(TokenState):
    """What one forward of a ``tb.PerImage`` model did, per image (input order).

    The :class:`TokenState` fields describe the batch as ``forward_features`` returns it: as wide as
    its widest image, shorter images padded with size-0 tokens (``padding``, ``sizes``).

    Attributes:
        levels: [B] level index of each image (into ``level_speedups``).
        level_speedups: the levels, as FLOPs-ideal speedups.
        scores: [B] glance scores (need).
        speedups: [B] each image's budget: the FLOPs-ideal speedup of its level.
        flops: [B] each image's block FLOPs over the unreduced model's.
        image_tokens_per_layer: [B, L] each image's tokens after each block.
        group_sizes: level speedup -> images run at it.
    """

    levels: Tensor | None = None
    level_speedups: tuple[float, ...] = ()
    scores: Tensor | None = None
    speedups: Tensor | None = None
    flops: Tensor | None = None
    image_tokens_per_layer: Tensor | None = None
    group_sizes: dict[float, int] = field(default_factory=dict)

    @property
    def real_tokens_per_layer(self) -> Tensor:
        """[B, L] each image's token count after each block."""
        return self.image_tokens_per_layer

    @property
    def mean_flops(self) -> float:
        """Mean block FLOPs fraction of the batch."""
        return float(self.flops.double().mean())

    def summary(self) -> dict:
        return {
            **super().summary(),
            "levels": [int(v) for v in self.levels],
            "speedups": [float(v) for v in self.speedups],
            "scores": [round(float(v), 6) for v in self.scores],
            "mean_flops": self.mean_flops,
            "group_sizes": {str(k): v for k, v in self.group_sizes.items()},
        }


@dataclass(frozen=True)
class LevelGroup:
    """One sub-batch of a grouped forward: its level and its members' patch embeddings (reused)."""

    level: int
    patch_embed_out: Tensor


class PerImageStrategy:
    """The per-block strategy of a ``tb.PerImage`` model: the rate-ToMe of the level the current
    sub-batch runs at (``ctx.group``); outside a grouped forward (blocks called directly), all tokens."""

    needs_keys = True
    needs_positions = False
    trace_source = False

    def __init__(
        self, config: PerImage, num_layers: int, local: threading.local, rates: Sequence[float]
    ) -> None:
        self.config = config
        self.num_layers = num_layers
        self._local = local
        self.rates = tuple(rates)
        self.levels = [_RateToMe(rate, num_layers, config.prop_attn) for rate in self.rates]

    @property
    def prop_attn(self) -> bool:
        return self.config.prop_attn

    def current(self) -> ToMeStrategy:
        group = getattr(self._local, "group", None)
        return self.levels[0 if group is None else group.level]

    def plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        if getattr(self._local, "group", None) is None:
            return [0] * self.num_layers, [0] * self.num_layers
        return self.current().plan(num_tokens, num_prefix)

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        return self.current().reduce(x, keys, state, layer)

    def check_model(self, adapter: Any) -> None:
        """Nothing beyond ToMe's needs."""

    def __deepcopy__(self, memo: dict) -> PerImageStrategy:
        # threading.local cannot be copied; PerImageContext's copy links its own fresh slot.
        return PerImageStrategy(self.config, self.num_layers, threading.local(), self.rates)


class PerImageContext(PatchContext):
    """A :class:`PatchContext` whose strategy follows the level of the sub-batch being run."""

    def __init__(
        self,
        config: PerImage,
        plan: LevelPlan,
        num_prefix: int,
        num_layers: int,
        grid: tuple[int, int] | None,
        dims: Sequence[Any],
    ) -> None:
        local = threading.local()
        super().__init__(
            PerImageStrategy(config, num_layers, local, plan.rates), num_prefix, num_layers, grid
        )
        self._local = local
        self.plan = plan
        self.dims = list(dims)
        self.thresholds = torch.tensor(config.thresholds, dtype=torch.float64)
        self.predictor = load_policy_predictor(config)

    @property
    def group(self) -> LevelGroup | None:
        return getattr(self._local, "group", None)

    def __deepcopy__(self, memo: dict) -> PerImageContext:
        new = PerImageContext.__new__(PerImageContext)
        memo[id(self)] = new
        new._local = threading.local()
        new.strategy = PerImageStrategy(
            self.strategy.config, self.num_layers, new._local, self.strategy.rates
        )
        new.num_prefix, new.num_layers, new.grid = self.num_prefix, self.num_layers, self.grid
        new.plan, new.dims = self.plan, list(self.dims)
        new.thresholds = self.thresholds.clone()
        new.predictor = copy.deepcopy(self.predictor, memo)
        new.latest = None
        return new


def per_image_plan(ctx: PerImageContext, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(patch embedding output, need scores [B], level index [B]) of model-ready ``images``."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"tb.PerImage needs images [B, C, H, W], got {shape}")
    raw = type(model.patch_embed).forward(model.patch_embed, images)
    with torch.no_grad():
        scores = need_scores(
            ctx.strategy.config.policy,
            patch_tokens_of(raw).detach(),
            images,
            int(model.patch_embed.patch_size[0]),
            ctx.predictor,
        ).double()
    levels = level_index(scores.cpu(), ctx.thresholds, len(ctx.plan.rates))
    return raw, scores.cpu(), levels


def level_groups(levels: Tensor, raw: Tensor, num_levels: int) -> list[tuple[LevelGroup, Tensor]]:
    """[(group, member indices)] per level that has images, cheapest level first."""
    groups = []
    for level in reversed(range(num_levels)):
        members = (levels == level).nonzero().flatten()
        if len(members):
            rows = raw if len(members) == len(levels) else raw[members.to(raw.device)]
            groups.append((LevelGroup(level, rows), members))
    return groups


def combined_state(
    ctx: PerImageContext,
    states: Sequence[tuple[Tensor, TokenState]],
    levels: Tensor,
    scores: Tensor,
    batch_size: int,
    input_tokens: int,
) -> PerImageState:
    """One :class:`PerImageState` for the whole batch from each group's (members, state)."""
    width = max(s.num_tokens for _, s in states)
    layers = ctx.num_layers
    device = states[0][1].device
    size = torch.zeros(batch_size, width, 1, device=device)
    image_tokens = torch.zeros(batch_size, layers, dtype=torch.long)
    flops = torch.zeros(batch_size, dtype=torch.float64)
    from ..bench.flops import model_flops

    full = model_flops(input_tokens, [input_tokens] * layers, ctx.dims)
    for members, state in states:
        rows = members.to(device)
        size[rows, : state.num_tokens] = state.sizes[..., None].to(size.dtype)
        image_tokens[members] = torch.tensor(state.tokens_per_layer, dtype=torch.long)
        flops[members] = model_flops(state.input_tokens, state.tokens_per_layer, ctx.dims) / full
    widths = image_tokens.amax(dim=0).tolist()
    padding = size[..., 0] <= 0
    speedups = torch.tensor(ctx.plan.speedups, dtype=torch.float64)[levels]
    groups = {ctx.plan.speedups[int(lv)]: int((levels == lv).sum()) for lv in levels.unique().tolist()}
    return PerImageState(
        batch_size=batch_size,
        input_tokens=input_tokens,
        num_prefix=ctx.num_prefix,
        grid=ctx._grid_for(input_tokens),
        requested_per_layer=[a - b for a, b in zip([input_tokens, *widths], widths, strict=False)],
        merged_per_layer=[a - b for a, b in zip([input_tokens, *widths], widths, strict=False)],
        tokens_per_layer=widths,
        size=size,
        device=device,
        padding=padding if bool(padding.any()) else None,
        levels=levels,
        level_speedups=ctx.plan.speedups,
        scores=scores,
        speedups=speedups,
        flops=flops,
        image_tokens_per_layer=image_tokens,
        group_sizes=dict(sorted(groups.items())),
    )


def pad_tokens(outputs: Sequence[tuple[Tensor, Tensor]], batch_size: int) -> Tensor:
    """Per-group tokens [(members, [b_g, N_g, C])] -> [B, max N_g, C] in input order, zero-padded."""
    width = max(out.shape[1] for _, out in outputs)
    first = outputs[0][1]
    result = first.new_zeros((batch_size, width, *first.shape[2:]))
    for members, out in outputs:
        result[members.to(result.device), : out.shape[1]] = out
    return result


__all__ = [
    "LevelGroup",
    "LevelPlan",
    "PerImageContext",
    "PerImageState",
    "PerImageStrategy",
    "bracket_shares",
    "calibrate_per_image",
    "fit_staircase",
    "level_cosines",
    "pooled_features",
    "quality_floor_targets",
    "train_need_predictor",
    "glance_batches",
    "level_groups",
    "mean_flops_target",
    "model_level_plan",
    "need_scores",
    "pad_tokens",
    "per_image_plan",
    "profile_shares",
    "rate_for_speedup",
    "rate_schedule",
    "resolve_levels",
    "thresholds_for_shares",
]
