"""ToMe's matching and size-weighted merge as one step, in as few tensor operations as possible.

At batch 1 on a CPU a merging block's cost is not arithmetic (a few hundred thousand FLOPs) but
the fixed cost of each tensor operation (argument parsing, dispatch, allocation, a thread pool
wake-up): about 5-10 us each. :func:`greedy_merge_step` does what
:func:`~tokenbudget.ops.match.bipartite_soft_matching` followed by
:func:`~tokenbudget.ops.merge.merge_weighted` do, with about half the operations:

* one index computation serves the matching and the merge: A/B positions are ``a_start + 2 * row``
  (one ``add``), never looked up; constant index tensors (prefix and B positions, batch offsets,
  the unit sizes of the first merge) are built once per shape and cached;
* the merge touches only the rows that receive merges (:func:`merge_rows`): a destination ``d``
  becomes ``x_d + sum_src (x_src - x_d) * s_src / S_d`` (``S_d`` its new size), which equals the
  size-weighted average; every other token is copied exactly, with no full-size multiply and
  divide. :func:`~tokenbudget.ops.merge.merge_weighted` merges with it too.

The matching itself runs the same operations on the same values as
``bipartite_soft_matching`` (normalise, ``bmm`` of the A and B halves, ``max``, descending
``argsort``), so both choose exactly the same pairs and merge to the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from .limits import split_starts
from .match import Matching, bipartite_soft_matching, max_mergeable


@lru_cache(maxsize=256)
def _step_constants(
    batch: int, num_tokens: int, num_prefix: int, r: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Index tensors of one (batch, N, prefix, r) shape, built once.

    Returns ``(prefix_pos [B, P], b_pos [B, Nb], a_start [] (0-d), in_offsets [B, 1] or None,
    out_offsets [B, 1] or None)``; the offsets turn per-image positions into rows of the flattened
    [B*N, C] input and [B*(N-r), C] output (``None`` at batch 1, where they are zero).
    """
    a_start, b_start = split_starts(num_prefix)
    prefix_pos = torch.arange(num_prefix, device=device).expand(batch, -1)
    b_pos = torch.arange(min(b_start, num_tokens), num_tokens, 2, device=device).expand(batch, -1)
    a0 = torch.tensor(a_start, device=device)
    rows = torch.arange(batch, device=device).unsqueeze(1)
    in_offsets = rows * num_tokens if batch > 1 else None
    out_offsets = rows * (num_tokens - r) if batch > 1 else None
    return prefix_pos, b_pos, a0, in_offsets, out_offsets


@lru_cache(maxsize=256)
def _units(rows: int, device: torch.device) -> Tensor:
    """[rows, 1] float32 ones: the sizes of tokens before any merge (never written to)."""
    return torch.ones(rows, 1, device=device)


def _cached(fn: Callable[..., Tensor | tuple], *args: object) -> Tensor | tuple:
    """``fn(*args)`` through its ``lru_cache``; while ``torch.compile`` traces, the plain function
    (the graph holds the constants; dynamo warns about tracing through a cache)."""
    return fn.__wrapped__(*args) if torch.compiler.is_compiling() else fn(*args)


