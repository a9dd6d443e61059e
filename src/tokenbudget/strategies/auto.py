"""Auto and AutoDrop as strategies: ToMe's counts and pairs; each pair averaged or its redundant token
dropped, chosen per pair (Auto) or always dropped (AutoDrop, by default)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import Auto, AutoDrop
from ..ops.disjoint import disjoint_bipartite_matching
from ..ops.gated_merge import merge_gated, pair_similarity
from ..ops.match import bipartite_soft_matching
from ..ops.merge import drop_matched, merge_mlerp, merge_weighted, update_token_map
from ..ops.moments import merge_moment_preserving
from ..ops.small_merge import merge_small_groups
from ..state import TokenState
from .base import ScheduledStrategy, register


@register(AutoDrop)
class AutoDropStrategy(ScheduledStrategy):
    """Reduces ``state.merged_per_layer[layer]`` tokens after the attention of block ``layer``."""

    #: the adapter must hand :meth:`reduce` the attention keys [B, N, d].
    needs_keys = True

    def __init__(self, config: AutoDrop, num_layers: int) -> None:
        super().__init__(config, num_layers)

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        """Reduce tokens ``x`` [B, N, C] using ``keys`` [B, N, d]; updates ``state`` in place."""
        c: AutoDrop = self.config
        r = state.merged_per_layer[layer]
        if c.matching == "disjoint":
            matching = disjoint_bipartite_matching(keys, r, state.num_prefix, state.size, c.max_size)
        else:
            matching = bipartite_soft_matching(keys, r, state.num_prefix)
        if c.merge == "drop" and c.mean_up_to is not None and layer >= c.prune_layers:
            x, state.size = merge_small_groups(x, state.size, matching, c.mean_up_to)
        elif c.merge == "drop" or layer < c.prune_layers:
            x, state.size = drop_matched(x, state.size, matching)
        elif c.merge == "mlerp":
            x, state.size = merge_mlerp(x, state.size, matching)
        elif c.merge == "moment":
            x, state.size = merge_moment_preserving(x, state.size, matching, state.num_prefix)
        else:
            x, state.size = merge_weighted(x, state.size, matching)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        return x


def averaging_gate(sim: Tensor, rule: str, threshold: float) -> Tensor:
    """[B, r] bool, True where a pair is averaged, from the pairs' key similarities ``sim`` [B, r]
    under an :class:`~tokenbudget.Auto` ``rule`` (see there)."""
    if rule == "distinct":
        return sim < threshold
    if rule == "duplicate":
        return sim >= threshold
    if sim.shape[1] < 2:
        return torch.zeros_like(sim, dtype=torch.bool)
    spread = sim.std(dim=1, keepdim=True)  # [B, 1]
    if rule == "outlier":  # per pair: the image's least similar pairs, relative to its own spread
        return sim < sim.mean(dim=1, keepdim=True) - threshold * spread
    return (spread >= threshold).expand_as(sim)  # one choice per image


@register(Auto)
class AutoStrategy(ScheduledStrategy):
    """Reduces ``state.merged_per_layer[layer]`` tokens after the attention of block ``layer``: ToMe's
    pairs, each averaged or its redundant token dropped by the config's rule."""

    #: the adapter must hand :meth:`reduce` the attention keys [B, N, d].
    needs_keys = True

    def __init__(self, config: Auto, num_layers: int) -> None:
        super().__init__(config, num_layers)

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        """Reduce tokens ``x`` [B, N, C] using ``keys`` [B, N, d]; updates ``state`` in place."""
        c: Auto = self.config
        pad_kw = {} if state.padding is None else {"padding": state.padding}
        matching = bipartite_soft_matching(keys, state.merged_per_layer[layer], state.num_prefix, **pad_kw)
        gate = averaging_gate(pair_similarity(keys, matching), c.rule, c.threshold)
        x, state.size = merge_gated(x, state.size, matching, gate, c.fuse)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        return x
