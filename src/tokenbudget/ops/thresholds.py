"""Complexity score -> patch size per image, and thresholds calibrated to a target mean token count.

``patch_sizes`` run coarse to fine (e.g. 28, 14, 7) and ``thresholds`` (one fewer, non-decreasing,
in [0, 1]) split the score range: an image with score ``s`` gets ``patch_sizes[i]`` where ``i`` is
the number of thresholds ``t`` with ``s >= t``. A threshold of 1.0 is never reached (scores are
below 1) and 0.0 always is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_thresholds(thresholds: Sequence[float], num_sizes: int) -> tuple[float, ...]:
    """Validate ``thresholds`` for ``num_sizes`` patch sizes; returns them as a tuple of floats."""
    values = tuple(thresholds)
    if len(values) != num_sizes - 1:
        raise ValueError(
            f"{num_sizes} patch sizes need {num_sizes - 1} thresholds (one between each pair), got {len(values)}"
        )
    for t in values:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"thresholds must be numbers in [0, 1], got {list(values)}")
    if any(b < a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"thresholds must not decrease (patch sizes run coarse to fine), got {list(values)}")
    return tuple(float(t) for t in values)


def size_index(scores: Tensor, thresholds: Sequence[float]) -> Tensor:
    """[B] index into the patch sizes (0 = coarsest): how many thresholds each score reaches."""
    if not thresholds:
        return torch.zeros(scores.shape, dtype=torch.long, device=scores.device)
    bounds = torch.tensor(thresholds, dtype=scores.dtype, device=scores.device)
    return (scores[:, None] >= bounds[None, :]).sum(dim=1)


def calibrate_thresholds(scores: Tensor, token_counts: Sequence[int], target: float) -> tuple[float, ...]:
    """Thresholds whose mean token count over ``scores`` is ``target`` (up to one image).

    ``token_counts`` are the patch tokens of each size, coarse to fine (increasing). The target is
    met with the two adjacent sizes that bracket it: the fraction ``f = (target - n_i) / (n_{i+1} -
    n_i)`` of the images with the highest scores get the finer size ``i + 1``, the rest size ``i``
    (a score quantile); sizes outside the bracket are not used. Ties at the quantile all go finer.

    Args:
        scores: [N] complexity scores of a calibration set.
        token_counts: patch tokens per image of each size, strictly increasing.
        target: mean patch tokens per image, within [token_counts[0], token_counts[-1]].
    """
    counts = [int(c) for c in token_counts]
    if any(b <= a for a, b in zip(counts, counts[1:], strict=False)):
        raise ValueError(f"token counts must increase from the coarsest size to the finest, got {counts}")
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if not counts[0] <= target <= counts[-1]:
        raise ValueError(
            f"a mean of {target} patch tokens is out of reach of these patch sizes: choose one in "
            f"[{counts[0]}, {counts[-1]}]"
        )
    if len(counts) == 1:
        return ()
    # The bracket [counts[i], counts[i + 1]] that holds the target (the first one, at a boundary).
    i = max(j for j in range(len(counts) - 1) if counts[j] <= target)
    fraction = (target - counts[i]) / (counts[i + 1] - counts[i])
    ordered = scores.float().sort().values
    n = len(ordered)
    finer = round(fraction * n)  # images that get the finer size
    if finer == 0:
        cut = 1.0
    elif finer == n:
        cut = 0.0
    else:
        cut = float((ordered[n - finer - 1] + ordered[n - finer]) / 2)
    return tuple([0.0] * i + [cut] + [1.0] * (len(counts) - 2 - i))