def merge_rows(
    x: Tensor, size: Tensor | None, kept: Tensor, src: Tensor, dst: Tensor
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge by flattened row indices: the arithmetic of every ToMe merge here.

    Args:
        x: [B, N, C] tokens; ``size``: [B, N, 1] sizes or ``None`` (all 1).
        kept: [B*(N-r)] rows of ``x.reshape(B*N, C)`` that stay, in output order.
        src: [B*r] rows merged away; ``dst``: [B*r] the output row each one goes into.

    Returns ``(out [B*(N-r), C], new_size [B*(N-r), 1])``. A destination ``d`` becomes
    ``x_d + sum_src (x_src - x_d) s_src / S_d`` (``S_d`` its new size), which equals
    ``(s_d x_d + sum_src s_src x_src) / S_d``; every other row is copied exactly.
    """
    batch, num_tokens, channels = x.shape
    rows = x.reshape(batch * num_tokens, channels)
    out = rows.index_select(0, kept)  # every kept token, exactly
    if size is None:
        src_size = _cached(_units, src.shape[0], x.device)
        new_size = _cached(_units, kept.shape[0], x.device).index_add(0, dst, src_size)
    else:
        size_rows = size.reshape(batch * num_tokens, 1)
        src_size = size_rows.index_select(0, src)
        new_size = size_rows.index_select(0, kept).index_add_(0, dst, src_size)
    if src.shape[0] == 0:
        return out, new_size
    dst_size = new_size.index_select(0, dst)
    if x.dtype == torch.float64 and src_size.dtype != torch.float64:  # keep a float64 merge exact
        src_size, dst_size = src_size.double(), dst_size.double()
    delta = rows.index_select(0, src).sub_(out.index_select(0, dst)).mul_(src_size / dst_size)
    return out.index_add_(0, dst, delta), new_size


def _match(metric: Tensor, r: int, num_prefix: int) -> tuple[Tensor, Tensor, Tensor, tuple]:
    """``(kept [B, N - r], src_idx [B, r], dst_idx [B, r], constants)`` for ``0 < r <= max_mergeable``."""
    batch, num_tokens, _ = metric.shape
    constants = _cached(_step_constants, batch, num_tokens, num_prefix, r, metric.device)
    prefix_pos, b_pos, a0 = constants[:3]
    a_start, b_start = split_starts(num_prefix)
    if metric.requires_grad:
        metric = metric.detach()  # the choice is not differentiated (ToMe: under no_grad)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = torch.bmm(metric[:, a_start::2], metric[:, b_start::2].transpose(1, 2))  # [B, Na, Nb]
    best_score, best_b = scores.max(dim=-1)  # [B, Na] each A token's best B partner
    order = best_score.argsort(dim=-1, descending=True)  # [B, Na] most similar first
    src_rows, unm_rows = order.split([r, order.shape[1] - r], dim=1)  # [B, r], [B, Na - r]
    unm_rows = unm_rows.sort(dim=-1).values  # A rows kept, in input order
    # A row i sits at input position a_start + 2 i: one add instead of a lookup.
    kept = torch.cat([prefix_pos, torch.add(a0, unm_rows, alpha=2), b_pos], dim=1)  # [B, N - r]
    src_idx = torch.add(a0, src_rows, alpha=2)  # [B, r]
    dst_idx = best_b.gather(1, src_rows).add_(num_prefix + unm_rows.shape[1])  # [B, r]
    return kept, src_idx, dst_idx, constants


def greedy_matching(metric: Tensor, r: int, num_prefix: int) -> Matching:
    """ToMe's bipartite soft matching (cosine), the same pairs as
    :func:`~tokenbudget.ops.match.bipartite_soft_matching` with fewer operations.

    Args:
        metric: [B, N, D] similarity features (ToMe: attention keys summed over heads).
        r: tokens to remove; clamped to :func:`~tokenbudget.ops.match.max_mergeable`.
        num_prefix: leading tokens that are never merged.

    Returns:
        A :class:`~tokenbudget.ops.match.Matching` in the same token layout.
    """
    num_tokens = metric.shape[1]
    r = max(0, min(r, max_mergeable(num_tokens, num_prefix)))
    if r == 0:
        return bipartite_soft_matching(metric, 0, num_prefix)
    kept, src_idx, dst_idx, _ = _match(metric, r, num_prefix)
    return Matching(kept, src_idx, dst_idx, num_tokens)


def greedy_merge_step(
    x: Tensor, size: Tensor | None, metric: Tensor, r: int, num_prefix: int
) -> tuple[Tensor, Tensor | None, Matching]:
    """One ToMe step: match on ``metric`` and merge ``x`` by size-weighted average.

    Args:
        x: [B, N, C] tokens.
        size: [B, N, 1] float32 token sizes, or ``None`` while every size is 1.
        metric: [B, N, D] similarity features (attention keys summed over heads).
        r: tokens to remove (clamped to what one bipartite step can remove).
        num_prefix: leading tokens that are never merged.

    Returns:
        ``(x_merged [B, N - r, C], size_merged [B, N - r, 1] float32, matching)``; with ``r = 0``,
        ``x`` and ``size`` unchanged. Equal to ``merge_weighted(x, size, bipartite_soft_matching(
        metric, r, num_prefix))``, bit for bit (both merge with :func:`merge_rows`).
    """
    batch, num_tokens, channels = x.shape
    r = max(0, min(r, max_mergeable(num_tokens, num_prefix)))
    if r == 0:
        return x, size, bipartite_soft_matching(metric, 0, num_prefix)
    kept_idx, src_idx, dst_idx, constants = _match(metric, r, num_prefix)
    matching = Matching(kept_idx, src_idx, dst_idx, num_tokens)
    in_offsets, out_offsets = constants[3:]
    if in_offsets is None:
        kept, src, dst = kept_idx.view(-1), src_idx.view(-1), dst_idx.view(-1)
    else:  # rows of the flattened batch
        kept = (kept_idx + in_offsets).view(-1)
        src = (src_idx + in_offsets).view(-1)
        dst = (dst_idx + out_offsets).view(-1)
    out, new_size = merge_rows(x, size, kept, src, dst)
    return out.view(batch, num_tokens - r, channels), new_size.view(batch, num_tokens - r, 1), matching
