"""Optimal (one-to-one) bipartite matching: an exact maximum-weight assignment of r A tokens to B tokens.

ToMe's greedy step lets each A token take its most similar B token and keeps the ``r`` best of those
edges. For its own objective, "choose r A tokens, each merged into any B token, maximizing the total
similarity" (many-to-one: several A tokens may go into the same B token), greedy is already exact:
the best choice is the ``r`` largest row maxima. So "optimal" only means something new under a
constraint greedy ignores. The objective solved here is the one-to-one one:

    choose r pairs (a_k, b_k), all a_k distinct and all b_k distinct,
    maximizing sum_k cos(key[a_k], key[b_k])

on the same A x B cosine scores as greedy. Every B token then receives at most one A token per
block, so no token swallows a cluster in one step. Its optimum is never above greedy's total
(greedy solves the relaxation without the distinct-b constraint) and equals it exactly when
greedy's r edges already go to distinct B tokens.

Exact solution: a rectangular linear sum assignment. Each of the ``Na`` A rows must be assigned;
``Na - r`` dummy columns with a large constant score ``M`` absorb the A tokens that stay
(``M > 2r + 1`` makes any assignment that uses every dummy beat any that does not, since cosines
lie in [-1, 1]), so exactly ``r`` rows are assigned to distinct real B columns, and among those
assignments the dummies add the same constant, so the real pairs maximize the stated objective.
scipy's ``linear_sum_assignment`` (a shortest augmenting path Hungarian method) solves it exactly,
one image at a time, in float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .limits import max_mergeable, split_starts
from .match import Matching, bipartite_soft_matching, matching_from_pairs

#: the optional dependency behind ``matching="optimal"``
OPTIMAL_EXTRA = "optimal"


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError(
            "matching='optimal' needs scipy (its linear_sum_assignment); install the extra: "
            f"pip install 'tokenbudget[{OPTIMAL_EXTRA}]'"
        ) from None
    return linear_sum_assignment


def require_scipy() -> None:
    """Raise the ``ImportError`` naming the extra when scipy is missing."""
    _linear_sum_assignment()


def best_disjoint_pairs(scores: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-weight set of ``r`` disjoint (row, column) pairs of one score matrix.

    Args:
        scores: [Na, Nb] float scores in [-1, 1] (cosine similarities), ``r <= min(Na, Nb)``.
        r: number of pairs.

    Returns:
        (rows [r], cols [r]) int64, rows distinct and cols distinct, maximizing
        ``scores[rows, cols].sum()``.
    """
    num_a, num_b = scores.shape
    if not 0 <= r <= min(num_a, num_b):
        raise ValueError(f"cannot choose {r} disjoint pairs from a {num_a}x{num_b} score matrix")
    if r == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    big = 2.0 * r + 2.0  # > 2r + 1: every dummy column gets used (see the module docstring)
    padded = np.empty((num_a, num_b + num_a - r), dtype=np.float64)
    padded[:, :num_b] = scores
    padded[:, num_b:] = big
    rows, cols = _linear_sum_assignment()(padded, maximize=True)
    real = cols < num_b
    return rows[real].astype(np.int64), cols[real].astype(np.int64)


#: score of a pair with a padding token: below every cosine, so real pairs are always preferred
PADDING_SCORE = -4.0


def optimal_bipartite_matching(
    metric: Tensor, r: int, num_prefix: int = 1, padding: Tensor | None = None
) -> Matching:
    """One-to-one bipartite matching of maximum total cosine similarity (see the module docstring).

    Args:
        metric: [B, N, D] similarity features (ToMe: attention keys averaged over heads).
        r: tokens to remove; clamped to :func:`~tokenbudget.ops.match.max_mergeable` and to the
            number of non-prefix B tokens (one-to-one needs a distinct B token per merge).
        num_prefix: leading tokens that are never merged.
        padding: optional [B, N] bool, size-0 padding tokens of a ragged batch (entropy guard):
            their pairs score :data:`PADDING_SCORE`, so they are chosen only when real pairs run out.

    Returns:
        A :class:`~tokenbudget.ops.match.Matching` with the same A/B split and output layout as
        :func:`~tokenbudget.ops.match.bipartite_soft_matching` (prefix, unmerged A in input order,
        then B), so merging, sizes and token maps reuse it. Its pairs are listed most similar
        first (as greedy's are), which is the order the entropy guard takes merges in; each B
        token receives at most one A token, so the order does not change the merged values.
    """
    batch, num_tokens, _ = metric.shape
    a_start, b_start = split_starts(num_prefix)
    num_b = len(range(min(b_start, num_tokens), num_tokens, 2))
    r = max(0, min(r, max_mergeable(num_tokens, num_prefix), num_b))
    if r == 0:
        return bipartite_soft_matching(metric, 0, num_prefix)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, a_start::2] @ unit[:, b_start::2].transpose(1, 2)  # [B, Na, Nb] cosine
        if padding is not None:
            pad_pair = padding[:, a_start::2].unsqueeze(2) | padding[:, b_start::2].unsqueeze(1)
            scores = scores.masked_fill(pad_pair, PADDING_SCORE)
        scores = scores.detach().to("cpu", torch.float64).numpy()
    src_rows = np.empty((batch, r), dtype=np.int64)
    dst_cols = np.empty((batch, r), dtype=np.int64)
    for i in range(batch):  # scipy solves one matrix at a time
        rows, cols = best_disjoint_pairs(scores[i], r)
        first = np.argsort(-scores[i][rows, cols], kind="stable")  # most similar pair first
        src_rows[i], dst_cols[i] = rows[first], cols[first]
    return matching_from_pairs(
        num_tokens, num_prefix, torch.from_numpy(src_rows), torch.from_numpy(dst_cols), metric.device
    )
