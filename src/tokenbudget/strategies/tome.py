"""ToMe as a strategy: plan the per-layer counts, then merge after each block's attention."""

from __future__ import annotations

from torch import Tensor

from ..config import ToMe
from ..ops.match import bipartite_soft_matching
from ..ops.merge import merge_weighted, update_token_map
from ..schedule import clamp_schedule, resolve_schedule
from ..state import TokenState


class ToMeStrategy:
    """Merges ``state.merged_per_layer[layer]`` tokens after the attention of block ``layer``."""

    #: the adapter must hand :meth:`reduce` the attention keys averaged over heads [B, N, d].
    needs_keys = True

    def __init__(self, config: ToMe, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers
        # Plans depend only on the input length; cached so a forward does no schedule work.
        # Plain dict: concurrent forwards at worst compute the same plan twice.
        self._plans: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    @property
    def prop_attn(self) -> bool:
        return self.config.prop_attn

    @property
    def trace_source(self) -> bool:
        return self.config.trace_source

    def plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        """(requested, merged) counts per block for an input of ``num_tokens`` tokens."""
        key = (num_tokens, num_prefix)
        plan = self._plans.get(key)
        if plan is None:
            c = self.config
            requested = resolve_schedule(
                r=c.r,
                keep=c.keep,
                tokens=c.tokens,
                num_tokens=num_tokens,
                num_prefix=num_prefix,
                num_layers=self.num_layers,
            )
            plan = (requested, clamp_schedule(requested, num_tokens, num_prefix))
            self._plans[key] = plan
        return plan

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        """Merge tokens ``x`` [B, N, C] using ``keys`` [B, N, d] (head-averaged attention keys, any
        positive scale); updates ``state`` in place."""
        matching = bipartite_soft_matching(keys, state.merged_per_layer[layer], state.num_prefix)
        x, state.size = merge_weighted(x, state.size, matching)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        return x
