"""One-to-one bipartite matching with a cap on group size: no token swallows a crowd.

ToMe's matching lets every A token pick its most similar B token, so on a stationary texture,
where all tokens look alike, a few B tokens collect many A tokens in one block and, block after
block, grow into groups of dozens of patches. This matching keeps ToMe's alternating split and
its budget (exactly ``r`` merges per block) but

* pairs tokens one-to-one: each B token receives at most one A token per block, so a block at
  most doubles a token's size;
* optionally caps group size: a pair whose merged size would exceed ``max_size`` ranks after
  every allowed pair, so it is merged only when fewer than ``r`` allowed pairs exist.

The pairs are found greedily in rounds: every unmatched A token proposes to its most similar
free B token, every B token accepts its best proposal, until ``r`` pairs are found; of the pairs,
the ``r`` most similar merge (the same layout as :func:`~tokenbudget.ops.match.bipartite_soft_matching`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .limits import split_starts
from .match import Matching, _layout, max_mergeable, unmerged_matching

#: added to the score of a pair over the size cap: below any allowed pair (cosines lie in [-1, 1])
_OVER_CAP = -4.0


def disjoint_bipartite_matching(
    metric: Tensor,
    r: int,
    num_prefix: int = 1,
    size: Tensor | None = None,
    max_size: float | None = None,
) -> Matching:
    """One-to-one bipartite matching of tokens ``metric`` [B, N, D] that removes ``r`` tokens.

    Args:
        metric: [B, N, D] similarity features (attention keys); cosine similarity is used.
        r: tokens to remove, clamped to :func:`~tokenbudget.ops.match.max_mergeable`.
        num_prefix: leading tokens never merged.
        size: [B, N, 1] (or [B, N]) patches each token stands for; ``None``: all 1.
        max_size: merged groups larger than this are avoided (merged only when a block has
            fewer than ``r`` pairs within the cap); ``None``: no cap.

    Returns:
        A :class:`~tokenbudget.ops.match.Matching` in ToMe's layout ([prefix] + [unmerged A] +
        [B]) in which no two merged A tokens share a destination whenever ``r`` disjoint pairs
        exist (always: ``r`` is at most the number of A tokens, which is at most that of B tokens).
    """
    batch, num_tokens, _ = metric.shape
    r = max(0, min(r, max_mergeable(num_tokens, num_prefix)))
    if r == 0:
        return unmerged_matching(batch, num_tokens, num_prefix, metric.device)
    prefix_pos, a_pos, b_pos = _layout(num_tokens, num_prefix, metric.device)
    a_start, b_start = split_starts(num_prefix)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, a_start::2] @ unit[:, b_start::2].transpose(1, 2)  # [B, Na, Nb]
        num_a, num_b = scores.shape[1:]
        if max_size is not None and size is not None:
            s = size.reshape(batch, num_tokens).to(scores.dtype)
            over = (s[:, a_start::2, None] + s[:, None, b_start::2]) > max_size
            scores = scores + over.to(scores.dtype) * _OVER_CAP
        neg_inf = torch.finfo(scores.dtype).min
        partner = torch.full((batch, num_a), -1, dtype=torch.long, device=metric.device)  # B column or -1
        pair_score = torch.full((batch, num_a), neg_inf, dtype=scores.dtype, device=metric.device)
        b_taken = torch.zeros(batch, num_b, dtype=torch.bool, device=metric.device)
        # Ties between proposals to one B token are broken towards the lower A row.
        tie = torch.arange(num_a, device=metric.device, dtype=scores.dtype) * 1e-6
        # Pairs within the cap first (proposals scoring above the cap's penalty), until no free A
        # token has a free B token within the cap; then any pair, until r pairs exist.
        floor = _OVER_CAP / 2 if max_size is not None and size is not None else neg_inf
        while True:
            free_a = partner < 0
            need = (~free_a).sum(dim=1) < r
            if not bool(need.any()):
                break
            masked = scores.masked_fill(b_taken.unsqueeze(1) | ~free_a.unsqueeze(2), neg_inf)
            best, best_b = masked.max(dim=-1)  # [B, Na] each free A token's best free B token
            proposing = free_a & need.unsqueeze(1) & (best > floor)
            if not bool(proposing.any()):
                floor = neg_inf  # no pair within the cap is left: the rest may exceed it
                continue
            bid = torch.where(proposing, best - tie, torch.full_like(best, neg_inf))
            top = torch.full((batch, num_b), neg_inf, dtype=scores.dtype, device=metric.device)
            top = top.scatter_reduce(1, best_b, bid, reduce="amax")  # [B, Nb] best proposal per B
            won = proposing & (bid == top.gather(1, best_b))  # [B, Na] accepted proposals
            partner = torch.where(won, best_b, partner)
            pair_score = torch.where(won, best, pair_score)
            b_taken = b_taken | (top > neg_inf)  # each B token with a proposal accepted exactly one
        order = pair_score.argsort(dim=-1, descending=True)  # [B, Na] matched pairs first, best first
        src_rows = order[:, :r]
        unm_rows = order[:, r:].sort(dim=-1).values
        kept = torch.cat([prefix_pos.expand(batch, -1), a_pos[unm_rows], b_pos.expand(batch, -1)], dim=1)
        dst_idx = partner.gather(1, src_rows) + (num_prefix + unm_rows.shape[1])
    return Matching(kept, a_pos[src_rows], dst_idx, num_tokens)
