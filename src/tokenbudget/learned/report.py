"""The summary every training report prints: step count, wall time, first loss, mean of the last fifth."""

from __future__ import annotations

from collections.abc import Sequence


def tail_mean(values: Sequence[float]) -> float:
    """Mean of the last fifth of ``values`` (at least one value); NaN when there are none."""
    if not values:
        return float("nan")
    tail = values[-max(1, len(values) // 5) :]
    return sum(tail) / len(tail)


def loss_summary(steps: int, seconds: float, loss: Sequence[float]) -> dict:
    """``steps``, ``seconds`` (rounded to 0.1), ``loss_first`` and ``loss_last_mean`` (:func:`tail_mean`)."""
    return {
        "steps": steps,
        "seconds": round(seconds, 1),
        "loss_first": loss[0] if loss else float("nan"),
        "loss_last_mean": tail_mean(loss),
    }
