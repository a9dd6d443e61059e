"""Budgets for the harness: a method's config at a keep fraction, and the budget that reaches a
FLOPs-ideal speedup on a model (every scheduled method shares the schedule, hence the FLOPs).

Up to the fastest even schedule (:func:`fastest_keep`, about 2.7x on DINOv2-S/224) a speedup is a
``keep``: ToMe's even per-layer schedule, exactly as ``tb.ToMe(keep=...)`` runs it. Beyond it the
budget is a :class:`ScheduledKeep`: the geometric schedule in which each block merges the same share
of its mergeable tokens (the per-image levels' schedule), given to every method as ``r=[...]``.
"""

from __future__ import annotations

from torch import nn

from ..bench import reach
from ..config import BudgetConfig, PerImage, ReductionConfig, config_class


class ScheduledKeep(float):
    """A budget beyond the even schedule's reach: its value is the fraction of non-prefix tokens left
    after the last block (a ``keep``, for tables and keys), and it carries the per-block merge
    ``counts`` every scheduled method runs (``r=list(counts)``) and the FLOPs-ideal ``speedup`` they
    reach at the model's default input, which ``tb.PerImage`` takes as its mean budget."""

    counts: tuple[int, ...]
    speedup: float

    def __new__(cls, keep: float, counts: tuple[int, ...], speedup: float) -> ScheduledKeep:
        value = super().__new__(cls, keep)
        value.counts = tuple(int(c) for c in counts)
        value.speedup = float(speedup)
        return value

    def __getnewargs__(self) -> tuple[float, tuple[int, ...], float]:  # copy and pickle
        return float(self), self.counts, self.speedup

    def __repr__(self) -> str:
        return f"ScheduledKeep({float(self)!r}, r={list(self.counts)}, speedup={self.speedup:.4f})"


def method_config(method: str, keep: float, options: dict | None = None) -> ReductionConfig:
    """The config of ``method`` that leaves ``keep`` of the non-prefix tokens after the last block.

    For the pruning methods (``prune``, ``dynamicvit``) ``keep`` is their per-stage keep ratio, so
    the same ``keep`` leaves fewer tokens than ToMe's; every row reports its FLOPs for a fair
    comparison. A :class:`ScheduledKeep` gives scheduled methods its per-block counts (``r=[...]``)
    and ``tb.PerImage`` its speedup as the mean budget. ``options`` are further keyword arguments of
    the config (e.g. ``predictor``).
    """
    cls = config_class(method)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if isinstance(keep, ScheduledKeep):
        if issubclass(cls, PerImage):
            return cls(flops_speedup=keep.speedup, **(options or {}))
        if not issubclass(cls, BudgetConfig):
            raise ValueError(
                f"{method!r} has no per-layer schedule, so it cannot run the geometric schedule of a "
                f"{keep.speedup:.2f}x FLOPs budget: give it --keep"
            )
        return cls(r=list(keep.counts), **(options or {}))
    return cls(keep=keep, **(options or {}))


def fastest_keep(model: nn.Module) -> tuple[float, float]:
    """(the smallest ``keep`` a per-layer schedule reaches on ``model`` at its default input, the
    FLOPs-ideal speedup of that schedule), to 1e-4: the far end of every budget slider."""
    return reach.fastest_keep(reach.geometry_of(model))


def keep_for_flops_speedup(model: nn.Module, speedup: float) -> float:
    """The ``keep`` whose per-layer schedule gives ``model`` a FLOPs-ideal speedup of ``speedup``
    at its default input (all our scheduled methods share the schedule, hence the FLOPs).

    Found by bisection on ``keep`` to 1e-4; ``ValueError`` for a speedup no schedule reaches.
    """
    return reach.keep_for_speedup(reach.geometry_of(model), speedup)


def budget_for_flops_speedup(model: nn.Module, speedup: float) -> float:
    """The budget that gives ``model`` a FLOPs-ideal ``speedup`` at its default input: the even
    schedule's ``keep`` (:func:`keep_for_flops_speedup`) where it reaches, else a
    :class:`ScheduledKeep` for the geometric schedule (each block merges the same share of its
    mergeable tokens, at most half: the per-image levels' schedule), which front-loads the merging
    and so reaches further. ``ValueError`` beyond what merging half of every block reaches."""
    from ..strategies.per_image import fastest_rate_speedup, rate_for_speedup, schedule_flops
    from ..strategies.per_image_levels import rate_schedule

    geometry = reach.geometry_of(model)
    if speedup <= reach.fastest_keep(geometry)[1]:
        return reach.keep_for_speedup(geometry, speedup)
    tokens, prefix, dims = geometry.tokens, geometry.prefix, geometry.dims
    fastest = fastest_rate_speedup(tokens, prefix, dims)
    if speedup > fastest + 1e-9:
        raise ValueError(
            f"a FLOPs-ideal speedup of {speedup} is out of reach for this model: merging half of the "
            f"tokens in every block gives {fastest:.2f}; choose one in [1, {fastest:.2f}]"
        )
    rate = rate_for_speedup(tokens, prefix, dims, speedup)
    counts = rate_schedule(tokens, prefix, len(dims), rate)
    keep = (tokens - sum(counts) - prefix) / (tokens - prefix)
    return ScheduledKeep(keep, tuple(counts), 1.0 / schedule_flops(tokens, counts, dims))
