"""Reducing tokens by a group assignment: per-group mean (optionally weighted) and max.

An *assignment* [B, N] gives, for every input token, the output slot it goes into (0..k-1) or -1
where the token is dropped. Pooling, clustering (slots) and learned compressors all reduce to it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(x: Tensor, assignment: Tensor, k: int) -> None:
    if x.ndim != 3:
        raise ValueError(f"expected tokens [B, N, C], got shape {tuple(x.shape)}")
    if assignment.shape != x.shape[:2]:
        raise ValueError(f"assignment {tuple(assignment.shape)} must be [B, N] = {tuple(x.shape[:2])}")
    if k < 1:
        raise ValueError(f"the number of groups k must be >= 1, got {k}")
    if assignment.numel() and int(assignment.max()) >= k:
        raise ValueError(f"assignment holds group {int(assignment.max())}, but k={k}")


def group_sum(x: Tensor, assignment: Tensor, k: int, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum tokens ``x`` [B, N, C] into ``k`` groups by ``assignment`` [B, N] (-1 = dropped).

    ``weight`` [B, N] (default 1) scales each token. Returns ``(sums [B, k, C], total_weight [B, k])``.
    """
    _check(x, assignment, k)
    batch, _, channels = x.shape
    w = (
        torch.ones(assignment.shape, dtype=torch.float32, device=x.device)
        if weight is None
        else weight.float()
    )
    kept = assignment >= 0
    # Dropped tokens go to an extra trash group k that is cut off at the end.
    index = torch.where(kept, assignment, torch.full_like(assignment, k))  # [B, N]
    sums = torch.zeros(batch, k + 1, channels, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, index[..., None].expand(-1, -1, channels), x.float() * w[..., None])
    total = torch.zeros(batch, k + 1, dtype=torch.float32, device=x.device).scatter_add_(1, index, w)
    return sums[:, :k], total[:, :k]


def group_mean(x: Tensor, assignment: Tensor, k: int, weight: Tensor | None = None) -> Tensor:
    """Weighted mean of the tokens of each group: [B, k, C] in ``x``'s dtype. An empty group is zero."""
    sums, total = group_sum(x, assignment, k, weight)
    return (sums / total.clamp_min(1e-12)[..., None]).to(x.dtype)


def group_max(x: Tensor, assignment: Tensor, k: int) -> Tensor:
    """Channel-wise max over the tokens of each group: [B, k, C]. An empty group is zero."""
    _check(x, assignment, k)
    batch, _, channels = x.shape
    index = torch.where(assignment >= 0, assignment, torch.full_like(assignment, k))
    out = torch.full((batch, k + 1, channels), float("-inf"), dtype=x.dtype, device=x.device)
    out = out.scatter_reduce(1, index[..., None].expand(-1, -1, channels), x, reduce="amax")
    out = out[:, :k]
    return torch.where(torch.isinf(out) & (out < 0), torch.zeros_like(out), out)


def group_counts(assignment: Tensor, k: int) -> Tensor:
    """How many input tokens each group holds: [B, k] int64."""
    index = torch.where(assignment >= 0, assignment, torch.full_like(assignment, k))
    counts = torch.zeros(assignment.shape[0], k + 1, dtype=torch.int64, device=assignment.device)
    return counts.scatter_add_(1, index, torch.ones_like(index))[:, :k]
