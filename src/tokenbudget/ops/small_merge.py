"""Average only small groups: a matched pair is averaged while its group stays small, else the
redundant token is dropped (its size still moves to its match)."""

from __future__ import annotations

import torch
from torch import Tensor

from .match import Matching


def merge_small_groups(
    x: Tensor, size: Tensor | None, matching: Matching, max_size: int
) -> tuple[Tensor, Tensor]:
    """Apply ``matching`` to tokens ``x`` [B, N, C] with sizes ``size`` [B, N, 1] (``None``: all 1).

    Every destination token whose group after this block stands for at most ``max_size`` patches
    becomes the size-weighted average of its group (ToMe's merge); a destination whose group
    would be larger keeps its own features and the tokens matched to it are dropped
    (:func:`tokenbudget.ops.merge.drop_matched`). Sizes always add up, so they still sum to the
    input token count.

    Returns ``(x_out [B, N - r, C], size_out [B, N - r, 1])``.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be an int >= 1 (patches), got {max_size!r}")
    batch, num_tokens, channels = x.shape
    num_out = num_tokens - matching.r
    kept, src, dst = matching.flat_indices
    rows, kept_size, src_size, new_size = flat_group_sizes(x, size, kept, src, dst)
    small = (new_size.index_select(0, dst) <= max_size).to(x.dtype)  # [B*r, 1] 1: average this pair
    weight = src_size * small
    total = rows.index_select(0, kept) * kept_size
    total.index_add_(0, dst, rows.index_select(0, src) * weight)
    out = total / kept_size.index_add(0, dst, weight)
    return out.view(batch, num_out, channels), new_size.view(batch, num_out, 1)


def flat_group_sizes(
    x: Tensor, size: Tensor | None, kept: Tensor, src: Tensor, dst: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The flat views a destination-rows merge step works on, from a matching's ``flat_indices``.

    Returns ``rows`` [B*N, C] (``x`` flattened), ``kept_size`` [B*(N-r), 1] and ``src_size`` [B*r, 1]
    (token sizes, 1 where ``size`` is ``None``, in ``x``'s dtype) and ``new_size`` [B*(N-r), 1], each
    kept token's size with its sources added (the whole group, whether sources are averaged or dropped).
    """
    batch, num_tokens, channels = x.shape
    rows = x.reshape(batch * num_tokens, channels)
    if size is None:
        size_rows = torch.ones(batch * num_tokens, 1, device=x.device, dtype=x.dtype)
    else:
        size_rows = size.reshape(batch * num_tokens, 1).to(x.dtype)
    kept_size = size_rows.index_select(0, kept)
    src_size = size_rows.index_select(0, src)
    return rows, kept_size, src_size, kept_size.index_add(0, dst, src_size)
