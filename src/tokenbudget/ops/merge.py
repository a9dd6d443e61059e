"""Merging tokens by a :class:`~tokenbudget.ops.match.Matching`: size-weighted average and source tracking."""

from __future__ import annotations

import torch
from torch import Tensor

from .match import Matching


def merge_weighted(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge of tokens ``x`` [B, N, C] with sizes ``size`` [B, N, 1].

    A merged token is the average of the input tokens it stands for, so each token carries its
    size (how many input patches it covers) and merges are weighted by it. ``size=None`` means every
    token has size 1 (no merge happened yet). Sizes are kept in float32 whatever the dtype of ``x``
    (bfloat16 cannot count past 256).

    Returns ``(x_merged [B, N - r, C], size_merged [B, N - r, 1])``.
    """
    batch, num_tokens, channels = x.shape
    num_out = num_tokens - matching.r
    kept, src, dst = matching.flat_indices
    rows = x.reshape(batch * num_tokens, channels)
    # Select first and weight the selected rows in place: no full-size x * size temporary.
    out = rows.index_select(0, kept)  # [B * (N - r), C]
    moved = rows.index_select(0, src)  # [B * r, C]
    if size is None:
        moved_size = torch.ones(matching.r * batch, 1, device=x.device)
        new_size = torch.ones(batch * num_out, 1, device=x.device).index_add_(0, dst, moved_size)
    else:
        size_rows = size.reshape(batch * num_tokens, 1)
        kept_size = size_rows.index_select(0, kept)
        moved_size = size_rows.index_select(0, src)
        out.mul_(kept_size)
        moved = (moved * moved_size).to(x.dtype)
        # Out of place: autograd keeps kept_size for the mul_ above.
        new_size = kept_size.index_add(0, dst, moved_size)
    out.index_add_(0, dst, moved)
    out.div_(new_size)
    return out.view(batch, num_out, channels), new_size.view(batch, num_out, 1)


def update_token_map(token_map: Tensor, matching: Matching) -> Tensor:
    """Follow input tokens through one merge.

    Args:
        token_map: [B, N0] for each token of the model's input, the index of the current token
            (of N) that contains it.
        matching: the matching that reduces N tokens to N - r.

    Returns:
        [B, N0] the index among the N - r output tokens.
    """
    return matching.position_map().gather(1, token_map)


def token_map_to_source(token_map: Tensor, num_tokens: int) -> Tensor:
    """Dense source map [B, N, N0] (bool): ``source[b, i, j]`` is True when current token ``i``
    contains input token ``j``. Each column has exactly one True (the map is a partition)."""
    batch, num_inputs = token_map.shape
    source = torch.zeros(batch, num_tokens, num_inputs, dtype=torch.bool, device=token_map.device)
    source.scatter_(1, token_map.unsqueeze(1), True)
    return source


def size_weighted_mean(tokens: Tensor, size: Tensor) -> Tensor:
    """Mean of tokens ``tokens`` [B, M, C] weighted by their sizes ``size`` [B, M, 1] -> [B, C]:
    the average over the input patches the tokens stand for (what average pooling gives unmerged)."""
    size = size.to(tokens.dtype)
    return (tokens * size).sum(dim=1) / size.sum(dim=1)
