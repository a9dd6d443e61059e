"""2-D average and max pooling of the patch grid to a target token count (prefix tokens kept).

The k outputs form a (kh, kw) grid with kh * kw = k, the factor pair of k whose aspect is closest
to the input grid's. Each input patch goes to exactly one output cell (row bin floor(y * kh / h),
column bin floor(x * kw / w)), so the bins never overlap and ``.assignment`` is a true partition;
when h is not a multiple of kh the bins differ in size by one row (or column).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops.group import group_max, group_mean
from .base import Budget, CompressedTokens, check_budget, check_tokens, infer_grid, pack, prefix_assignment

POOL_MODES = ("avg", "max")


def output_grid(k: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The factor pair (kh, kw) of ``k`` whose aspect kh/kw is closest to h/w (ties: more rows)."""
    h, w = grid
    pairs = [(a, k // a) for a in range(1, k + 1) if k % a == 0 and a <= h and k // a <= w]
    if not pairs:
        raise ValueError(f"k={k} cannot be laid out as a grid of at most {h} x {w} cells")
    target = math.log(h / w)
    return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1]) - target), -p[0]))


def grid_assignment(grid: tuple[int, int], out_grid: tuple[int, int], device: torch.device) -> Tensor:
    """[h * w] int64: the output cell (row-major on ``out_grid``) of every input patch."""
    (h, w), (kh, kw) = grid, out_grid
    rows = torch.arange(h, device=device) * kh // h  # [h]
    cols = torch.arange(w, device=device) * kw // w  # [w]
    return (rows[:, None] * kw + cols[None, :]).flatten()


def pool(
    tokens: Tensor,
    k: Budget,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix: int = 0,
    mode: str = "avg",
) -> CompressedTokens:
    """Pool the patch tokens of ``tokens`` [B, N, C] to ``k`` tokens per image on a coarser grid.

    ``mode``: "avg" (mean of each cell) or "max" (channel-wise max). ``k`` must factor into a grid
    that fits the input grid (a k with no such factor pair, e.g. a prime above w, is refused).
    """
    if mode not in POOL_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; use one of {POOL_MODES}")
    batch, n, _ = check_tokens(tokens, num_prefix)
    grid = infer_grid(n - num_prefix, grid)
    ks = check_budget(k, batch, n - num_prefix)
    prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
    outputs, rows = [], []
    for b, kb in enumerate(ks):
        cells = grid_assignment(grid, output_grid(kb, grid), tokens.device)  # [h * w]
        x = patches[b : b + 1]
        pooled = group_mean(x, cells[None], kb) if mode == "avg" else group_max(x, cells[None], kb)
        outputs.append(pooled[0])
        rows.append(cells + num_prefix)
    assignment = torch.cat([prefix_assignment(batch, num_prefix, tokens.device), torch.stack(rows)], dim=1)
    return pack(prefix, outputs, assignment)
