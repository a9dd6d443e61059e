"""Budgets for the harness: a method's config at a keep fraction, and the keep that reaches a
FLOPs-ideal speedup on a model (every scheduled method shares the schedule, hence the FLOPs)."""

from __future__ import annotations

from torch import nn

from ..bench import reach
from ..config import ReductionConfig, config_class


def method_config(method: str, keep: float, options: dict | None = None) -> ReductionConfig:
    """The config of ``method`` that leaves ``keep`` of the non-prefix tokens after the last block.

    For the pruning methods (``prune``, ``dynamicvit``) ``keep`` is their per-stage keep ratio, so
    the same ``keep`` leaves fewer tokens than ToMe's; every row reports its FLOPs for a fair
    comparison. ``options`` are further keyword arguments of the config (e.g. ``predictor``).
    """
    cls = config_class(method)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
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
