"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023) as pure tensor functions.

The matching is computed once per layer and returned as a :class:`Matching`, which then merges
any per-token tensor (features, token sizes) the same way and maps tokens back to the input.

Token layout contract: the first ``num_prefix`` tokens (class, distillation and register tokens)
are never merged and stay at the front in their order. The paper's alternating split is taken
over *all* tokens, prefix included, so that for a model with one class token the partition, the
matches and the output order are exactly those of the reference implementation:

    set A = tokens at even positions, set B = tokens at odd positions
    output = [prefix tokens] + [unmerged A tokens, in input order] + [B tokens, in input order]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .limits import max_mergeable, split_starts


@dataclass(frozen=True)
class Matching:
    """The result of one matching step over ``N`` input tokens, removing ``r`` of them.

    Attributes:
        kept_idx: [B, N - r] input position of each output token, in output order.
        src_idx:  [B, r] input positions of the tokens that are merged away (all in set A).
        dst_idx:  [B, r] output position each merged-away token is merged into (a B token).
        num_tokens: N.

    Merging uses the same indices flattened over the batch (``index_select``/``index_add_`` on
    [B*N, C] rows run several times faster on CPU than ``gather``/``scatter`` with expanded indices).
    """

    kept_idx: Tensor
    src_idx: Tensor
    dst_idx: Tensor
    num_tokens: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    @property
    def flat_indices(self) -> tuple[Tensor, Tensor, Tensor]:
        """(kept [B*(N-r)], src [B*r], dst [B*r]) row indices into [B*N, C] inputs and [B*(N-r), C] outputs.

        Computed on each access (a few tiny index ops): ``functools.cached_property`` takes a lock
        that torch.compile cannot trace, which broke the graph at every merge.
        """
        batch = self.kept_idx.shape[0]
        if batch == 1:
            return self.kept_idx.reshape(-1), self.src_idx.reshape(-1), self.dst_idx.reshape(-1)
        rows = torch.arange(batch, device=self.kept_idx.device).unsqueeze(1)  # [B, 1]
        n_in, n_out = self.num_tokens, self.num_tokens - self.r
        return (
            (self.kept_idx + rows * n_in).reshape(-1),
            (self.src_idx + rows * n_in).reshape(-1),
            (self.dst_idx + rows * n_out).reshape(-1),
        )

    def merge(self, x: Tensor, mode: str = "sum") -> Tensor:
        """Merge a per-token tensor ``x`` [B, N, C] into [B, N - r, C].

        ``mode="sum"`` adds each merged-away token to its destination (use it on ``x * size`` and
        on ``size`` for the size-weighted average); ``"mean"`` averages them unweighted;
        ``"amax"`` keeps the elementwise maximum.
        """
        if mode not in ("sum", "mean", "amax"):
            raise ValueError(f"unknown merge mode {mode!r}; use 'sum', 'mean' or 'amax'")
        batch, num_tokens, channels = x.shape
        kept, src, dst = self.flat_indices
        rows = x.reshape(batch * num_tokens, channels)
        out = rows.index_select(0, kept)  # [B * (N - r), C]
        if self.r:
            moved = rows.index_select(0, src)  # [B * r, C]
            if mode == "sum":
                out.index_add_(0, dst, moved)
            else:
                out.scatter_reduce_(
                    0, dst.unsqueeze(1).expand_as(moved), moved, reduce=mode, include_self=True
                )
        return out.view(batch, num_tokens - self.r, channels)

    def position_map(self) -> Tensor:
        """[B, N] for every input token, the output position it ended up in (kept or merged)."""
        batch, kept = self.kept_idx.shape
        arange = torch.arange(kept, device=self.kept_idx.device).expand(batch, -1)
        pos = torch.empty(batch, self.num_tokens, dtype=torch.long, device=self.kept_idx.device)
        pos.scatter_(1, self.kept_idx, arange)
        if self.r:
            pos.scatter_(1, self.src_idx, self.dst_idx)
        return pos

    def unmerge(self, x: Tensor) -> Tensor:
        """Broadcast merged tokens [B, N - r, C] back to the N input positions: [B, N, C]."""
        pos = self.position_map()
        return x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@lru_cache(maxsize=64)
