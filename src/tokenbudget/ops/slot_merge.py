"""Token merging restricted to groups: ToMe's bipartite soft matching inside each group, to a
per-group budget, size-weighted, so that no output token ever mixes two groups."""

from __future__ import annotations

import torch
from torch import Tensor

from .match import bipartite_soft_matching
from .merge import merge_weighted


def merge_to_budget(x: Tensor, budget: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge the tokens ``x`` [n, C] of one group down to ``budget`` tokens.

    Repeated ToMe steps (bipartite soft matching on the tokens' own cosine similarity, no prefix),
    each removing at most half of the tokens, with size-weighted averages. Returns
    ``(tokens [budget, C], sizes [budget] float, position [n] int64: the output token of each input)``.
    """
    n = x.shape[0]
    if not 1 <= budget <= n:
        raise ValueError(f"a group of {n} tokens cannot be merged to {budget} tokens (need 1 <= budget <= n)")
    tokens, size = x[None], None  # [1, m, C], [1, m, 1]
    position = torch.arange(n, device=x.device)
    while tokens.shape[1] > budget:
        matching = bipartite_soft_matching(tokens, tokens.shape[1] - budget, num_prefix=0)
        tokens, size = merge_weighted(tokens, size, matching)
        position = matching.position_map()[0][position]
    sizes = torch.ones(n, device=x.device) if size is None else size[0, :, 0]
    return tokens[0], sizes, position


def merge_within_groups(
    x: Tensor, groups: Tensor, budgets: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
    """Merge the tokens of each group of each image to that group's budget.

    Args:
        x: [B, N, C] tokens.
        groups: [B, N] int64 group id of each token (0..S-1).
        budgets: [B, S] int64 tokens to leave per group (0 for an empty group, 1..count otherwise).

    Returns ``(tokens, group_ids, sizes, assignment)``: per image the output tokens
    [k_b, C] grouped by group id in increasing order, the group id [k_b] and size [k_b] of each, and
    ``assignment`` [B, N], the output index of every input token.
    """
    batch, n, _ = x.shape
    if groups.shape != (batch, n):
        raise ValueError(f"groups {tuple(groups.shape)} must be [B, N] = {(batch, n)}")
    counts = torch.stack([torch.bincount(g, minlength=budgets.shape[1]) for g in groups])  # [B, S]
    if counts.shape != budgets.shape:
        raise ValueError(f"budgets {tuple(budgets.shape)} must be [B, S] = {tuple(counts.shape)}")
    bad = (budgets > counts) | ((counts > 0) & (budgets < 1)) | ((counts == 0) & (budgets != 0))
    if bad.any():
        b, s = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"image {b} group {s} has {int(counts[b, s])} tokens but budget {int(budgets[b, s])}; a group's "
            "budget must be in [1, its token count] (0 for an empty group)"
        )
    outputs, ids, sizes = [], [], []
    assignment = torch.empty(batch, n, dtype=torch.long, device=x.device)
    for b in range(batch):
        start, parts, part_ids, part_sizes = 0, [], [], []
        for s in range(budgets.shape[1]):
            members = (groups[b] == s).nonzero().squeeze(1)  # [n_s] in token order
            if members.numel() == 0:
                continue
            tokens, size, position = merge_to_budget(x[b, members], int(budgets[b, s]))
            assignment[b, members] = position + start
            start += tokens.shape[0]
            parts.append(tokens)
            part_sizes.append(size)
            part_ids.append(torch.full((tokens.shape[0],), s, dtype=torch.long, device=x.device))
        outputs.append(torch.cat(parts))
        ids.append(torch.cat(part_ids))
        sizes.append(torch.cat(part_sizes))
    return outputs, ids, sizes, assignment
