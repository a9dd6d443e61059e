"""What pruning strategies share: a per-stage keep ratio applied at a few chosen blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .base import ScheduledStrategy


def stage_keep_count(num_mergeable: int, keep: float) -> int:
    """Non-prefix tokens kept at one stage: ``ceil(keep * M)`` (EViT's rule), at least 1 of M >= 1."""
    # round() first: 0.7 * 10 is 7.000000000000001 in floating point, which must keep 7, not 8.
    return min(num_mergeable, max(1 if num_mergeable else 0, math.ceil(round(keep * num_mergeable, 9))))


def stage_removals(
    num_tokens: int,
    num_prefix: int,
    num_layers: int,
    layers: Sequence[int],
    keep: float,
    extra_token: bool = False,
) -> list[int]:
    """Tokens removed by each block (net): 0 outside ``layers``; at a stage, those not kept, less
    one when the dropped tokens become one ``extra_token`` (EViT's fusion)."""
    stages = set(layers)
    removed, mergeable = [], num_tokens - num_prefix
    for layer in range(num_layers):
        r = 0
        if layer in stages:
            dropped = mergeable - stage_keep_count(mergeable, keep)
            r = dropped - 1 if extra_token and dropped > 0 else dropped
        removed.append(r)
        mergeable -= r
    return removed


class StageStrategy(ScheduledStrategy):
    """Base of strategies that prune at the blocks in ``config.layers`` with ``config.keep`` per stage.

    A :class:`~tokenbudget.strategies.base.ScheduledStrategy` whose plan is the stage schedule
    (:func:`stage_removals`) instead of a ToMe budget.
    """

    needs_class_attention = False
    extra_token = False

    def __init__(self, config: Any, num_layers: int) -> None:
        bad = [i for i in config.layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"{type(config).__name__}: layers {bad} do not exist in a model with {num_layers} blocks "
                f"(0-based indices 0..{num_layers - 1}); e.g. layers=({num_layers // 4}, {num_layers // 2})"
            )
        super().__init__(config, num_layers)

    def compute_plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        """(requested, removed) counts per block: equal here, a stage always removes what it plans."""
        c = self.config
        removed = stage_removals(num_tokens, num_prefix, self.num_layers, c.layers, c.keep, self.extra_token)
        return removed, list(removed)
