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
