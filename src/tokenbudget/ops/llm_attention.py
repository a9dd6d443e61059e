"""One query row of a decoder's causal self-attention, and top-k of visual tokens per image span.

FastV scores the visual tokens of a prompt by the attention its last token pays them at one decoder
layer. Rather than asking the model for its full attention maps (which forces the slow eager path),
the adapter recomputes just that one row from the layer's own q/k projections; these are the pure
tensor parts of that: rotary embedding, grouped-query head repeat, the masked softmax of one row,
and choosing the kept positions. No model knowledge here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` -> ``(..., D)``: the halves swapped, the new first half negated (RoPE's rotation)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``(B, H, L, D)`` with ``cos``/``sin`` ``(B or 1, L, D)``.

    The "rotate half" layout of Llama, Qwen2 and Qwen2-VL (whose 3-D mrope is already folded into
    ``cos``/``sin`` by the model's rotary module).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def repeat_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: ``(B, Hkv, L, D)`` -> ``(B, Hkv * n_rep, L, D)``, each head repeated."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


def row_mask_bias(mask_row: torch.Tensor | None, query_index: torch.Tensor, length: int) -> torch.Tensor:
    """Additive float32 bias ``(B, L)`` (0 or -inf) for one query row per batch row.

    ``mask_row``: that row of the layer's attention mask, ``(B, L)``: bool (True = may attend) or
    additive float (0 = may attend, very negative = masked). ``None`` means a plain causal mask: the
    query at ``query_index`` ``(B,)`` sees the keys at or before it.
    """
    if mask_row is None:
        keys = torch.arange(length, device=query_index.device)
        allowed = keys[None, :] <= query_index[:, None]
    elif mask_row.dtype == torch.bool:
        allowed = mask_row
    else:
        # eager masks hold the dtype's minimum for masked keys, not -inf; treat any such value as masked
        allowed = mask_row.float() > torch.finfo(mask_row.dtype).min / 2
    zero = torch.zeros((), dtype=torch.float32, device=allowed.device)
    return torch.where(allowed, zero, torch.tensor(float("-inf"), device=allowed.device))


def query_row_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention weights of one query per batch row, averaged over heads: ``(B, L)``.

    ``query`` ``(B, H, D)``, ``keys`` ``(B, H, L, D)`` (heads already repeated for GQA), ``bias``
    ``(B, L)`` additive (``row_mask_bias``). ``softcap``: Gemma-2-style logit soft-capping
    (``tanh(logits / softcap) * softcap`` before the mask). The logits are computed in the inputs'
    dtype and the softmax in float32, as the eager attention of transformers does, so the rows agree.
    """
    logits = torch.einsum("bhd,bhld->bhl", query, keys) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    if bias is not None:
        logits = logits + bias[:, None, :]
    return torch.softmax(logits, dim=-1).mean(dim=1)


def image_spans(
    image_mask: torch.Tensor, lengths: Sequence[int] | None = None
) -> list[list[tuple[int, int]]]:
    """Per batch row, the ``(start, end)`` spans of its images' tokens, in order.

    ``image_mask`` ``(B, L)`` bool marks the visual tokens. Each maximal run of marked positions is
    one image, unless ``lengths`` (tokens of every image of the call, row-major order) are given and
    add up to the marked count: then adjacent images within one run are split by them.
    """
    runs: list[list[tuple[int, int]]] = []
    for row in image_mask.to(torch.int8).cpu():
        edges = torch.diff(
            torch.cat([torch.zeros(1, dtype=torch.int8), row, torch.zeros(1, dtype=torch.int8)])
        )
        starts = torch.nonzero(edges == 1).flatten().tolist()
        ends = torch.nonzero(edges == -1).flatten().tolist()
        runs.append(list(zip(starts, ends, strict=True)))
    if lengths is None or sum(lengths) != int(image_mask.sum()):
        return runs
    queue = [int(n) for n in lengths]
    split: list[list[tuple[int, int]]] = []
    for row_runs in runs:
        row_spans = []
        for start, end in row_runs:
            pos = start
            while pos < end and queue and pos + queue[0] <= end:
                row_spans.append((pos, pos + queue[0]))
                pos += queue.pop(0)
            if pos != end:  # the lengths do not tile this run: trust the runs instead
                return runs
        split.append(row_spans)
    return split


