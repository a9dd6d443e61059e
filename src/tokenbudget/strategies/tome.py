"""ToMe as a strategy: merge after each block's attention by bipartite soft matching on the keys."""

from __future__ import annotations

import math

from torch import Tensor

from ..config import ToMe
from ..ops.match import Matching, bipartite_soft_matching, detail_preserving_matching
from ..ops.merge import merge_weighted, update_token_map
from ..state import TokenState
from .base import ScheduledStrategy, register
from .guard import EntropyGuard


@register(ToMe)
class ToMeStrategy(ScheduledStrategy):
    """Merges ``state.merged_per_layer[layer]`` tokens after the attention of block ``layer``."""

    #: the adapter must hand :meth:`reduce` the attention keys averaged over heads [B, N, d].
    needs_keys = True

    def __init__(self, config: ToMe, num_layers: int) -> None:
        super().__init__(config, num_layers)
        self.optimal = config.matching == "optimal"
        if self.optimal:
            from ..ops.assignment import require_scipy

            require_scipy()  # fail at apply time, naming the extra, not at the first forward
        floor = config.entropy_floor
        self.guard = EntropyGuard(floor) if floor is not None else None

    def match(self, keys: Tensor, r: int, num_prefix: int, padding: Tensor | None = None) -> Matching:
        """The matching of this block: ToMe's greedy one or the optimal one-to-one assignment.
        ``padding`` [B, N] marks size-0 tokens of a ragged batch (entropy guard only)."""
        pad_kw = {} if padding is None else {"padding": padding}
        if self.optimal:
            from ..ops.assignment import optimal_bipartite_matching

            return optimal_bipartite_matching(keys, r, num_prefix, **pad_kw)
        return bipartite_soft_matching(keys, r, num_prefix, **pad_kw)

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        """Merge tokens ``x`` [B, N, C] using ``keys`` [B, N, d] (head-averaged attention keys, any
        positive scale); updates ``state`` in place."""
        r = state.merged_per_layer[layer]
        pad_kw = {} if state.padding is None else {"padding": state.padding}
        if self.config.preserve_detail:
            protect = math.ceil(self.config.detail_fraction * (x.shape[1] - state.num_prefix))
            matching = detail_preserving_matching(
                keys, r, state.num_prefix, protect, match=self.match, **pad_kw
            )
        else:
            matching = self.match(keys, r, state.num_prefix, **pad_kw)
        if self.guard is not None:
            return self.guard.reduce(x, state, layer, matching, "mean")
        x, state.size = merge_weighted(x, state.size, matching)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        return x
