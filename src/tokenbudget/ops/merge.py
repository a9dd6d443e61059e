"""Merging tokens by a :class:`~tokenbudget.ops.match.Matching`: size-weighted average and source tracking."""

from __future__ import annotations

import torch
from torch import Tensor

from .match import Matching
from .merge_step import merge_rows


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
    # Only the destination rows are computed; every other token is copied exactly.
    out, new_size = merge_rows(x, size, *matching.flat_indices)
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


def merge_mlerp(
    x: Tensor, size: Tensor | None, matching: Matching, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Norm-preserving merge (MLERP, Token Fusion, Kim et al., WACV 2024) of tokens ``x`` [B, N, C].

    Each output token that received merges is the size-weighted mean of its group (the B token
    and the A tokens merged into it, weighted by their sizes exactly as :func:`merge_weighted`),
    rescaled to the largest L2 norm among the group's members:

        mlerp(x_1..x_k; s_1..s_k) = m / ||m|| * max_i ||x_i||,   m = sum_i s_i x_i / sum_i s_i

    Averaging similar but not identical vectors shortens them (||m|| <= max_i ||x_i||), a shift
    in the feature-norm distribution the next block was not trained on; MLERP keeps the direction
    of the average and the norm of the longest member. Tokens that received nothing are left as
    :func:`merge_weighted` leaves them (not renormalized), and sizes add up as in :func:`merge_weighted`. ``eps`` guards a
    mean that is (numerically) the zero vector.

    Returns ``(x_merged [B, N - r, C], size_merged [B, N - r, 1])``.
    """
    batch, num_tokens, _ = x.shape
    mean, new_size = merge_weighted(x, size, matching)  # [B, N - r, C], [B, N - r, 1]
    if matching.r == 0:
        return mean, new_size
    max_norm = matching.merge(x.norm(dim=-1, keepdim=True), mode="amax")  # [B, N - r, 1]
    _, _, dst = matching.flat_indices
    received = torch.zeros(batch * (num_tokens - matching.r), 1, dtype=torch.bool, device=x.device)
    received = received.index_fill_(0, dst, True).view(batch, -1, 1)  # [B, N - r, 1]
    scale = max_norm / mean.norm(dim=-1, keepdim=True).clamp_min(eps)
    scale = torch.where(received, scale, torch.ones_like(scale))
    return mean * scale.to(mean.dtype), new_size


def drop_matched(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Prune-style use of a matching: the merged-away A tokens are dropped, their matches unchanged.

    ``x`` [B, N, C] keeps the rows ``matching.kept_idx`` as they are (a dropped token adds nothing
    to any feature). Its size is added to the size of the token it was matched to, so sizes still
    sum to the input token count and proportional attention and size-weighted pooling count the
    match as standing for the near-duplicate it replaced (the token map sends the dropped patch to
    the match as well: :func:`update_token_map` works unchanged).

    Returns ``(x_kept [B, N - r, C], size_kept [B, N - r, 1])``.
    """
    batch, num_tokens, channels = x.shape
    num_out = num_tokens - matching.r
    kept, src, dst = matching.flat_indices
    out = x.reshape(batch * num_tokens, channels).index_select(0, kept)
    if size is None:
        moved_size = torch.ones(matching.r * batch, 1, device=x.device)
        new_size = torch.ones(batch * num_out, 1, device=x.device).index_add_(0, dst, moved_size)
    else:
        size_rows = size.reshape(batch * num_tokens, 1)
        new_size = size_rows.index_select(0, kept).index_add_(0, dst, size_rows.index_select(0, src))
    return out.view(batch, num_out, channels), new_size.view(batch, num_out, 1)


def size_weighted_mean(tokens: Tensor, size: Tensor) -> Tensor:
    """Mean of tokens ``tokens`` [B, M, C] weighted by their sizes ``size`` [B, M, 1] -> [B, C]:
    the average over the input patches the tokens stand for (what average pooling gives unmerged)."""
    size = size.to(tokens.dtype)
    return (tokens * size).sum(dim=1) / size.sum(dim=1)
