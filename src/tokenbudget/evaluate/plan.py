"""`tokenbudget plan`: turn a target ("2x faster", "half the FLOPs", "lose at most 0.5 points")
into a config, by measuring candidate budgets on the user's model, data and machine."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..bench.reach import DEFAULT_KEEPS, candidates, check_reachable, check_targets, geometry_of
from ..data.eval_sets import EvalData
from .quality import EvalRow, evaluate

__all__ = ["DEFAULT_KEEPS", "Plan", "check_targets", "choose", "pareto_front", "plan"]


@dataclass
class Plan:
    """The chosen row (``None`` when no candidate meets the target), all measured rows, the front."""

    choice: EvalRow | None
    rows: list[EvalRow]
    front: list[EvalRow]
    reason: str


def pareto_front(rows: Sequence[EvalRow]) -> list[EvalRow]:
    """Rows no other row beats on both measured speedup and k-NN accuracy, by speedup."""
    front = [
        r
        for r in rows
        if not any(
            o.speedup >= r.speedup
            and o.knn_acc >= r.knn_acc
            and (o.speedup > r.speedup or o.knn_acc > r.knn_acc)
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r.speedup)


def choose(
    rows: Sequence[EvalRow],
    *,
    target_speedup: float | None = None,
    target_flops: float | None = None,
    max_drop: float | None = None,
) -> tuple[EvalRow | None, str]:
    """Pick among measured rows. Every given target must hold; then, with a speed or FLOPs target,
    the most accurate row wins (ties: the faster); with only ``max_drop``, the fastest row wins."""
    check_targets(target_speedup, target_flops, max_drop)
    ok = [
        r
        for r in rows
        if r.method != "full"
        and (target_speedup is None or r.speedup >= target_speedup)
        and (target_flops is None or r.flops_ratio <= target_flops)
        and (max_drop is None or r.knn_drop <= max_drop + 1e-9)  # drops are float differences
    ]
    reduced = [r for r in rows if r.method != "full"]
    if not ok:
        fastest = max(reduced, key=lambda r: r.speedup)
        fewest = min(reduced, key=lambda r: r.flops_ratio)
        return None, (
            f"no candidate meets the target; measured here the fastest is {fastest.speedup:.2f}x "
            f"(keep={fastest.keep}, k-NN drop {fastest.knn_drop:.1f} points) and the cheapest "
            f"{fewest.flops_ratio:.2f} of the FLOPs"
        )
    if target_speedup is None and target_flops is None:
        best = max(ok, key=lambda r: (r.speedup, r.knn_acc))
        return best, f"fastest candidate losing at most {max_drop} points of k-NN accuracy"
    best = max(ok, key=lambda r: (r.knn_acc, r.speedup))
    return best, "most accurate candidate meeting the target"


def plan(
    model: nn.Module,
    data: EvalData,
    *,
    target_speedup: float | None = None,
    target_flops: float | None = None,
    max_drop: float | None = None,
    keeps: Sequence[float] = DEFAULT_KEEPS,
    methods: Sequence[str] = ("tome",),
    method_options: dict[str, dict] | None = None,
    speed_batch_size: int = 8,
    speed_samples: int = 5,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> Plan:
    """Measure each of ``methods`` (default ToMe) at each ``keep`` on ``data`` (accuracy, FLOPs,
    speedup at ``speed_batch_size``) and choose the config for the target among all of them.
    ``per-image`` is calibrated on the train split at each keep, and its chosen config carries its
    thresholds. A speed or FLOPs target beyond every candidate's FLOPs-ideal speedup fails at once,
    before anything is measured (:func:`check_reachable`). ``progress`` is called with 1 after each
    batch of features and each timed sample (see :func:`progress_steps` for how many of each)."""
    check_targets(target_speedup, target_flops, max_drop)
    geometry = geometry_of(model)
    check_reachable(
        geometry,
        candidates(geometry, methods, keeps, method_options),
        target_speedup=target_speedup,
        target_flops=target_flops,
    )
    rows = evaluate(
        model,
        data,
        tuple(methods),
        (1.0, *keeps),
        batch_size=batch_size,
        speed_batch_size=speed_batch_size,
        speed_samples=speed_samples,
        progress=progress,
        method_options=method_options,
    )
    choice, reason = choose(rows, target_speedup=target_speedup, target_flops=target_flops, max_drop=max_drop)
    return Plan(choice, rows, pareto_front(rows), reason)
