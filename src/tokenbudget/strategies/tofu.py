"""Token Fusion as a strategy: ToMe's matching, pruning in early blocks, MLERP merging in later ones."""

from __future__ import annotations

from torch import Tensor

from ..config import ToFu
from ..ops.match import bipartite_soft_matching
from ..ops.merge import drop_matched, merge_mlerp, update_token_map
from ..state import TokenState
from .base import ScheduledStrategy, register
from .guard import EntropyGuard


@register(ToFu)
class ToFuStrategy(ScheduledStrategy):
    """Reduces ``state.merged_per_layer[layer]`` tokens after the attention of block ``layer``:
    blocks before ``config.switch_layer`` drop each matched A token, later blocks MLERP-merge it."""

    #: the adapter must hand :meth:`reduce` the attention keys averaged over heads [B, N, d].
    needs_keys = True

    def __init__(self, config: ToFu, num_layers: int) -> None:
        super().__init__(config, num_layers)
        floor = config.entropy_floor
        self.guard = EntropyGuard(floor) if floor is not None else None

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        """Reduce tokens ``x`` [B, N, C] using ``keys`` [B, N, d]; updates ``state`` in place."""
        pad_kw = {} if state.padding is None else {"padding": state.padding}
        matching = bipartite_soft_matching(keys, state.merged_per_layer[layer], state.num_prefix, **pad_kw)
        if self.guard is not None:
            mode = "drop" if layer < self.config.switch_layer else "mlerp"
            return self.guard.reduce(x, state, layer, matching, mode)
        if layer < self.config.switch_layer:
            x, state.size = drop_matched(x, state.size, matching)
        else:
            x, state.size = merge_mlerp(x, state.size, matching)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        return x
