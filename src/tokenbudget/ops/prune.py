"""Dropping tokens: choose which to keep, then select them (prefix tokens always kept, in front)."""

from __future__ import annotations

import torch
from torch import Tensor


def random_keep_indices(
    batch: int,
    num_tokens: int,
    num_drop: int,
    num_prefix: int,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """[B, N - num_drop] positions to keep: the prefix, then a random subset of the rest in input order."""
    mergeable = num_tokens - num_prefix
    num_drop = max(0, min(num_drop, mergeable))
    scores = torch.rand(batch, mergeable, generator=generator, device=device)  # [B, N - p]
    keep = scores.topk(mergeable - num_drop, dim=1).indices.sort(dim=1).values + num_prefix
    prefix = torch.arange(num_prefix, device=device).expand(batch, -1)
    return torch.cat([prefix, keep], dim=1)


def select_tokens(x: Tensor, keep_idx: Tensor) -> Tensor:
    """Rows ``keep_idx`` [B, K] of tokens ``x`` [B, N, C] -> [B, K, C]."""
    batch, num_tokens, channels = x.shape
    flat = keep_idx + torch.arange(batch, device=x.device).unsqueeze(1) * num_tokens
    return x.reshape(batch * num_tokens, channels).index_select(0, flat.reshape(-1)).view(batch, -1, channels)


def top_k_split(scores: Tensor, k: int, num_prefix: int) -> tuple[Tensor, Tensor]:
    """Split token positions by importance: the prefix and the ``k`` best-scored others, and the rest.

    Args:
        scores: [B, M] importance of the M non-prefix tokens (higher = more important).
        k: non-prefix tokens to keep (0 <= k <= M).
        num_prefix: leading tokens kept whatever their score; positions count them.

    Returns:
        ``(keep_idx [B, num_prefix + k], drop_idx [B, M - k])``: positions in the full sequence of
        ``num_prefix + M`` tokens, each in input order (so kept tokens stay in spatial order).
    """
    batch, mergeable = scores.shape
    if not 0 <= k <= mergeable:
        raise ValueError(f"cannot keep {k} of {mergeable} tokens")
    order = scores.argsort(dim=1, descending=True)  # [B, M]
    keep = order[:, :k].sort(dim=1).values + num_prefix
    drop = order[:, k:].sort(dim=1).values + num_prefix
    prefix = torch.arange(num_prefix, device=scores.device).expand(batch, -1)
    return torch.cat([prefix, keep], dim=1), drop


def fuse_tokens(x: Tensor, size: Tensor | None, drop_idx: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """One token standing for the dropped tokens: their ``weights``-weighted average (EViT's fusion).

    Args:
        x: [B, N, C] tokens.
        size: [B, N, 1] input tokens each token stands for, or ``None`` (all 1).
        drop_idx: [B, D] positions of the tokens to fuse (D >= 1).
        weights: [B, N] non-negative importance of every token (e.g. class attention); only the
            dropped positions are read. Weights summing to 0 fall back to the plain average.

    Returns:
        ``(token [B, 1, C], token_size [B, 1, 1])``: the size is the sum of the fused sizes, so
        size-weighted pooling and proportional attention count the fused token as all its patches.
    """
    dropped = select_tokens(x, drop_idx)  # [B, D, C]
    w = weights.gather(1, drop_idx).to(x.dtype).unsqueeze(-1)  # [B, D, 1]
    total = w.sum(dim=1, keepdim=True)  # [B, 1, 1]
    uniform = torch.full_like(w, 1.0 / w.shape[1])
    w = torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), uniform)
    token = (dropped * w).sum(dim=1, keepdim=True)
    if size is None:
        token_size = torch.full((x.shape[0], 1, 1), float(drop_idx.shape[1]), device=x.device)
    else:
        token_size = select_tokens(size, drop_idx).sum(dim=1, keepdim=True)
    return token, token_size