def _layout(num_tokens: int, num_prefix: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Input positions of the prefix tokens, the non-prefix A tokens and the non-prefix B tokens.

    Prefix tokens sit at positions < num_prefix: ceil(p/2) of them in A (even positions), floor(p/2)
    in B (odd). Leaving them out of the score matrix equals masking their rows/columns with -inf.
    """
    a_start, b_start = split_starts(num_prefix)
    return (
        torch.arange(num_prefix, device=device).unsqueeze(0),
        torch.arange(min(a_start, num_tokens), num_tokens, 2, device=device),
        torch.arange(min(b_start, num_tokens), num_tokens, 2, device=device).unsqueeze(0),
    )


def unmerged_matching(batch: int, num_tokens: int, num_prefix: int, device: torch.device) -> Matching:
    """The matching that merges nothing, in ToMe's output layout ([prefix] + [set A] + [set B]):
    what every bipartite matcher returns for ``r == 0``."""
    prefix_pos, a_pos, b_pos = _layout(num_tokens, num_prefix, device)
    kept = torch.cat([prefix_pos, a_pos.unsqueeze(0), b_pos], dim=1).expand(batch, -1)
    empty = kept.new_empty(batch, 0)
    return Matching(kept, empty, empty, num_tokens)


def bipartite_soft_matching(
    metric: Tensor,
    r: int,
    num_prefix: int = 1,
    similarity: str = "cosine",
    tie_break: Tensor | None = None,
    padding: Tensor | None = None,
) -> Matching:
    """ToMe's bipartite soft matching.

    Args:
        metric: [B, N, D] similarity features (ToMe: attention keys averaged over heads).
        r: number of tokens to remove; clamped to :func:`max_mergeable` (check ``Matching.r``).
        num_prefix: leading tokens (class/distillation/register) that are never merged.
        similarity: ``"cosine"`` (ToMe) or ``"neg_sqdist"`` (negative squared Euclidean distance,
            for matching by position).
        tie_break: optional [B, Na] small scores added to each A token's best score before ranking,
            to spread the choice among equally good edges (positions on a grid tie everywhere).
        padding: optional [B, N] bool, True for size-0 padding tokens (ragged batches, see
            :mod:`tokenbudget.ops.ragged`): never a destination, and ranked after every real A
            token, so the first merges of each image are between real tokens.

    Returns:
        A :class:`Matching`. Each token of set A (non-prefix, even positions) picks its most
        cosine-similar token of set B (non-prefix, odd positions); the ``r`` A tokens with the most
        similar match are merged into their matches.
    """
    batch, num_tokens, _ = metric.shape
    r = max(0, min(r, max_mergeable(num_tokens, num_prefix)))
    if r == 0:
        return unmerged_matching(batch, num_tokens, num_prefix, metric.device)
    prefix_pos, a_pos, b_pos = _layout(num_tokens, num_prefix, metric.device)
    a_start, b_start = split_starts(num_prefix)

    if similarity not in ("cosine", "neg_sqdist"):
        raise ValueError(f"unknown similarity {similarity!r}; use 'cosine' or 'neg_sqdist'")
    with torch.no_grad():
        if similarity == "cosine":
            metric = metric / metric.norm(dim=-1, keepdim=True)
            scores = metric[:, a_start::2] @ metric[:, b_start::2].transpose(1, 2)  # [B, Na, Nb] cosine
        else:
            scores = -torch.cdist(metric[:, a_start::2], metric[:, b_start::2]).square()
        if padding is not None:
            scores = scores.masked_fill(padding[:, b_start::2].unsqueeze(1), float("-inf"))
        best_score, best_b = scores.max(dim=-1)  # [B, Na] each A token's best B partner
        if tie_break is not None:
            best_score = best_score + tie_break
        if padding is not None:
            best_score = best_score.masked_fill(padding[:, a_start::2], float("-inf"))
        order = best_score.argsort(dim=-1, descending=True)  # [B, Na] most similar first
        src_rows = order[:, :r]  # [B, r] A rows merged away
        unm_rows = order[:, r:].sort(dim=-1).values  # [B, Na - r] A rows kept, in input order
        num_unmerged = unm_rows.shape[1]
        kept = torch.cat(
            [prefix_pos.expand(batch, -1), a_pos[unm_rows], b_pos.expand(batch, -1)], dim=1
        )  # [B, N - r]
        src_idx = a_pos[src_rows]
        dst_idx = best_b.gather(1, src_rows) + (num_prefix + num_unmerged)
    return Matching(kept, src_idx, dst_idx, num_tokens)


def matching_from_pairs(
    num_tokens: int, num_prefix: int, src_rows: Tensor, dst_cols: Tensor, device: torch.device
) -> Matching:
    """A :class:`Matching` from chosen pairs, in this module's token layout contract.

    Args:
        num_tokens: N, tokens entering the step.
        num_prefix: leading tokens that are never merged.
        src_rows: [B, r] rows of the non-prefix A tokens (0 = first A token) merged away.
        dst_cols: [B, r] column of the non-prefix B token each of them goes into.
        device: where the index tensors live.

    Used by matchers other than the greedy one (e.g. the optimal assignment) so that merging,
    sizes and token maps work unchanged.
    """
    prefix_pos, a_pos, b_pos = _layout(num_tokens, num_prefix, device)
    batch, r = src_rows.shape
    src_rows, dst_cols = src_rows.to(device), dst_cols.to(device)
    merged = torch.zeros(batch, a_pos.numel(), dtype=torch.bool, device=device)
    merged.scatter_(1, src_rows, True)
    # [B, Na - r] A rows kept, in input order (stable sort puts the False rows first, in order)
    unm_rows = merged.to(torch.int8).argsort(dim=1, stable=True)[:, : a_pos.numel() - r]
    kept = torch.cat([prefix_pos.expand(batch, -1), a_pos[unm_rows], b_pos.expand(batch, -1)], dim=1)
    dst_idx = dst_cols + (num_prefix + unm_rows.shape[1])
    return Matching(kept, a_pos[src_rows], dst_idx, num_tokens)


def nearest_neighbour_similarity(metric: Tensor, num_prefix: int, padding: Tensor | None = None) -> Tensor:
    """[B, N - num_prefix] each non-prefix token's cosine similarity to its most similar other
    non-prefix token: low = a token nothing else resembles (a distinctive detail).

    ``padding`` ([B, N] bool): padding tokens are nobody's neighbour and score +inf (never the
    most distinctive)."""
    tokens = metric[:, num_prefix:]
    tokens = tokens / tokens.norm(dim=-1, keepdim=True)
    sim = tokens @ tokens.transpose(1, 2)  # [B, M, M]
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    if padding is None:
        return sim.amax(dim=-1)
    pad = padding[:, num_prefix:]
    sim = sim.masked_fill(pad.unsqueeze(1), float("-inf"))
    return sim.amax(dim=-1).masked_fill(pad, float("inf"))


def detail_preserving_matching(
    metric: Tensor,
    r: int,
    num_prefix: int,
    protect: int,
    match: Callable[..., Matching] = bipartite_soft_matching,
    padding: Tensor | None = None,
) -> Matching:
    """Bipartite soft matching that never merges the ``protect`` most distinctive tokens.

    The non-prefix tokens whose nearest neighbour (cosine, over all other non-prefix tokens) is
    least similar are set aside like prefix tokens: they are neither merged away nor merged into,
    so a lone unusual patch keeps its own token and size 1. ``match`` (ToMe's greedy matching, or
    any matcher with its signature and layout) then runs on the rest.
    Protection is capped so that ``r`` merges stay possible (``protect <= N - num_prefix - 2r``):
    the budget, and so the speed, are exactly ToMe's.

    Output layout: [prefix] + [protected, in input order] + [ToMe's layout of the rest].
    ``padding`` ([B, N] bool, size-0 tokens of a ragged batch) is never protected, never anyone's
    nearest neighbour, and is handed on to ``match`` (which then takes a ``padding`` keyword).
    """
    batch, num_tokens, _ = metric.shape
    mergeable = num_tokens - num_prefix
    r = max(0, min(r, max_mergeable(num_tokens, num_prefix)))
    protect = max(0, min(protect, mergeable - 2 * r))
    pad_kw = {} if padding is None else {"padding": padding}
    if protect == 0:
        return match(metric, r, num_prefix, **pad_kw)
    with torch.no_grad():
        nn_sim = nearest_neighbour_similarity(metric, num_prefix, padding)  # [B, M]
        order = nn_sim.argsort(dim=-1)  # least similar first
        protected = order[:, :protect].sort(dim=-1).values + num_prefix  # [B, P] input positions
        rest = order[:, protect:].sort(dim=-1).values + num_prefix  # [B, M - P]
        prefix = torch.arange(num_prefix, device=metric.device).expand(batch, -1)
        perm = torch.cat([prefix, protected, rest], dim=1)  # [B, N]: permuted position -> input position
        permuted = metric.gather(1, perm.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
        if padding is not None:
            pad_kw = {"padding": padding.gather(1, perm)}
        inner = match(permuted, r, num_prefix + protect, **pad_kw)
    return Matching(perm.gather(1, inner.kept_idx), perm.gather(1, inner.src_idx), inner.dst_idx, num_tokens)
