"""Per-slot token budgets: split a total budget across object slots, then merge inside each slot.

:func:`allocate` turns per-slot scores into integer budgets that sum exactly to the total:

    weight_s = complexity_s * relevance_s          (relevance_s = 1 without a query)
    budget_s ~ clamp(lambda * weight_s, min_s, max_s),  sum_s budget_s = total

rounded by largest remainder (:func:`tokenbudget.ops.apportion.apportion`). Multiplying makes the
two scores independent: relevance picks *which* slots matter, complexity says how many tokens a
slot needs to be described; a slot with zero relevance gets only its minimum.

Complexity measure (:func:`slot_complexity`, default ``"scatter"``): the within-slot scatter of the
L2-normalised tokens, ``sum_i ||z_i - mean(z)||^2`` over the slot's patches. It is the squared error
of describing the slot by one (mean) token, so it grows with both the slot's area and how varied its
content is: a plain region (background, a uniform item) scores low even when large, a detailed item
scores high. ``"spread"`` is the mean (area-free) version and ``"area"`` the patch count.

Query relevance (:func:`query_relevance`): the cosine between a query vector in the token space and
each slot's mean token, turned into weights by a softmax over the image's slots with a temperature.

:func:`merge_slots` reduces every slot to its budget by ToMe's bipartite matching restricted to
the slot (size-weighted), and :func:`compress_slots` does the whole path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.apportion import apportion
from ..ops.group import group_mean
from ..ops.slot_merge import merge_within_groups
from .base import CompressedTokens, check_tokens, pack, prefix_assignment
from .slots import Slots

COMPLEXITY_MEASURES = ("scatter", "spread", "area")


def _as_rows(value: Tensor | int | float | None, like: Tensor, name: str) -> Tensor | None:
    """``value`` broadcast to ``like``'s [B, S] shape (float64), or None."""
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=torch.float64)
    try:
        return torch.broadcast_to(tensor, like.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not match the scores {tuple(like.shape)}"
        ) from None


def allocate(
    complexity: Tensor,
    total: int,
    min_per_slot: int | Tensor = 1,
    max_per_slot: int | Tensor | None = None,
    relevance: Tensor | None = None,
) -> Tensor:
    """Integer token budgets per slot, proportional to ``complexity`` (times ``relevance``).

    Args:
        complexity: [S] or [B, S] non-negative scores (e.g. :func:`slot_complexity`).
        total: tokens to hand out per image; the budgets of every image sum exactly to it.
        min_per_slot, max_per_slot: bounds per slot (an int, or a tensor broadcastable to the scores,
            e.g. each slot's token count as the maximum). ``max_per_slot=None``: no upper bound.
        relevance: optional non-negative [S] or [B, S] weights (e.g. :func:`query_relevance`);
            the proportional share follows ``complexity * relevance``. A row whose weights are all
            zero is split uniformly.

    Returns int64 budgets of the same shape as ``complexity``. Raises ``ValueError`` when the
    request is impossible (total below the sum of minimums or above the sum of maximums) or a score
    is negative or not finite.
    """
    scores = torch.as_tensor(complexity)
    if scores.ndim not in (1, 2) or scores.shape[-1] == 0:
        raise ValueError(f"complexity must be [S] or [B, S] with S >= 1, got shape {tuple(scores.shape)}")
    if isinstance(total, bool) or int(total) != total:
        raise ValueError(f"total must be an int, got {total!r}")
    total = int(total)
    rows = scores.double().reshape(-1, scores.shape[-1])  # [B, S]
    weights = rows.clone()
    if relevance is not None:
        weights = weights * _as_rows(relevance, rows, "relevance")
    for name, value in (("complexity", rows), ("complexity * relevance", weights)):
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"{name} must be finite and >= 0 for every slot, got {value.tolist()}")
    lo = _as_rows(min_per_slot, rows, "min_per_slot")
    hi = _as_rows(total if max_per_slot is None else max_per_slot, rows, "max_per_slot")
    if (lo < 0).any() or (lo != lo.round()).any() or (hi != hi.round()).any():
        raise ValueError("min_per_slot and max_per_slot must be non-negative integers")
    if (hi < lo).any():
        raise ValueError(f"max_per_slot {hi.tolist()} is below min_per_slot {lo.tolist()} for some slot")
    need, room = lo.sum(1), hi.sum(1)
    if (need > total).any():
        raise ValueError(
            f"total={total} cannot give every slot its minimum: the minimums sum to {int(need.max())}; "
            "raise the total or lower min_per_slot"
        )
    if (room < total).any():
        raise ValueError(
            f"total={total} is more than the slots can take: the maximums sum to {int(room.min())}; "
            "lower the total or raise max_per_slot"
        )
    shares = apportion(weights, torch.full((rows.shape[0],), total), lo.long(), hi.long())
    return shares.reshape(scores.shape)


def slot_means(tokens: Tensor, slots: Slots, num_prefix: int = 0) -> Tensor:
    """[B, S, C] the mean patch token of every slot (zero for an unused slot id)."""
    return group_mean(tokens[:, num_prefix:].float(), slots.assignment, slots.max_slots)


