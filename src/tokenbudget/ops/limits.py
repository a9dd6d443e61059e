"""Token-count limits of the matching step (plain integer arithmetic, no tensors)."""

from __future__ import annotations


def max_mergeable(num_tokens: int, num_prefix: int) -> int:
    """How many tokens one bipartite matching step can remove: the non-prefix tokens of set A.

    Equals ``(num_tokens - num_prefix) // 2`` (at most half of the mergeable tokens).
    """
    if num_tokens <= num_prefix:
        return 0
    return (num_tokens - num_prefix) // 2


def split_starts(num_prefix: int) -> tuple[int, int]:
    """(first non-prefix position of set A, of set B) in ToMe's alternating split.

    Positions alternate A (even) and B (odd) from 0; the prefix takes ceil(p/2) even and
    floor(p/2) odd positions, so the non-prefix tokens of A start at ``2 * ceil(p/2)`` and those of
    B at ``2 * floor(p/2) + 1``.
    """
    return 2 * ((num_prefix + 1) // 2), 2 * (num_prefix // 2) + 1
