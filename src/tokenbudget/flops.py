"""FLOPs of transformer blocks under token reduction, and the FLOPs-ideal speedup.

Per block, counting a multiply-add as 2 FLOPs, with width C, attention width A and MLP hidden H
(ViT: A = C, H = 4C):
    attention on the N tokens entering the block:  2*N*C*3A + 2*N*A*C + 4*N^2*A   (= 8NC^2 + 4N^2C)
    MLP on the N' tokens left after the block's merge:  4*N'*C*H                 (= 16N'C^2)
Matching, norms and activations are left out: the ideal speedup is what a free reduction would give.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockDims:
    """Widths of a transformer block: model width, attention width, MLP hidden width."""

    dim: int
    attn_dim: int
    mlp_hidden: int


def block_flops(tokens_in: int, tokens_out: int, dims: BlockDims) -> int:
    """FLOPs of one block that receives ``tokens_in`` tokens and merges down to ``tokens_out``."""
    c, a, h = dims.dim, dims.attn_dim, dims.mlp_hidden
    attention = 2 * tokens_in * c * 3 * a + 2 * tokens_in * a * c + 4 * tokens_in**2 * a
    mlp = 4 * tokens_out * c * h
    return attention + mlp


def model_flops(input_tokens: int, tokens_per_layer: Sequence[int], dims: Sequence[BlockDims]) -> int:
    """Block FLOPs of one image through all blocks, given the token count after each block."""
    total, n_in = 0, input_tokens
    for n_out, d in zip(tokens_per_layer, dims, strict=True):
        total += block_flops(n_in, n_out, d)
        n_in = n_out
    return total


def ideal_speedup(input_tokens: int, tokens_per_layer: Sequence[int], dims: Sequence[BlockDims]) -> float:
    """Block FLOPs without reduction over block FLOPs with it."""
    full = model_flops(input_tokens, [input_tokens] * len(dims), dims)
    return full / model_flops(input_tokens, tokens_per_layer, dims)
