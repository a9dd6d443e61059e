"""Glance scores: how many tokens an image needs, from a cheap look at its first tokens.

Pure functions of token tensors [B, N, C] (patch embeddings, or the first block's attention keys),
each returning one score per image, higher = the image needs more tokens. A per-image budget
policy (:mod:`tokenbudget.adaptive.per_image`) turns them into budget levels by thresholds.

* :func:`redundancy_need`: one minus the mean similarity of the edges ToMe's bipartite matching
  would merge first: an image whose tokens have many near-duplicates loses little when merged;
* :func:`distinct_need`: one minus the similarity of the tokens that match worst, the ones ToMe
  would merge last (a small odd detail: a spot, a scratch, a small object);
* :func:`spread_need`: how far the tokens' directions spread around their mean direction;
* the token entropy (:func:`tokenbudget.ops.entropy.token_entropy`), the entropy guard's measure.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .limits import split_starts


def _check_tokens(x: Tensor, num_prefix: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected tokens [B, N, C], got {shape}")
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix must be an int >= 0, got {num_prefix!r}")
    if x.shape[1] - num_prefix < 2:
        raise ValueError(
            f"need at least two non-prefix tokens, got {x.shape[1]} tokens with {num_prefix} prefix"
        )


def best_match_similarity(metric: Tensor, num_prefix: int = 0) -> Tensor:
    """[B, Na] each non-prefix set-A token's cosine similarity to its most similar set-B token, sorted
    in decreasing order: the edges ToMe's bipartite soft matching ranks (same alternating split as
    :func:`tokenbudget.ops.match.bipartite_soft_matching`), most similar first.

    Args:
        metric: [B, N, D] tokens or attention keys (prefix first).
        num_prefix: leading tokens that are never merged.
    """
    _check_tokens(metric, num_prefix)
    a_start, b_start = split_starts(num_prefix)
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = unit[:, a_start::2] @ unit[:, b_start::2].transpose(1, 2)  # [B, Na, Nb]
    return scores.amax(dim=-1).sort(dim=-1, descending=True).values


def redundancy_need(metric: Tensor, num_prefix: int = 0, fraction: float = 0.5) -> Tensor:
    """[B] one minus the mean cosine similarity of the ``fraction`` of set-A tokens with the most
    similar set-B partner (the merges ToMe would make first, ``fraction=1``: every A token's best
    edge). In [0, 2]; 0 when those tokens all have an exact duplicate.

    Args:
        metric: [B, N, D] tokens or attention keys (prefix first).
        num_prefix: leading tokens that are never merged.
        fraction: share of the A tokens averaged, in (0, 1].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    best = best_match_similarity(metric, num_prefix)  # [B, Na]
    count = max(1, round(fraction * best.shape[1]))
    return 1.0 - best[:, :count].mean(dim=1)


def distinct_need(metric: Tensor, num_prefix: int = 0, share: float = 0.05) -> Tensor:
    """[B] one minus the mean best-match cosine similarity of the ``share`` of set-A tokens that
    match worst: how unlike everything else an image's most distinctive tokens are (a spot, a
    scratch, a small object), the tokens ToMe would merge last. In [0, 2].

    Args:
        metric: [B, N, D] tokens or attention keys (prefix first).
        num_prefix: leading tokens that are never merged.
        share: share of the A tokens averaged, from the worst-matched end, in (0, 1].
    """
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share!r}")
    best = best_match_similarity(metric, num_prefix)  # [B, Na], most similar first
    count = max(1, round(share * best.shape[1]))
    return 1.0 - best[:, -count:].mean(dim=1)


def spread_need(x: Tensor, num_prefix: int = 0) -> Tensor:
    """[B] ``1 - ||mean_i u_i||^2`` over the unit vectors ``u_i`` of the non-prefix tokens ``x`` [B, N, C]:
    0 when every token points the same way, near 1 when their directions cancel out (in [0, 1])."""
    _check_tokens(x, num_prefix)
    unit = x[:, num_prefix:].float()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - unit.mean(dim=1).square().sum(dim=-1)


def level_index(scores: Tensor, thresholds: Tensor, num_levels: int) -> Tensor:
    """[B] budget level of each score: ``num_levels - 1 - (number of thresholds <= score)``, so the
    lowest scores (least need) get the last level (the cheapest) and the highest the first.

    Args:
        scores: [B] need scores.
        thresholds: [num_levels - 1] non-decreasing.
        num_levels: number of levels.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if thresholds.dim() != 1 or thresholds.numel() != num_levels - 1:
        raise ValueError(
            f"{num_levels} levels need {num_levels - 1} thresholds, got shape {tuple(thresholds.shape)}"
        )
    reached = (scores[:, None] >= thresholds.to(scores)[None, :]).sum(dim=1)
    return (num_levels - 1 - reached).to(torch.long)
