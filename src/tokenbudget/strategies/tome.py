"""ToMe as a strategy: merge after each block's attention by bipartite soft matching on the keys."""

from __future__ import annotations

import math

from torch import Tensor

from ..ops.match import bipartite_soft_matching, detail_preserving_matching
from ..ops.merge import merge_weighted, update_token_map
from ..state import TokenState
from .base import ScheduledStrategy


class ToMeStrategy(ScheduledStrategy):
    """Merges ``state.merged_per_layer[layer]`` tokens after the attention of block ``layer``."""

    #: the adapter must hand :meth:`reduce` the attention keys averaged over heads [B, N, d].
    needs_keys = True

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        """Merge tokens ``x`` [B, N, C] using ``keys`` [B, N, d] (head-averaged attention keys, any
        positive scale); updates ``state`` in place."""
        r = state.merged_per_layer[layer]
        if self.config.preserve_detail:
            protect = math.ceil(self.config.detail_fraction * (x.shape[1] - state.num_prefix))
            matching = detail_preserving_matching(keys, r, state.num_prefix, protect)
        else:
            matching = bipartite_soft_matching(keys, r, state.num_prefix)
        x, state.size = merge_weighted(x, state.size, matching)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        return x
