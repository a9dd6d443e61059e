"""PiToMe as a strategy: energy-score merging after each block's attention, at ToMe's counts."""

from __future__ import annotations

from torch import Tensor

from ..config import PiToMe
from ..ops.energy import energy_matching, pitome_margin
from ..ops.merge import merge_weighted, update_token_map
from ..state import TokenState
from .base import ScheduledStrategy, register


@register(PiToMe)
class PiToMeStrategy(ScheduledStrategy):
    """Merges ``state.merged_per_layer[layer]`` high-energy tokens after block ``layer``'s attention."""

    #: the adapter must hand :meth:`reduce` the attention keys [B, N, d].
    needs_keys = True

    def __init__(self, config: PiToMe, num_layers: int) -> None:
        super().__init__(config, num_layers)

    def margin(self, layer: int) -> float:
        """The energy margin of block ``layer``: the config's, or the paper's falling schedule."""
        if self.config.margin is not None:
            return self.config.margin
        return pitome_margin(layer, self.num_layers)

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        """Merge tokens ``x`` [B, N, C] using ``keys`` [B, N, d]; updates ``state`` in place."""
        matching = energy_matching(
            keys, state.merged_per_layer[layer], state.num_prefix, self.margin(layer), self.config.alpha
        )
        x, state.size = merge_weighted(x, state.size, matching)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        return x
