"""Accuracy against mean FLOPs: early exit at calibrated budgets against fixed-depth truncation.

Everything is scored from class tokens cached after every block (one backbone pass per dataset),
so a sweep of budgets takes milliseconds; :func:`simulate_exits` gives the exit each sample takes,
which the real :class:`~tokenbudget.adaptive.early_exit.EarlyExit` forward reproduces (tested).

Rows:

* ``fixed, own head``: every image runs to the same depth and the exit head trained for that depth
  classifies it;
* ``fixed, final head``: the same depth, classified by the final layer's head (what truncating the
  network without training a head per depth gives);
* ``early exit``: thresholds calibrated on the calibration split to a target mean FLOPs, scored on
  the test split (its mean FLOPs is measured, not the target).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..adaptive.early_exit import EarlyExit, simulate_exits


@dataclass
class ExitRow:
    """One condition: accuracy on the test split at a mean depth and FLOPs."""

    kind: str
    target: float | None
    mean_depth: float
    flops: float
    accuracy: float
    calib_flops: float | None = None
    exit_counts: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_exits(
    early_exit: EarlyExit,
    calib_tokens: Tensor,
    test_tokens: Tensor,
    test_labels: Tensor,
    target_flops: Sequence[float],
) -> list[ExitRow]:
    """Fixed-depth rows for every exit layer, then one early-exit row per target FLOPs fraction.

    ``calib_tokens`` / ``test_tokens`` [N, depth(+2), C]: class tokens after each block. The
    early exit's thresholds are left at the last target's calibration."""
    heads, exits = early_exit.heads, early_exit.exits
    costs = torch.tensor(early_exit.costs("flops"))
    depths = torch.tensor(early_exit.costs("depth"))
    final = heads.head(exits[-1])
    rows = []
    conf, logits = early_exit.confidences(test_tokens)  # [N, E], [N, E, K]
    with torch.no_grad():
        for e, layer in enumerate(exits):
            own = float((logits[:, e].argmax(-1) == test_labels).float().mean())
            truncated = final(test_tokens[:, layer].float()).argmax(-1)
            rows.append(ExitRow("fixed, own head", None, float(depths[e]), float(costs[e]), own))
            rows.append(
                ExitRow(
                    "fixed, final head",
                    None,
                    float(depths[e]),
                    float(costs[e]),
                    float((truncated == test_labels).float().mean()),
                )
            )
    calib_conf, _ = early_exit.confidences(calib_tokens)
    for target in target_flops:
        early_exit.calibrate(calib_tokens, target_flops=target)
        calib_exit = simulate_exits(calib_conf, early_exit.thresholds)
        chosen = simulate_exits(conf, early_exit.thresholds)  # [N]
        pred = logits[torch.arange(len(chosen)), chosen].argmax(-1)
        rows.append(
            ExitRow(
                "early exit",
                float(target),
                float(depths[chosen].mean()),
                float(costs[chosen].mean()),
                float((pred == test_labels).float().mean()),
                calib_flops=float(costs[calib_exit].mean()),
                exit_counts=torch.bincount(chosen, minlength=len(exits)).tolist(),
            )
        )
    return rows


def format_exit_table(rows: Sequence[ExitRow]) -> str:
    header = f"{'condition':<18} {'target':>6} {'depth':>6} {'FLOPs':>6} {'acc':>6} {'calib FLOPs':>11}  exits per head"
    lines = [header, "-" * len(header)]
    for r in rows:
        target = f"{r.target:>6.2f}" if r.target is not None else f"{'-':>6}"
        calib = f"{r.calib_flops:>11.3f}" if r.calib_flops is not None else f"{'-':>11}"
        counts = " ".join(str(c) for c in r.exit_counts) if r.exit_counts else ""
        lines.append(
            f"{r.kind:<18} {target} {r.mean_depth:>6.2f} {r.flops:>6.3f} {r.accuracy:>6.3f} {calib}  {counts}"
        )
    return "\n".join(lines)
