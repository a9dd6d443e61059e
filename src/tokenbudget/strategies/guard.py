"""The entropy guard: a block merges less in an image whose token diversity would fall below a floor.

Before a block reduces its tokens, the guard measures the token entropy
(:func:`tokenbudget.ops.entropy.token_entropy`, a fraction of its maximum) of the non-prefix tokens
that would remain. An image whose entropy would fall below ``floor`` merges fewer tokens in that
block: the largest number ``c`` of the planned merges, taken in the matcher's order (ToMe's: most
similar pair first), whose result still has entropy >= ``floor``, found by binary search over ``c``
for each image (the search assumes the entropy falls as merges are added; the count it returns
always satisfies the floor, since 0 merges does). An image that is already below the floor before
the block (``before < floor``) is held to ``before`` instead: it may merge as long as that does not
lower its entropy further, so identical tokens (entropy 0 throughout) merge freely.

Per-image counts keep the batch rectangular with size-0 padding (:mod:`tokenbudget.ops.ragged`):
the batch is as wide as its widest image. When no image fires and none carries padding, the block
runs exactly the strategy's own merge (the guard only measures), so outputs equal the unguarded
method's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.entropy import token_entropy
from ..ops.match import Matching
from ..ops.merge import drop_matched, merge_mlerp, merge_weighted, update_token_map
from ..ops.prune import select_tokens
from ..ops.ragged import compaction, merge_pairs, pair_positions, redirect_map
from ..state import TokenState

#: slack on the entropy comparisons: float32 round-off in the eigenvalues is ~1e-6
TOLERANCE = 1e-5

_PLAIN_MERGES = {"mean": merge_weighted, "drop": drop_matched, "mlerp": merge_mlerp}


class EntropyGuard:
    """Applies a :class:`~tokenbudget.ops.match.Matching` to a block's tokens, merging less where the
    token entropy would fall below ``floor`` (see the module docstring)."""

    def __init__(self, floor: float) -> None:
        self.floor = float(floor)

    def reduce(
        self, x: Tensor, state: TokenState, layer: int, matching: Matching, mode: str = "mean"
    ) -> Tensor:
        """Merge tokens ``x`` [B, N, C] by ``matching`` (computed with ``padding=state.padding``) in
        ``mode`` (``"mean"``, ``"drop"``, ``"mlerp"``: :func:`tokenbudget.ops.ragged.merge_pairs`);
        updates ``state`` (sizes, padding, token map, positions, ``guard_layers``) in place."""
        p = state.num_prefix
        after = None  # [B] entropy after the whole matching, when measured on the plain merge
        if state.padding is None:
            merged, size = _PLAIN_MERGES[mode](x, state.size, matching)
            after = token_entropy(merged[:, p:], size[:, p:])  # [B]
            if bool((after >= self.floor - TOLERANCE).all()):
                self._commit_plain(state, layer, matching, size)
                return merged
        src, dst = pair_positions(matching)  # [B, r] input positions, most similar first
        size = state.size if state.size is not None else torch.ones(*x.shape[:2], 1, device=x.device)
        real = size[..., 0] > 0  # [B, N]
        valid = real.gather(1, src) & real.gather(1, dst)
        possible = valid.to(torch.long).cumprod(dim=1).sum(dim=1)  # [B] leading real-real pairs
        counts = self._search(x, size, src, dst, possible, mode, p, after)
        take = torch.arange(src.shape[1], device=x.device) < counts.unsqueeze(1)  # [B, r]
        x, size = merge_pairs(x, size, src, dst, take, mode)
        order, inverse = compaction(size, p)  # [B, W], [B, N]
        if state.positions is not None:
            positions, _ = merge_pairs(state.positions, state.size, src, dst, take, "mean")
            state.positions = select_tokens(positions, order)
        if state.token_map is not None:
            moved = redirect_map(src, dst, take, x.shape[1]).gather(1, state.token_map)
            state.token_map = inverse.gather(1, moved)
        x, size = select_tokens(x, order), select_tokens(size, order)
        padding = size[..., 0] <= 0  # [B, W]
        state.size = size
        state.padding = padding if bool(padding.any()) else None
        state.guard_layers[layer] = (counts, possible - counts, padding.sum(dim=1))
        return x

    def _commit_plain(self, state: TokenState, layer: int, matching: Matching, size: Tensor) -> None:
        """Every image takes the whole matching: exactly the unguarded method's update."""
        if state.positions is not None:
            state.positions, _ = merge_weighted(state.positions, state.size, matching)
        if state.token_map is not None:
            state.token_map = update_token_map(state.token_map, matching)
        state.size = size
        full = torch.full((size.shape[0],), matching.r, dtype=torch.long, device=size.device)
        state.guard_layers[layer] = (full, torch.zeros_like(full), torch.zeros_like(full))

    def _search(
        self,
        x: Tensor,
        size: Tensor,
        src: Tensor,
        dst: Tensor,
        possible: Tensor,
        mode: str,
        p: int,
        after: Tensor | None = None,
    ) -> Tensor:
        """[B] merges per image: ``possible`` where the floor holds, else the binary-search count.
        ``after`` [B]: the entropy after ``possible`` merges, if already measured."""
        steps = torch.arange(src.shape[1], device=x.device)

        def entropy_after(rows: Tensor, counts: Tensor) -> Tensor:
            take = steps < counts.unsqueeze(1)
            merged, merged_size = merge_pairs(x[rows], size[rows], src[rows], dst[rows], take, mode)
            return token_entropy(merged[:, p:], merged_size[:, p:])

        if after is None:
            after = entropy_after(torch.arange(x.shape[0], device=x.device), possible)
        low = after < self.floor - TOLERANCE
        counts = possible.clone()
        if not bool(low.any()):
            return counts
        rows = low.nonzero()[:, 0]
        before = token_entropy(x[rows, p:], size[rows, p:])
        threshold = torch.minimum(before, torch.full_like(before, self.floor)) - TOLERANCE
        fails = after[rows] < threshold
        rows, threshold = rows[fails], threshold[fails]
        # largest c in [0, possible) with entropy_after(c) >= threshold; c = 0 always qualifies
        lo = torch.zeros_like(rows)
        hi = possible[rows] - 1
        while bool((lo < hi).any()):
            mid = (lo + hi + 1) // 2
            ok = entropy_after(rows, mid) >= threshold
            active = lo < hi
            lo = torch.where(active & ok, mid, lo)
            hi = torch.where(active & ~ok, mid - 1, hi)
        counts[rows] = lo
        return counts
