"""Budgets for the harness: a method's config at a keep fraction, and the keep that reaches a
FLOPs-ideal speedup on a model (every scheduled method shares the schedule, hence the FLOPs)."""

from __future__ import annotations

import math
from itertools import accumulate

from torch import nn

from ..adapters import find_adapter
from ..config import BudgetConfig, ReductionConfig, config_class
from ..flops import ideal_speedup
from ..strategies import ScheduledStrategy


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


def _flops_speedup_of_keep(model: nn.Module):  # noqa: ANN202 - (closure, closure, float)
    """(achieved(keep) -> FLOPs-ideal speedup, feasible(keep) -> bool, the smallest keep that leaves
    one token) for ``model`` at its default input."""
    adapter = find_adapter(model)
    tokens, prefix, layers = adapter.default_num_tokens, adapter.num_prefix, adapter.num_layers
    if tokens is None:
        raise ValueError("the model has no default patch grid; give --keep values instead of a speedup")
    dims = adapter.block_dims()

    def achieved(keep: float) -> float:
        _, merged = ScheduledStrategy(BudgetConfig(keep=keep), layers).compute_plan(tokens, prefix)
        per_layer = list(accumulate(merged, lambda n, r: n - r, initial=tokens))[1:]
        return ideal_speedup(tokens, per_layer, dims)

    def feasible(keep: float) -> bool:
        try:
            achieved(keep)
        except ValueError:  # fewer tokens than the blocks can reach
            return False
        return True

    return achieved, feasible, 1.0 / (tokens - prefix)


def fastest_keep(model: nn.Module) -> tuple[float, float]:
    """(the smallest ``keep`` a per-layer schedule reaches on ``model`` at its default input, the
    FLOPs-ideal speedup of that schedule), to 1e-4: the far end of every budget slider."""
    achieved, feasible, lo = _flops_speedup_of_keep(model)
    hi = 1.0
    # The fastest schedule: the smallest feasible keep (bisection on feasibility).
    if not feasible(lo):
        while hi - lo > 1e-4:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
        lo = hi
    return lo, achieved(lo)


def keep_for_flops_speedup(model: nn.Module, speedup: float) -> float:
    """The ``keep`` whose per-layer schedule gives ``model`` a FLOPs-ideal speedup of ``speedup``
    at its default input (all our scheduled methods share the schedule, hence the FLOPs).

    Found by bisection on ``keep`` to 1e-4; ``ValueError`` for a speedup no schedule reaches.
    """
    achieved, feasible, _ = _flops_speedup_of_keep(model)
    lo, fastest = fastest_keep(model)
    if speedup < 1.0 or speedup > fastest:
        raise ValueError(
            f"a FLOPs-ideal speedup of {speedup} is out of reach for this model: choose one in [1, {fastest:.2f}]"
        )
    if speedup <= 1.0 + 1e-9:
        return 1.0
    hi = 1.0
    while hi - lo > 1e-4:  # achieved() falls as keep grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if achieved(mid) >= speedup else (lo, mid)
    # Four decimals, rounded down: a smaller keep never merges less, while rounding to nearest can
    # cross the point where keep * tokens rounds up to one more token and miss the target.
    rounded = math.floor(lo * 1e4) / 1e4
    return rounded if feasible(rounded) else lo
