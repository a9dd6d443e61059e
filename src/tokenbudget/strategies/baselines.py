"""Simple baselines at the same per-layer token counts as ToMe: random drop and spatial pooling."""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import GridPool, RandomDrop
from ..ops.match import bipartite_soft_matching
from ..ops.merge import merge_weighted, update_token_map
from ..ops.prune import random_keep_indices, select_tokens
from ..state import TokenState
from .base import ScheduledStrategy, register
from .guard import EntropyGuard


@register(RandomDrop)
class RandomDropStrategy(ScheduledStrategy):
    """Drops random non-prefix tokens after each block's attention (seeded per block)."""

    def reduce(self, x: Tensor, keys: Tensor | None, state: TokenState, layer: int) -> Tensor:
        generator = torch.Generator(device=x.device).manual_seed(self.config.seed + layer)
        keep = random_keep_indices(
            x.shape[0], x.shape[1], state.merged_per_layer[layer], state.num_prefix, generator, x.device
        )  # [B, N - r]
        return select_tokens(x, keep)


@register(GridPool)
class GridPoolStrategy(ScheduledStrategy):
    """Merges each token into its spatially nearest partner: content-blind 2-D average pooling."""

    needs_positions = True

    def __init__(self, config: GridPool, num_layers: int) -> None:
        super().__init__(config, num_layers)
        floor = config.entropy_floor
        self.guard = EntropyGuard(floor) if floor is not None else None

    def reduce(self, x: Tensor, keys: Tensor | None, state: TokenState, layer: int) -> Tensor:
        positions = state.positions  # [B, N, 2] centroid (row, col) of the patches of each token
        batch, num_tokens = x.shape[:2]
        # Every A token has a partner at distance 1 on the first grid: a seeded tie-break spreads
        # the merges over the image instead of taking the top rows first.
        num_a = len(range(2 * ((state.num_prefix + 1) // 2), num_tokens, 2))
        generator = torch.Generator(device="cpu").manual_seed(layer)
        tie_break = (torch.rand(batch, num_a, generator=generator) * 1e-3).to(x.device)
        matching = bipartite_soft_matching(
            positions,
            state.merged_per_layer[layer],
            state.num_prefix,
            similarity="neg_sqdist",
            tie_break=tie_break,
            **({} if state.padding is None else {"padding": state.padding}),
        )
        if self.guard is not None:
            return self.guard.reduce(x, state, layer, matching, "mean")
        state.positions, _ = merge_weighted(positions, state.size, matching)
        x, state.size = merge_weighted(x, state.size, matching)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        return x
