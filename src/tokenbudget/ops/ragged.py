"""Per-image merge counts in a rectangular batch: merges in place, then size-0 padding at the end.

A batch must stay rectangular, but the entropy guard lets each image merge its own number of
tokens. Merges are therefore first applied *in place* (:func:`merge_pairs`): the merged-away token
keeps its slot with size 0, its content and size go to its destination. Then :func:`compaction`
moves every size-0 slot behind the real tokens and cuts the batch to the widest image. A narrower
image carries size-0 padding, which every size-weighted op ignores (a merge weighs it 0, pooling
weighs it 0) and which proportional attention's bias ``log(size) = -inf`` masks out as a key.

The real tokens keep ToMe's layout (:mod:`tokenbudget.ops.match`): prefix tokens, then the
unmerged tokens of set A (even positions) in input order, then those of set B, then padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .match import Matching

MERGE_MODES = ("mean", "drop", "mlerp")


def pair_positions(matching: Matching) -> tuple[Tensor, Tensor]:
    """(src [B, r], dst [B, r]): the *input* positions of each merged-away token and of the token it
    is merged into, in the matching's order (ToMe's: most similar first)."""
    return matching.src_idx, matching.kept_idx.gather(1, matching.dst_idx)


def merge_pairs(
    x: Tensor, size: Tensor | None, src: Tensor, dst: Tensor, take: Tensor, mode: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Apply the pairs with ``take`` set, in place: [B, N, C] stays [B, N, C].

    Args:
        x: [B, N, C] tokens.
        size: [B, N, 1] sizes, or ``None`` (all 1).
        src: [B, K] positions merged away (pairwise distinct per image, never a destination).
        dst: [B, K] positions they merge into.
        take: [B, K] bool, which pairs to apply (images may take different numbers).
        mode: ``"mean"`` size-weighted average (ToMe), ``"drop"`` the destination keeps its vector
            and only gains the size (ToFu's pruning), ``"mlerp"`` the mean rescaled to the largest
            norm of the group (ToFu's MLERP, :func:`tokenbudget.ops.merge.merge_mlerp`).

    Returns:
        ``(x [B, N, C], size [B, N, 1])``: destinations hold the merged result and the summed sizes;
        taken sources keep their (now meaningless) vector with size 0.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"unknown merge mode {mode!r}; use one of {MERGE_MODES}")
    batch, num_tokens, channels = x.shape
    if size is None:
        size = torch.ones(batch, num_tokens, 1, device=x.device)
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * num_tokens  # [B, 1]
    flat_take = take.reshape(-1)
    src_rows = (src + offsets).reshape(-1)[flat_take]  # [G] rows of [B * N]
    dst_rows = (dst + offsets).reshape(-1)[flat_take]
    rows = x.reshape(batch * num_tokens, channels)
    size_rows = size.reshape(batch * num_tokens, 1)
    moved_size = size_rows.index_select(0, src_rows)
    new_size = size_rows.index_add(0, dst_rows, moved_size).index_fill_(0, src_rows, 0.0)
    if mode == "drop":
        return x, new_size.view(batch, num_tokens, 1)
    weighted = rows * size_rows.to(x.dtype)
    summed = weighted.index_add(0, dst_rows, weighted.index_select(0, src_rows))
    received = torch.zeros(batch * num_tokens, 1, dtype=torch.bool, device=x.device).index_fill_(
        0, dst_rows, True
    )
    mean = summed / new_size.clamp_min(torch.finfo(new_size.dtype).tiny).to(x.dtype)
    out = torch.where(received, mean, rows)  # untouched tokens stay bit-exact
    if mode == "mlerp":
        norms = rows.norm(dim=-1, keepdim=True)
        max_norm = norms.scatter_reduce(
            0, dst_rows.unsqueeze(1), norms.index_select(0, src_rows), reduce="amax", include_self=True
        )
        scale = max_norm / out.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        out = torch.where(received, out * scale, out)
    return out.view(batch, num_tokens, channels), new_size.view(batch, num_tokens, 1)


def redirect_map(src: Tensor, dst: Tensor, take: Tensor, num_tokens: int) -> Tensor:
    """[B, N] where each input position's content is after :func:`merge_pairs`: taken sources point
    to their destination, every other position to itself."""
    batch = src.shape[0]
    redirect = torch.arange(num_tokens, device=src.device).expand(batch, -1).clone()
    return redirect.scatter_(1, src, torch.where(take, dst, src))


def compaction(size: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """The rectangular layout after in-place merges.

    Args:
        size: [B, N, 1] sizes, 0 for padding (prefix tokens always have a positive size).
        num_prefix: leading tokens kept in front.

    Returns:
        ``(order [B, W], inverse [B, N])``: ``order`` lists the input positions of the output tokens
        (prefix, real A tokens in input order, real B tokens in input order, then padding), ``W`` the
        widest image's token count; ``inverse`` the output position of every input position
        (meaningful for the real ones).
    """
    batch, num_tokens = size.shape[:2]
    device = size.device
    pos = torch.arange(num_tokens, device=device)
    # the alternating split of ToMe over all tokens (see ops.match._layout): A = even, B = odd
    group = torch.where(pos < num_prefix, 0, torch.where(pos % 2 == 0, 1, 2)).expand(batch, -1)
    group = torch.where(size[..., 0] > 0, group, torch.full_like(group, 3))  # padding last
    order = (group * num_tokens + pos).argsort(dim=1)  # [B, N], keys are distinct
    width = num_tokens - int((group == 3).sum(dim=1).min())
    inverse = torch.empty_like(order).scatter_(1, order, pos.expand(batch, -1))
    return order[:, :width], inverse
