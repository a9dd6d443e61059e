"""What pruning strategies share: a per-stage keep ratio applied at a few chosen blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


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


class StageStrategy:
    """Base of strategies that prune at the blocks in ``config.layers`` with ``config.keep`` per stage.

    Gives the adapter the same interface as :class:`~tokenbudget.strategies.base.ScheduledStrategy`:
    ``plan`` (per-block counts), flags saying what ``reduce`` needs, and ``check_model``.
    """

    needs_keys = False
    needs_positions = False
    needs_class_attention = False
    extra_token = False
    trace_source = False

    def __init__(self, config: Any, num_layers: int) -> None:
        bad = [i for i in config.layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"{type(config).__name__}: layers {bad} do not exist in a model with {num_layers} blocks "
                f"(0-based indices 0..{num_layers - 1}); e.g. layers=({num_layers // 4}, {num_layers // 2})"
            )
        self.config = config
        self.num_layers = num_layers
        self._plans: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    @property
    def prop_attn(self) -> bool:
        return getattr(self.config, "prop_attn", False)

    def plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        """(requested, removed) counts per block for an input of ``num_tokens`` tokens (equal here)."""
        key = (num_tokens, num_prefix)
        plan = self._plans.get(key)
        if plan is None:
            c = self.config
            removed = stage_removals(
                num_tokens, num_prefix, self.num_layers, c.layers, c.keep, self.extra_token
            )
            plan = (removed, list(removed))
            self._plans[key] = plan
        return plan

    def check_model(self, adapter: Any) -> None:
        """Raise ``ValueError`` when the patched model lacks what this strategy needs."""