def slot_complexity(tokens: Tensor, slots: Slots, num_prefix: int = 0, measure: str = "scatter") -> Tensor:
    """[B, S] complexity of every slot (0 for unused ids); see the module docstring for the measures."""
    if measure not in COMPLEXITY_MEASURES:
        raise ValueError(f"unknown complexity measure {measure!r}; use one of {COMPLEXITY_MEASURES}")
    counts = slots.counts().double()
    if measure == "area":
        return counts
    z = torch.nn.functional.normalize(tokens[:, num_prefix:].double(), dim=-1)  # [B, N, C]
    means = group_mean(z, slots.assignment, slots.max_slots)  # [B, S, C]
    squared = (z - means.gather(1, slots.assignment[..., None].expand_as(z))).square().sum(-1)  # [B, N]
    scatter = torch.zeros_like(counts).scatter_add_(1, slots.assignment, squared)
    return scatter if measure == "scatter" else scatter / counts.clamp_min(1)


def query_relevance(slot_features: Tensor, query: Tensor) -> Tensor:
    """Cosine [B, S] between each slot feature [B, S, C] and a query vector [C] or [B, C]."""
    if query.shape[-1] != slot_features.shape[-1]:
        raise ValueError(
            f"the query has width {query.shape[-1]} but the tokens have {slot_features.shape[-1]}; "
            "give a query vector in the token space"
        )
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    q = q.expand(slot_features.shape[0], -1) if q.ndim == 1 else q
    return torch.einsum("bsc,bc->bs", torch.nn.functional.normalize(slot_features.float(), dim=-1), q)


def relevance_weights(cosine: Tensor, present: Tensor, temperature: float = 0.05) -> Tensor:
    """Softmax over the present slots of ``cosine / temperature``: [B, S], zero for absent slots."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = torch.where(present, cosine / temperature, torch.full_like(cosine, float("-inf")))
    return logits.softmax(-1)


@dataclass
class SlotTokens(CompressedTokens):
    """:class:`CompressedTokens` grouped by slot.

    ``slot_ids``: per image [k_b] int64, the slot of each output patch token (outputs are ordered by
    slot id). ``sizes``: per image [k_b], the patches each output token stands for.
    ``slot_budgets``: [B, S] tokens given to each slot.
    """

    slot_ids: list[Tensor] | None = None
    sizes: list[Tensor] | None = None
    slot_budgets: Tensor | None = None


def merge_slots(tokens: Tensor, slots: Slots, budgets: Tensor, num_prefix: int = 0) -> SlotTokens:
    """Reduce every slot of ``tokens`` [B, N, C] to ``budgets`` [B, S] tokens by merging within the slot.

    Prefix tokens pass through in front; ``.assignment`` [B, N] maps every input token to its output.
    """
    batch, n, _ = check_tokens(tokens, num_prefix)
    if slots.assignment.shape != (batch, n - num_prefix):
        raise ValueError(
            f"slots cover {tuple(slots.assignment.shape)} patch tokens, the tokens have {(batch, n - num_prefix)}"
        )
    outputs, ids, sizes, patch_assignment = merge_within_groups(
        tokens[:, num_prefix:], slots.assignment, budgets
    )
    assignment = torch.cat(
        [prefix_assignment(batch, num_prefix, tokens.device), patch_assignment + num_prefix], dim=1
    )
    packed = pack(tokens[:, :num_prefix], outputs, assignment)
    return SlotTokens(packed.tokens, packed.assignment, num_prefix, None, ids, sizes, budgets)


def compress_slots(
    tokens: Tensor,
    slots: Slots,
    total: int,
    *,
    num_prefix: int = 0,
    min_per_slot: int = 1,
    max_per_slot: int | None = None,
    query: Tensor | None = None,
    temperature: float = 0.05,
    measure: str = "scatter",
) -> SlotTokens:
    """Allocate ``total`` tokens per image across its slots and merge each slot to its budget.

    Budgets follow :func:`slot_complexity` (``measure``), times :func:`relevance_weights` of
    :func:`query_relevance` when a ``query`` [C] or [B, C] is given. A slot never gets more tokens
    than it has patches, and every non-empty slot gets at least ``min(min_per_slot, its patches)``.
    """
    check_tokens(tokens, num_prefix)
    counts = slots.counts()  # [B, S]
    present = counts > 0
    lo = torch.minimum(torch.full_like(counts, min_per_slot), counts)
    hi = counts if max_per_slot is None else torch.minimum(torch.full_like(counts, max_per_slot), counts)
    complexity = slot_complexity(tokens, slots, num_prefix, measure)
    relevance = None
    if query is not None:
        cosine = query_relevance(slot_means(tokens, slots, num_prefix), query)
        relevance = relevance_weights(cosine, present, temperature)
    budgets = allocate(complexity, total, lo, hi, relevance)
    return merge_slots(tokens, slots, budgets, num_prefix)
