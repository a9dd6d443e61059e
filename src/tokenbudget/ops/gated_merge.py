"""Per-pair choice between averaging and dropping: each matched pair is either averaged (ToMe,
optionally norm-kept as ToFu's MLERP) or its redundant token dropped (its size still moves to its
match), decided from the pair's own key similarity."""

from __future__ import annotations

import torch
from torch import Tensor

from .match import Matching
from .small_merge import flat_group_sizes


def pair_similarity(keys: Tensor, matching: Matching) -> Tensor:
    """[B, r] cosine similarity of the keys ``keys`` [B, N, d] of each matched pair (the merged-away
    token and the token it is matched to), in the order of ``matching.src_idx``."""
    batch, _, dim = keys.shape
    if matching.r == 0:
        return keys.new_zeros(batch, 0)
    dst_in = matching.kept_idx.gather(1, matching.dst_idx)  # [B, r] input position of each match
    src = keys.gather(1, matching.src_idx.unsqueeze(-1).expand(-1, -1, dim))
    dst = keys.gather(1, dst_in.unsqueeze(-1).expand(-1, -1, dim))
    return torch.nn.functional.cosine_similarity(src.float(), dst.float(), dim=-1)


def merge_gated(
    x: Tensor, size: Tensor | None, matching: Matching, gate: Tensor, fuse: str = "mean", eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Apply ``matching`` to tokens ``x`` [B, N, C] (sizes ``size`` [B, N, 1], ``None``: all 1) with a
    per-pair choice ``gate`` [B, r] (bool, in the order of ``matching.src_idx``): True averages the
    merged-away token into its match (size-weighted, ToMe), False drops it (its match keeps its own
    features). Sizes always add up, so they still sum to the input token count.

    ``fuse="mlerp"``: a destination that averaged anything is rescaled to the largest norm among
    the members it averaged (ToFu's MLERP: averages of similar vectors are shorter than any member).

    Returns ``(x_out [B, N - r, C], size_out [B, N - r, 1])``.
    """
    if fuse not in ("mean", "mlerp"):
        raise ValueError(f"fuse must be 'mean' (size-weighted average) or 'mlerp' (norm kept), got {fuse!r}")
    batch, num_tokens, channels = x.shape
    if gate.shape != (batch, matching.r):
        raise ValueError(f"gate must be [B, r] = {[batch, matching.r]}, got {list(gate.shape)}")
    num_out = num_tokens - matching.r
    kept, src, dst = matching.flat_indices
    rows, kept_size, src_size, new_size = flat_group_sizes(x, size, kept, src, dst)
    weight = src_size * gate.reshape(-1, 1).to(x.dtype)  # 0 for a dropped pair
    kept_rows = rows.index_select(0, kept)
    src_rows = rows.index_select(0, src)
    # Only destination rows change: d + sum_src (x_src - d) * w_src / W_d equals the weighted
    # average (W_d: the destination's size plus its averaged members'), with no full-size multiply.
    averaged_size = kept_size.index_add(0, dst, weight)  # [B*(N-r), 1]
    dst_rows = kept_rows.index_select(0, dst)  # [B*r, C] each pair's destination before the merge
    delta = (src_rows - dst_rows) * (weight / averaged_size.index_select(0, dst))
    out = kept_rows.index_add_(0, dst, delta)  # kept_rows is this function's own copy: add in place
    if fuse == "mlerp" and matching.r > 0:
        # Rescale only the destination rows (a few per block), never a full-size pass: each pair's
        # destination gets its group's longest averaged member's norm (a dropped member does not count).
        gate_rows = gate.reshape(-1, 1).to(x.dtype)
        dst_before = dst_rows.norm(dim=-1, keepdim=True)  # [B*r, 1]
        member = torch.maximum(dst_before, src_rows.norm(dim=-1, keepdim=True) * gate_rows)
        longest = torch.zeros_like(averaged_size).scatter_reduce(0, dst[:, None], member, "amax")
        averaged = torch.zeros_like(averaged_size).index_add_(0, dst, gate_rows) > 0  # [B*(N-r), 1]
        dst_after = out.index_select(0, dst)  # [B*r, C]
        scale = longest.index_select(0, dst) / dst_after.norm(dim=-1, keepdim=True).clamp_min(eps)
        scale = torch.where(averaged.index_select(0, dst), scale, torch.ones_like(scale))
        out.index_copy_(0, dst, dst_after * scale)  # repeated destinations write the same row
    return out.view(batch, num_out, channels), new_size.view(batch, num_out, 1)


__all__ = ["merge_gated", "pair_similarity"]
