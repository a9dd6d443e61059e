"""Calibrating per-image budget thresholds: pure functions of glance scores, per-level quality and
per-level FLOPs (``tb.adaptive.calibrate_per_image`` runs the model and calls these).

Levels are ordered from the most tokens (0) to the fewest; a need score above more thresholds gets
a level with more tokens (:func:`tokenbudget.ops.glance.level_index`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .glance import level_index


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


def fit_staircase_within(
    scores: Tensor,
    quality: Tensor,
    level_flops: Sequence[float],
    target: float,
    budget_scores: Tensor,
    *,
    steps: int = 14,
) -> tuple[float, ...]:
    """:func:`fit_staircase` on the calibration images (``scores`` [N], ``quality`` [N, K]) with its
    own target lowered just enough that the thresholds also keep the mean FLOPs of ``budget_scores``
    [M] (more images, scored by the glance alone, e.g. the whole train split) within ``target``
    (bisection on the inner target, ``steps`` halvings). A few hundred calibration images place the
    thresholds; many cheap glances hold the budget, so it carries over to new images."""
    flops = torch.tensor(level_flops, dtype=torch.float64)
    k = len(level_flops)

    def spent(thresholds: tuple[float, ...]) -> float:
        index = level_index(budget_scores.double(), torch.tensor(thresholds, dtype=torch.float64), k)
        return float(flops[index].mean())

    best = fit_staircase(scores, quality, level_flops, target)
    if spent(best) <= target:
        return best
    lo, hi = float(flops.min()), target
    best = fit_staircase(scores, quality, level_flops, lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        thresholds = fit_staircase(scores, quality, level_flops, mid)
        if spent(thresholds) <= target:
            lo, best = mid, thresholds
        else:
            hi = mid
    return best


def hold_budget(
    thresholds: Sequence[float],
    scores: Tensor,
    level_flops: Sequence[float],
    target: float,
    tolerance: float = 0.005,
) -> tuple[float, ...]:
    """``thresholds`` moved as little as needed so that the images scored ``scores`` [M] get a mean
    FLOPs within ``tolerance`` (relative) of ``target``.

    A staircase fitted on a few hundred images, or one whose glance scores have many equal values,
    can leave the budget far below the target. From the assignment the thresholds give, whole blocks
    of equal scores move one level at a time at a boundary between adjacent levels: up (to more
    tokens, the neediest image of the cheaper level first) while the mean is below the target, down
    while it is above. Each step takes the boundary whose move is smallest in FLOPs, so the fitted
    shape changes as little as possible; it stops at the mean closest to the target.
    Levels are ordered from the most tokens (0) to the fewest, as in ``tb.PerImage``.
    """
    k = len(level_flops)
    flops = torch.tensor(level_flops, dtype=torch.float64)
    if len(thresholds) != k - 1 or scores.dim() != 1 or len(scores) == 0:
        raise ValueError(
            f"expected {k - 1} thresholds and scores [M]; got {len(thresholds)} and {tuple(scores.shape)}"
        )
    if not float(flops.min()) <= target <= float(flops.max()):
        raise ValueError(
            f"a mean FLOPs fraction of {target:.3f} is out of reach of these levels "
            f"({float(flops.min()):.3f} to {float(flops.max()):.3f})"
        )
    ordered, _ = scores.double().sort(descending=True)  # most need first
    values, counts = torch.unique_consecutive(ordered, return_counts=True)  # blocks of equal scores
    sizes = counts.tolist()
    block = level_index(values, torch.tensor(thresholds, dtype=torch.float64), k).tolist()  # non-decreasing
    m = len(ordered)
    total = sum(float(flops[lvl]) * c for lvl, c in zip(block, sizes, strict=True))

    def error(t: float) -> float:
        return abs(t / m - target)

    while error(total) > tolerance * target:
        best = None
        up = total / m < target
        for b in range(len(block)):
            lvl = block[b]
            if up:  # the neediest block of its level moves to the next dearer level
                if lvl == 0 or (b > 0 and block[b - 1] == lvl):
                    continue
                new = lvl - 1
            else:  # the least needy block of its level moves to the next cheaper level
                if lvl == k - 1 or (b + 1 < len(block) and block[b + 1] == lvl):
                    continue
                new = lvl + 1
            moved = total + (float(flops[new]) - float(flops[lvl])) * sizes[b]
            if best is None or abs(moved - total) < abs(best[2] - total):
                best = (b, new, moved)
        if best is None or error(best[2]) >= error(total):
            break  # no move brings the mean closer
        block[best[0]], total = best[1], best[2]
    out = []
    for level in range(k - 1):  # threshold between level ``level`` (more tokens) and ``level + 1``
        last = max((b for b in range(len(block)) if block[b] <= level), default=None)
        if last is None:
            out.append(float(values[0]) + 1.0)
        elif last == len(block) - 1:
            out.append(float(values[-1]) - 1.0)
        else:
            out.append(float((values[last] + values[last + 1]) / 2))
    return tuple(reversed(out))


__all__ = [
    "bracket_shares",
    "hold_budget",
    "fit_staircase",
    "fit_staircase_within",
    "mean_level_flops",
    "profile_shares",
    "quality_floor_targets",
    "thresholds_for_shares",
]
