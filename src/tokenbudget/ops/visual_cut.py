"""Pure tensor functions that cut one image's visual tokens down to a count, and that compact a
batch of token sequences after some of their positions were dropped.

Every cut returns ``(features [k, D], kept [k])``: the features that reach the language model and,
for each, the index (into the image's ``N`` tokens, ascending) of the token whose place in the
prompt it takes (a pooled or merged token takes the place of a representative member), so that
positions (e.g. Qwen's 3-D rope positions) stay those of real tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grid_cells(rows: int, cols: int, k: int) -> Tensor:
    """Cell id [rows * cols] (row-major tokens) of a split of a rows x cols grid into exactly ``k``
    cells: ``b`` row bands (as square cells as ``k`` allows), each cut into near-equal column runs."""
    n = rows * cols
    if not 1 <= k <= n:
        raise ValueError(f"cannot pool a {rows}x{cols} grid into {k} cells; give 1..{n}")
    bands = max(1, min(rows, k, round((k * rows / cols) ** 0.5)))
    bands = max(bands, -(-k // cols))  # every band holds at most `cols` cells
    per_band = [k // bands + (1 if b < k % bands else 0) for b in range(bands)]
    cell = torch.empty(rows, cols, dtype=torch.long)
    first = 0
    for b in range(bands):
        r0, r1 = b * rows // bands, (b + 1) * rows // bands
        c = per_band[b]
        col_cell = (torch.arange(cols) * c) // cols  # column -> run within the band
        cell[r0:r1] = first + col_cell
        first += c
    return cell.flatten()


def pool_cells(x: Tensor, cell: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Mean of ``x`` [N, D] over each of ``k`` cells (``cell`` [N] ids); the representative of a
    cell is its middle member. Returns ``(features [k, D], kept [k])`` ordered by representative."""
    cell = cell.to(x.device)
    counts = torch.bincount(cell, minlength=k)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, cell, x)
    means = sums / counts.unsqueeze(1).to(x.dtype)
    single = counts == 1  # a cell of one token keeps it bit for bit
    if bool(single.any()):
        means[single] = x[torch.argsort(cell)][torch.cumsum(counts, 0)[single] - 1]
    order = torch.argsort(cell, stable=True)  # members of each cell, in token order
    starts = torch.cumsum(counts, 0) - counts
    reps = order[starts + (counts - 1) // 2]
    sort = torch.argsort(reps)
    return means[sort], reps[sort]


def segment_cells(layout: list[tuple[int, int]], counts: list[int]) -> Tensor:
    """Cell ids over consecutive grid segments ``layout`` = [(rows, cols), ...], segment ``s``
    pooled into ``counts[s]`` cells (ids offset so they never collide)."""
    parts, offset = [], 0
    for (rows, cols), k in zip(layout, counts, strict=True):
        parts.append(grid_cells(rows, cols, k) + offset)
        offset += k
    return torch.cat(parts)


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """``k`` spread over segments of ``sizes`` tokens in proportion, each at least 1 and at most its size."""
    total = sum(sizes)
    if not len(sizes) <= k <= total:
        raise ValueError(f"cannot split {k} tokens over {len(sizes)} segments of {sizes} tokens")
    share = [max(1, min(s, int(k * s / total))) for s in sizes]
    while sum(share) < k:  # hand out the rest to the segments furthest below their share
        i = max(
            (i for i in range(len(sizes)) if share[i] < sizes[i]),
            key=lambda i: k * sizes[i] / total - share[i],
        )
        share[i] += 1
    while sum(share) > k:
        i = max((i for i in range(len(sizes)) if share[i] > 1), key=lambda i: share[i] - k * sizes[i] / total)
        share[i] -= 1
    return share


def keep_random(n: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` of ``n`` indices drawn without replacement, ascending [k]."""
    return torch.randperm(n, generator=generator)[:k].sort().values


def keep_top(scores: Tensor, k: int) -> Tensor:
    """Indices [k] of the ``k`` highest ``scores`` [N], ascending (ties: the earlier token)."""
    return torch.topk(scores.float(), k, sorted=False).indices.sort().values


def question_scores(visual: Tensor, query: Tensor) -> Tensor:
    """Cosine similarity [N] of each visual token [N, D] to the mean of the normalised query
    token embeddings [Q, D] (both in the language model's input space)."""
    q = torch.nn.functional.normalize(query.float(), dim=-1).mean(0)
    return torch.nn.functional.normalize(visual.float(), dim=-1) @ q


def visionzip(x: Tensor, scores: Tensor, keys: Tensor, k: int, contextual: int) -> tuple[Tensor, Tensor]:
    """VisionZip on one image: the ``k - contextual`` tokens of ``x`` [N, D] with the highest ``scores``
    [N] are kept as they are; the others are assigned to ``contextual`` centres spread evenly over
    them, each to its most similar centre by cosine of ``keys`` [N, d], and averaged per centre.
    Returns ``(features [k, D], kept [k])`` in token order (a merged token sits at its centre)."""
    n = x.shape[0]
    if k >= n:
        return x, torch.arange(n, device=x.device)
    contextual = max(0, min(contextual, k - 1, n - k + 1))
    dominant = keep_top(scores, k - contextual).to(x.device)
    rest = torch.ones(n, dtype=torch.bool, device=x.device)
    rest[dominant] = False
    rest_idx = rest.nonzero().squeeze(1)
    if contextual == 0:
        return x[dominant], dominant
    pick = torch.linspace(0, rest_idx.numel() - 1, contextual, device=x.device).round().long()
    centres = rest_idx[pick]
    k_rest = torch.nn.functional.normalize(keys[rest_idx].float(), dim=-1)
    k_centre = torch.nn.functional.normalize(keys[centres].float(), dim=-1)
    assign = (k_rest @ k_centre.T).argmax(dim=1)  # [R] centre of each remaining token
    assign[pick] = torch.arange(contextual, device=x.device)  # a centre always joins its own group
    counts = torch.bincount(assign, minlength=contextual).unsqueeze(1).to(x.dtype)
    merged = torch.zeros(contextual, x.shape[1], dtype=x.dtype, device=x.device)
    merged = merged.index_add_(0, assign, x[rest_idx]) / counts
    feats = torch.cat([x[dominant], merged])
    kept = torch.cat([dominant, centres])
    order = torch.argsort(kept)
    return feats[order], kept[order]


def compact(keep: Tensor, left: bool) -> tuple[Tensor, Tensor]:
    """Where each kept position of ``keep`` [B, L] (bool) goes after dropping the others.

    Returns ``(source [B, L'], valid [B, L'])``: ``L'`` is the most kept in a row; row ``b``'s kept
    positions in order, padded on the left (``left=True``) or the right; ``source`` of a pad slot is 0.
    """
    counts = keep.sum(1)
    length = int(counts.max()) if keep.numel() else 0
    slot = torch.arange(length, device=keep.device).unsqueeze(0)  # [1, L']
    pad = (length - counts).unsqueeze(1) if left else torch.zeros_like(counts).unsqueeze(1)
    valid = (slot >= pad) & (slot < pad + counts.unsqueeze(1))
    # the j-th kept position of each row, j = slot - pad
    ranks = torch.cumsum(keep.long(), 1) - 1  # [B, L]
    order = torch.where(keep, ranks, torch.full_like(ranks, keep.shape[1]))
    positions = torch.argsort(order, dim=1, stable=True)[:, :length] if length else order[:, :0]
    j = (slot - pad).clamp(min=0, max=max(length - 1, 0)).expand(keep.shape[0], -1)
    source = torch.where(valid, torch.gather(positions, 1, j), torch.zeros_like(j))
    return source, valid


def gather_seq(t: Tensor, source: Tensor, valid: Tensor, fill: int | float, dim: int = 1) -> Tensor:
    """``t`` [..., B, L, ...] (batch at ``dim - 1``, sequence at ``dim``) gathered at ``source``
    [B, L'], ``fill`` where not ``valid``."""
    shape = [1] * t.dim()
    shape[dim - 1], shape[dim] = source.shape
    index = source.view(shape).expand(*t.shape[: dim - 1], *source.shape, *t.shape[dim + 1 :])
    out = torch.gather(t, dim, index)
    mask = valid.view(shape).expand_as(out)
    return torch.where(mask, out, torch.full_like(out, fill))
