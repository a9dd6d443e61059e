"""The hardware ceiling of a token schedule: the same per-layer token counts, reduced for free.

`FreeReduction` drops the last ``r`` tokens of each block by slicing (no matching, no merging), so
a model patched with it runs exactly the token counts of the real method with zero reduction cost.
Its speedup is the most any implementation of that schedule can reach on this machine: at small
batch on a CPU, blocks on few tokens are bound by reading their weights, not by FLOPs, so the
ceiling sits below the FLOPs-ideal speedup. The bench reports both.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence

from torch import Tensor, nn

from ..adapters import find_adapter
from ..context import PatchContext
from ..patch import _context, install_strategy, patched_config
from ..state import TokenState


class FreeReduction:
    """Strategy with another strategy's plan whose reduction is a free slice (benchmark only)."""

    needs_keys = False
    needs_positions = False
    prop_attn = False
    trace_source = False

    def __init__(self, planner: object) -> None:
        self.planner = planner
        self.config = planner.config

    def plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        return self.planner.plan(num_tokens, num_prefix)

    def reduce(self, x: Tensor, keys: Tensor | None, state: TokenState, layer: int) -> Tensor:
        return x[:, : x.shape[1] - state.merged_per_layer[layer]]


def free_reduction_copy(model: nn.Module, patched: nn.Module) -> nn.Module:
    """A copy of unpatched ``model`` that runs ``patched``'s token schedule with free reduction."""
    from ..strategies import make_strategy

    clone = copy.deepcopy(model)
    adapter = find_adapter(clone)
    planner = make_strategy(patched_config(patched), adapter.num_layers)
    ctx = PatchContext(FreeReduction(planner), adapter.num_prefix, adapter.num_layers, adapter.grid)
    ctx.costs = _context(patched).costs  # the cost model's schedule, when the patched model has one
    install_strategy(clone, adapter, ctx)
    return clone


def merge_overhead_quartiles(
    patched_s: Sequence[float], free_s: Sequence[float], merged_per_layer: Sequence[int]
) -> tuple[float, float, float]:
    """Fixed cost of one merging block, in milliseconds, as quartiles (25 %, 50 %, 75 %) over the
    interleaved samples of the patched model's time minus its free-reduction ceiling's (same token
    counts, reduction by a slice), divided by the number of blocks that merge. It holds everything
    a merge costs beyond running fewer tokens: the key capture, matching, merging and the
    proportional-attention bias. A cost cannot be negative: a lower quartile at or below 0 means
    the cost is within the timing noise. ``nan`` three times when no block merges."""
    merging = sum(1 for m in merged_per_layer if m > 0)
    if merging == 0:
        return (float("nan"),) * 3
    excess = sorted((p - f) / merging * 1e3 for p, f in zip(patched_s, free_s, strict=True))
    if len(excess) == 1:
        return excess[0], excess[0], excess[0]
    q1, _, q3 = statistics.quantiles(excess, n=4, method="inclusive")
    return q1, statistics.median(excess), q3


def merge_overhead_ms(
    patched_s: Sequence[float], free_s: Sequence[float], merged_per_layer: Sequence[int]
) -> float:
    """The median of :func:`merge_overhead_quartiles`: the fixed cost of one merging block in ms."""
    return merge_overhead_quartiles(patched_s, free_s, merged_per_layer)[1]
