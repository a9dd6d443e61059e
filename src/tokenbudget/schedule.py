"""Budget specifications -> per-layer merge counts.

A budget is given in one of these forms (see :class:`tokenbudget.ToMe`):

* ``r: int``                      remove ``r`` tokens in every block;
* ``r: (r, inflection)``          ToMe's linear schedule: ``r * (1 - inflection)`` tokens in the first
                                  block rising to ``r * (1 + inflection)`` in the last (truncated to
                                  int), the same total as a constant ``r``; ``inflection=-1`` is the
                                  paper's "decreasing" schedule;
* ``r: [r_0, ..., r_{L-1}]``      one count per block;
* ``keep: float``                 fraction of the mergeable (non-prefix) tokens left after the last block;
* ``tokens: int``                 total tokens (prefix included) left after the last block.

``keep`` and ``tokens`` depend on the input length, so they are resolved per token count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .ops.limits import max_mergeable

RSpec = int | tuple[int, float] | Sequence[int]


def layer_schedule(r: RSpec, num_layers: int) -> list[int]:
    """Turn an ``r`` spec (int, ``(r, inflection)`` or per-layer list) into ``num_layers`` counts."""
    if isinstance(r, bool):
        raise ValueError("r must be an int, an (r, inflection) tuple or a per-layer list, not a bool")
    if isinstance(r, int):
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        return [r] * num_layers
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"an r tuple is (r, inflection), got {r!r}")
        base, inflection = r
        if not isinstance(base, int) or base < 0:
            raise ValueError(f"r in (r, inflection) must be an int >= 0, got {base!r}")
        if not -1.0 <= float(inflection) <= 1.0:
            raise ValueError(
                f"inflection must lie in [-1, 1] (-1 decreasing, 0 constant, +1 increasing), got {inflection}"
            )
        first = int(base * (1.0 - inflection))
        last = 2 * base - first
        if num_layers == 1:
            return [base]
        step = (last - first) / (num_layers - 1)
        return [int(first + step * i) for i in range(num_layers)]
    if isinstance(r, Sequence) and not isinstance(r, str):
        counts = list(r)
        if len(counts) != num_layers:
            raise ValueError(
                f"a per-layer r list needs one count per block: the model has {num_layers} blocks, "
                f"the list has {len(counts)}"
            )
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in counts):
            raise ValueError(f"per-layer r counts must be ints >= 0, got {counts}")
        return counts
    raise ValueError(f"r must be an int, an (r, inflection) tuple or a per-layer list, got {r!r}")


def clamp_schedule(requested: Sequence[int], num_tokens: int, num_prefix: int) -> list[int]:
    """Counts each block can really merge: at most half of its mergeable tokens (bipartite limit)."""
    merged = []
    n = num_tokens
    for r in requested:
        r = min(r, max_mergeable(n, num_prefix))
        merged.append(r)
        n -= r
    return merged


def clamp_message(requested: Sequence[int], merged: Sequence[int], num_tokens: int) -> str | None:
    """What the bipartite limit cut from a requested schedule: each block that merges fewer tokens
    than asked, with the tokens it leaves, and the tokens left after the last block; ``None`` when
    every block merges what it was asked."""
    left = tokens_after_each_layer(merged, num_tokens)
    cut = [(i, r, m, n) for i, (r, m, n) in enumerate(zip(requested, merged, left, strict=True)) if m < r]
    if not cut:
        return None
    shown = "; ".join(f"block {i} merges {m} of {r} ({n} tokens left)" for i, r, m, n in cut[:6])
    more = f"; and {len(cut) - 6} more blocks" if len(cut) > 6 else ""
    return (
        f"{len(cut)} of {len(requested)} blocks merge fewer tokens than asked, one merge step removing "
        f"at most half of a block's mergeable tokens: {shown}{more}; {left[-1]} of {num_tokens} tokens "
        f"are left after the last block (a keep= or tokens= budget spreads the merges to fit)"
    )


def tokens_after_each_layer(merged: Sequence[int], num_tokens: int) -> list[int]:
    """Token count after each block, given the counts it merges."""
    out, n = [], num_tokens
    for r in merged:
        n -= r
        out.append(n)
    return out


def fewest_reachable_tokens(num_tokens: int, num_prefix: int, num_layers: int) -> int:
    """The smallest token count after ``num_layers`` blocks when each merges as much as it can."""
    n = num_tokens
    for _ in range(num_layers):
        n -= max_mergeable(n, num_prefix)
    return n


def schedule_to_target(num_tokens: int, num_prefix: int, num_layers: int, target_tokens: int) -> list[int]:
    """Per-layer counts that leave exactly ``target_tokens`` tokens after the last block.

    The removals are spread as evenly as the bipartite limit allows, earlier blocks taking the
    remainder (they are the cheap place to merge: every later block then runs on fewer tokens).
    Raises ``ValueError`` when the target is below what ``num_layers`` blocks can reach.
    """
    if target_tokens > num_tokens:
        raise ValueError(f"target of {target_tokens} tokens is more than the {num_tokens} the model has")
    if target_tokens < num_prefix:
        raise ValueError(
            f"target of {target_tokens} tokens is below the {num_prefix} prefix tokens, which are never merged"
        )
    fewest = fewest_reachable_tokens(num_tokens, num_prefix, num_layers)
    if target_tokens < fewest:
        raise ValueError(
            f"cannot reach {target_tokens} tokens: {num_layers} blocks merging at most half of their "
            f"tokens each leave at least {fewest} of {num_tokens}"
        )
    counts: list[int] = []
    n = num_tokens
    for layer in range(num_layers):
        remaining_layers = num_layers - layer
        need = n - target_tokens
        r = min(math.ceil(need / remaining_layers), max_mergeable(n, num_prefix))
        # Take more now if the later blocks could not otherwise reach the target.
        while fewest_reachable_tokens(n - r, num_prefix, remaining_layers - 1) > target_tokens:
            r += 1
        counts.append(r)
        n -= r
    assert n == target_tokens, (n, target_tokens)
    return counts


def resolve_schedule(
    *,
    r: RSpec | None,
    keep: float | None,
    tokens: int | None,
    num_tokens: int,
    num_prefix: int,
    num_layers: int,
) -> list[int]:
    """Requested per-layer counts for a forward with ``num_tokens`` tokens (before the bipartite limit)."""
    if r is not None:
        requested = layer_schedule(r, num_layers)
        mergeable = num_tokens - num_prefix
        too_big = [c for c in requested if c > mergeable]
        if too_big:
            raise ValueError(
                f"budget r={max(too_big)} is larger than the {mergeable} mergeable tokens "
                f"({num_tokens} tokens, {num_prefix} prefix); one block can merge at most "
                f"{max_mergeable(num_tokens, num_prefix)}"
            )
        return requested
    if keep is not None:
        target = num_prefix + round(keep * (num_tokens - num_prefix))
        return schedule_to_target(num_tokens, num_prefix, num_layers, target)
    if tokens is not None:
        return schedule_to_target(num_tokens, num_prefix, num_layers, tokens)
    raise ValueError("no budget given: set one of r, keep or tokens")