def keep_positions(
    scores: torch.Tensor,
    spans: Sequence[Sequence[tuple[int, int]]],
    counts: Sequence[int],
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """The positions kept per row, ``(B, L)`` bool: every real position outside the spans, plus in
    span ``i`` (row-major over all rows' spans) the ``counts[i]`` positions of highest ``scores``
    ``(B, L)``. ``real`` ``(B, L)`` bool marks the tokens that are not padding (``None``: all are);
    padding is never kept, so rows may keep different numbers of positions (see :func:`left_pack`).
    """
    keep = (
        torch.ones_like(scores, dtype=torch.bool) if real is None else real.to(scores.device).bool().clone()
    )
    image = 0
    for b, row_spans in enumerate(spans):
        for start, end in row_spans:
            keep[b, start:end] = False
            k = int(counts[image])
            top = torch.topk(scores[b, start:end].float(), k, sorted=False).indices
            keep[b, start + top] = True
            image += 1
    return keep


def left_pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different kept counts as one left-padded batch.

    ``keep`` ``(B, L)`` bool -> ``(index, valid)``, both ``(B, L')`` with ``L'`` the largest kept count:
    ``index`` the kept positions of each row in order, right-aligned; the padding slots before them
    (``valid`` False) repeat the row's first kept position, so gathering by ``index`` stays in range and
    finite (the slots must then be masked out of attention, e.g. with :func:`mask_padding_slots`).
    """
    counts = keep.sum(dim=1)
    width = int(counts.max()) if keep.numel() else 0
    length = keep.shape[1]
    positions = torch.arange(length, device=keep.device).expand_as(keep)
    # kept positions first, in order, then the rest: a stable sort by "not kept"
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    slots = torch.arange(width, device=keep.device)
    pad = (width - counts)[:, None]  # padding slots per row
    valid = slots[None, :] >= pad
    source = (slots[None, :] - pad).clamp(min=0)  # padding slots read the row's first kept position
    index = torch.gather(torch.gather(positions, 1, order), 1, source)
    return index, valid


def mask_padding_slots(
    mask: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """An attention mask with the padding slots of :func:`left_pack` masked out as keys.

    ``mask``: ``(B, 1, Lq, Lk)`` bool (True = may attend) or additive float (0 / dtype minimum), or a
    ``(B, Lk)`` padding mask (flash attention: 1 = token). ``valid`` ``(B, Lk)`` bool: False at the
    keys to hide. ``rows`` ``(B, Lq)`` bool, optional: False at padding-slot queries, which are then
    let to attend to their own key only (the diagonal), so no query row is fully masked (SDPA would
    return NaN there); their outputs are never read.
    """
    valid = valid.to(mask.device)
    if mask.ndim == 2:
        return mask * valid.to(mask.dtype) if mask.dtype != torch.bool else mask & valid
    cols = valid[:, None, None, :]
    self_only = None
    if rows is not None:
        q, k = mask.shape[-2], mask.shape[-1]
        eye = torch.eye(q, k, dtype=torch.bool, device=mask.device)
        self_only = eye[None, None] & ~rows.to(mask.device)[:, None, :, None]
    if mask.dtype == torch.bool:
        out = mask & cols
        return out if self_only is None else out | self_only
    out = mask.masked_fill(~cols, torch.finfo(mask.dtype).min)
    return out if self_only is None else out.masked_fill(self_only, 0.0)


def causal_allowed(valid: torch.Tensor, queries: int) -> torch.Tensor:
    """``(B, 1, queries, Lk)`` bool causal mask over keys whose last ``queries`` are the queries,
    with the keys where ``valid`` ``(B, Lk)`` is False hidden (a mask for a layer that got none)."""
    length = valid.shape[1]
    keys = torch.arange(length, device=valid.device)
    query_pos = torch.arange(length - queries, length, device=valid.device)
    causal = keys[None, :] <= query_pos[:, None]  # (queries, Lk)
    return causal[None, None] & valid[:, None, None, :]


def gather_positions(x: torch.Tensor, positions: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
    """``x`` restricted to ``positions`` ``(B, L')`` along its sequence dimension ``dim``, row by row
    of its batch dimension ``batch_dim`` (size B, or 1: broadcast to B). E.g. ``cos`` ``(B, L, D)``
    with ``dim=1``; a 4-D mask ``(B, 1, Lq, Lk)`` with ``dim=2`` (rows) or ``dim=3`` (columns)."""
    dim, batch_dim = dim % x.ndim, batch_dim % x.ndim
    positions = positions.to(x.device)
    shape = list(x.shape)
    shape[batch_dim] = positions.shape[0]
    x = x.expand(shape)
    view = [1] * x.ndim
    view[batch_dim], view[dim] = positions.shape[0], positions.shape[1]
    target = list(x.shape)
    target[dim] = positions.shape[1]
    return torch.gather(x, dim, positions.reshape(view).expand(target))
