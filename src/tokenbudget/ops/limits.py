"""Token-count limits of the matching step (plain integer arithmetic, no tensors)."""

from __future__ import annotations


def max_mergeable(num_tokens: int, num_prefix: int) -> int:
    """How many tokens one bipartite matching step can remove: the non-prefix tokens of set A.

    Equals ``(num_tokens - num_prefix) // 2`` (at most half of the mergeable tokens).
    """
    if num_tokens <= num_prefix:
        return 0
    return (num_tokens - num_prefix) // 2
