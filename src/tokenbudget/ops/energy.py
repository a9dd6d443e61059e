"""Energy-score token merging (PiToMe, Tran et al., NeurIPS 2024) as pure tensor functions.

PiToMe asks *which* tokens may merge before asking with whom. Each token's energy is the mean,
over all tokens, of a margin-shifted ELU of its cosine similarity to them:

    E_i = 1/M sum_j f(cos(k_i, k_j)),   f(x) = x - m           if x >= m
                                              alpha (exp(x - m) - 1)  otherwise

so a token with many close neighbours (inside a large cluster of similar tokens) has high energy
and an isolated, distinctive token low energy. Only the ``2r`` highest-energy tokens take part
in the merge: sorted by energy, they alternate into set A (ranks 0, 2, 4, ...) and set B (ranks
1, 3, 5, ...), and every A token merges into its most similar B token (several A tokens may
share one). The other tokens (low energy: details) are protected and kept as they are.

The margin ``m`` falls with depth (:func:`pitome_margin`): early blocks call only near-duplicates
"close", later ones are more permissive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .match import Matching, max_mergeable


def pitome_margin(layer: int, num_layers: int, start: float = 0.9, drop: float = 0.8) -> float:
    """PiToMe's margin of block ``layer`` of ``num_layers``: ``start - drop * layer / num_layers``
    (0.9 in the first block, falling linearly towards 0.1)."""
    return start - drop * layer / num_layers


def energy_scores(metric: Tensor, margin: float, alpha: float = 1.0) -> Tensor:
    """PiToMe energy [B, M] of each of the ``M`` tokens of ``metric`` [B, M, D].

    ``E_i = mean_j ELU(cos(k_i, k_j) - margin; alpha)`` over all ``M`` tokens (itself included, a
    constant that changes no ranking): high for a token inside a large cluster of similar tokens.
    """
    unit = F.normalize(metric, dim=-1)
    return _energy(unit @ unit.transpose(1, 2), margin, alpha)


def _energy(sim: Tensor, margin: float, alpha: float) -> Tensor:
    """[B, M] energies from cosine similarities ``sim`` [B, M, M]."""
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1)


def energy_matching(metric: Tensor, r: int, num_prefix: int, margin: float, alpha: float = 1.0) -> Matching:
    """PiToMe's matching of tokens ``metric`` [B, N, D]: ``r`` high-energy tokens merge into others.

    Args:
        metric: [B, N, D] similarity features (attention keys); cosine similarity is used.
        r: tokens to remove; clamped to :func:`~tokenbudget.ops.match.max_mergeable` (half of the
            non-prefix tokens), so ``2r`` mergeable tokens always exist.
        num_prefix: leading tokens (class, registers) never merged.
        margin: the energy margin of this block (:func:`pitome_margin`).
        alpha: the ELU's slope below the margin (PiToMe: 1).

    Returns:
        A :class:`~tokenbudget.ops.match.Matching` whose output layout is
        ``[prefix] + [protected tokens, in input order] + [set B, in input order]``; the ``r``
        set-A tokens are merged into their most cosine-similar set-B token.
    """
    batch, num_tokens, _ = metric.shape
    r = max(0, min(r, max_mergeable(num_tokens, num_prefix)))
    device = metric.device
    prefix = torch.arange(num_prefix, device=device).expand(batch, -1)
    if r == 0:
        kept = torch.arange(num_tokens, device=device).expand(batch, -1)
        empty = kept.new_empty(batch, 0)
        return Matching(kept, empty, empty, num_tokens)
    with torch.no_grad():
        tokens = F.normalize(metric[:, num_prefix:].float(), dim=-1)  # [B, M, D]
        sim = tokens @ tokens.transpose(1, 2)  # [B, M, M]
        energy = _energy(sim, margin, alpha)  # [B, M]
        order = energy.argsort(dim=-1, descending=True)  # [B, M] highest energy first
        a_rows, b_rows = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]  # [B, r] each
        protected = order[:, 2 * r :].sort(dim=-1).values  # [B, M - 2r] in input order
        b_sorted = b_rows.sort(dim=-1).values  # [B, r] set B in input order (the output layout)
        # Each A token's most similar B token, as a column of the sorted set B.
        a_to_b = sim.gather(1, a_rows.unsqueeze(-1).expand(-1, -1, sim.shape[2]))  # [B, r, M]
        a_to_b = a_to_b.gather(2, b_sorted.unsqueeze(1).expand(-1, r, -1))  # [B, r, r]
        best_b = a_to_b.argmax(dim=-1)  # [B, r]
        kept = torch.cat([prefix, protected + num_prefix, b_sorted + num_prefix], dim=1)  # [B, N - r]
        src_idx = a_rows + num_prefix
        dst_idx = best_b + (num_prefix + protected.shape[1])
    return Matching(kept, src_idx, dst_idx, num_tokens)
