"""Integer apportionment: split a total into integer shares proportional to weights, within bounds.

The continuous allocation is ``a_i = clamp(lambda * w_i, lo_i, hi_i)`` with the one ``lambda`` that
makes the shares sum to the total (found by bisection: the sum is monotone in ``lambda``). The
integer shares are its floors plus one for the largest fractional parts (largest remainder), so they
sum exactly to the total and stay inside ``[lo_i, hi_i]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bisect_scale(weights: Tensor, total: Tensor, lo: Tensor, hi: Tensor, steps: int = 80) -> Tensor:
    """[B] the lambda with sum_i clamp(lambda w_i, lo_i, hi_i) = total, per row (float64 tensors)."""
    positive = weights > 0
    # At lambda_max every positive-weight share has reached its upper bound.
    ratio = torch.where(positive, hi / weights.clamp_min(1e-300), torch.zeros_like(weights))
    low = torch.zeros_like(total)
    high = ratio.amax(1).clamp_min(1.0)
    for _ in range(steps):
        mid = (low + high) / 2
        share = torch.minimum(torch.maximum(mid[:, None] * weights, lo), hi).sum(1)
        below = share < total
        low = torch.where(below, mid, low)
        high = torch.where(below, high, mid)
    return high


def apportion(weights: Tensor, total: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Integer shares [B, S] of ``total`` [B] proportional to ``weights`` [B, S] inside [lo, hi].

    ``lo``/``hi`` [B, S] integer bounds (``hi`` may be large); the caller checks feasibility
    (sum lo <= total <= sum hi). A row of all-zero weights is split uniformly.
    """
    w = weights.double()
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    lo_f, hi_f, total_f = lo.double(), hi.double(), total.double()
    scale = _bisect_scale(w, total_f, lo_f, hi_f)
    exact = torch.minimum(torch.maximum(scale[:, None] * w, lo_f), hi_f)  # [B, S]
    shares = exact.floor().long().clamp(min=lo, max=hi)
    fraction = exact - shares.double()
    # Hand out what the floors left over, one token per slot with room, largest fraction first
    # (ties: larger weight, then lower slot id). Rounds repeat only when bounds bind at the edges.
    while True:
        missing = total - shares.sum(1)  # [B]
        if int(missing.min()) < 0:  # float round-off put a floor one too high: take it back
            over = missing < 0
            spare = torch.where(shares > lo, -fraction, -torch.inf)
            shares[over, spare[over].argmax(1)] -= 1
            continue
        if int(missing.max()) <= 0:
            break
        room = shares < hi
        priority = torch.where(room, fraction * 4.0 + w / w.amax(1, keepdim=True), -torch.inf)
        order = priority.argsort(dim=1, descending=True, stable=True)  # [B, S]
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(w.shape[1]).expand_as(order))
        give = room & (rank < missing[:, None])
        shares = shares + give.long()
        fraction = torch.where(give, torch.zeros_like(fraction), fraction)
    return shares
