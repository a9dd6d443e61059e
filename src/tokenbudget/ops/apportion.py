"""Integer apportionment: split a total into integer shares proportional to weights, within bounds.

The continuous allocation is ``a_i = clamp(lambda * w_i, lo_i, hi_i)`` with the one ``lambda`` that
makes the shares sum to the total. The sum is piecewise linear and non-decreasing in ``lambda``,
with kinks where a share reaches a bound (``lambda = lo_i / w_i`` or ``hi_i / w_i``), so
``lambda`` is found exactly: evaluate the sum at every kink and interpolate linearly inside the
segment that holds the total. When every positive-weight share is at its upper bound and the
total is still not reached, the zero-weight shares take the rest evenly (within their bounds).

The integer shares are the floors plus one for the largest fractional parts (largest remainder;
ties: larger weight, then lower index), so they sum exactly to the total and stay inside
``[lo_i, hi_i]``. Weights are divided by their largest value first and fractional parts compared
to 1e-9, so scaling all weights of a row by any positive factor gives the same shares.
"""

from __future__ import annotations

import torch
from torch import Tensor

_TIE = 1e-9  # fractional parts (and normalised weights) closer than this count as equal


def _fill(w: Tensor, lo: Tensor, hi: Tensor, total: float) -> Tensor:
    """Real shares [S] ``clamp(lambda * w, lo, hi)`` summing to ``total`` (or as close as the
    bounds allow, every positive-weight share at its maximum); float64 [S] tensors, ``w >= 0``."""
    positive = w > 0
    if not bool(positive.any()):
        return lo.clone()
    kinks = torch.cat([lo[positive] / w[positive], hi[positive] / w[positive], w.new_zeros(1)]).unique()
    sums = torch.minimum(torch.maximum(kinks[:, None] * w[None], lo), hi).sum(1)  # [K], non-decreasing
    k = int(torch.searchsorted(sums, torch.tensor([total], dtype=sums.dtype)))
    if k >= len(kinks):
        scale = kinks[-1]
    elif k == 0:
        scale = kinks[0]
    else:
        step = sums[k] - sums[k - 1]
        scale = kinks[k - 1] + (total - sums[k - 1]) * (kinks[k] - kinks[k - 1]) / step
    return torch.minimum(torch.maximum(scale * w, lo), hi)


def _round_row(exact: Tensor, w: Tensor, lo: Tensor, hi: Tensor, total: int) -> Tensor:
    """Largest-remainder integers [S] of the real shares ``exact`` (sum ``total``) within [lo, hi]."""
    nearest = exact.round()
    exact = torch.where((exact - nearest).abs() < _TIE * max(1.0, float(total)), nearest, exact)
    shares = exact.floor().long().clamp(min=lo, max=hi)
    fraction = ((exact - shares.double()) / _TIE).round()  # in units of the tie tolerance
    weight = (w / _TIE).round()
    missing = total - int(shares.sum())
    while missing < 0:  # round-off put a floor one too high: take one back from the smallest fraction
        spare = torch.where(shares > lo, fraction, torch.full_like(fraction, torch.inf))
        shares[int(spare.argmin())] -= 1
        missing += 1
    while missing > 0:
        room = shares < hi
        # Order by (fraction desc, weight desc, index asc): stable sorts from the last key to the first.
        order = torch.arange(len(shares))
        order = order[torch.sort(-weight[order], stable=True).indices]
        order = order[torch.sort(-fraction[order], stable=True).indices]
        order = order[room[order]][:missing]
        shares[order] += 1
        fraction[order] = -1.0  # a second round (only where bounds bind) goes to the others first
        missing = total - int(shares.sum())
    return shares


def apportion(weights: Tensor, total: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Integer shares [B, S] of ``total`` [B] proportional to ``weights`` [B, S] inside [lo, hi].

    ``weights`` finite and non-negative; ``lo``/``hi`` [B, S] integer bounds (``hi`` may be large);
    the caller checks feasibility (sum lo <= total <= sum hi). A row of all-zero weights is split
    uniformly. The shares of a row do not change when its weights are scaled by a positive factor.
    """
    out = []
    for w, t, low, high in zip(weights.double(), total.tolist(), lo.long(), hi.long(), strict=True):
        if float(w.max()) <= 0:
            w = torch.ones_like(w)
        w = w / w.max()
        low_f, high_f = low.double(), high.double()
        exact = _fill(w, low_f, high_f, float(t))
        zero = w == 0
        if float(exact.sum()) < t - _TIE * max(1.0, float(t)) and bool(zero.any()):
            # Every positive-weight share is full: the zero-weight slots share the rest evenly.
            exact = _fill(zero.double(), exact, torch.where(zero, high_f, exact), float(t))
        out.append(_round_row(exact, w, low, high, int(t)))
    return torch.stack(out)
