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
from numbers import Integral

import torch
from torch import Tensor

from ..ops.apportion import apportion
from ..ops.group import group_mean
from ..ops.select import unit_vectors
from ..ops.slot_merge import merge_within_groups
from .base import CompressedTokens, check_finite, check_tokens, pack, prefix_assignment
from .slots import Slots

COMPLEXITY_MEASURES = ("scatter", "spread", "area")


def _as_scores(value: object, name: str) -> Tensor:
    """``value`` as a real tensor; ``TypeError`` naming ``name`` for anything else."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be a tensor of scores [S] or [B, S], got {type(value).__name__}"
        ) from None
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    return tensor


def _check_weights(rows: Tensor, name: str) -> None:
    """``ValueError`` unless every score is finite and >= 0."""
    bad = ~torch.isfinite(rows) | (rows < 0)
    if bool(bad.any()):
        image, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite and >= 0 for every slot; image {image}, slot {slot} has "
            f"{float(rows[image, slot])}"
        )


def _unit_rows(rows: Tensor) -> Tensor:
    """Each row [B, S] divided by its largest value (all-zero rows stay zero)."""
    top = rows.amax(1, keepdim=True)
    return torch.where(top > 0, rows / top.clamp_min(torch.finfo(rows.dtype).tiny), rows)


def _as_rows(value: Tensor | int | float | None, like: Tensor, name: str) -> Tensor | None:
    """``value`` broadcast to ``like``'s [B, S] shape (float64), or None."""
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
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
    scores = _as_scores(complexity, "complexity")
    if scores.ndim not in (1, 2) or scores.shape[-1] == 0 or (scores.ndim == 2 and scores.shape[0] == 0):
        raise ValueError(f"complexity must be [S] or [B, S] with B, S >= 1, got shape {tuple(scores.shape)}")
    if isinstance(total, bool) or not isinstance(total, (int, float, Integral)) or int(total) != total:
        raise ValueError(f"total must be an int (tokens per image), got {total!r}")
    total = int(total)
    if total < 0:
        raise ValueError(f"total must be >= 0 (tokens to hand out per image), got {total}")
    # A few numbers per slot: apportioned on the CPU whatever the scores' device, returned on it.
    rows = scores.detach().double().cpu().reshape(-1, scores.shape[-1])  # [B, S]
    _check_weights(rows, "complexity")
    # Each score row is divided by its largest value, so the budgets do not depend on the scale of
    # either score (and their product cannot overflow).
    weights = _unit_rows(rows)
    if relevance is not None:
        relevance_rows = _as_rows(_as_scores(relevance, "relevance"), rows, "relevance")
        _check_weights(relevance_rows, "relevance")
        weights = weights * _unit_rows(relevance_rows)
    lo = _as_rows(min_per_slot, rows, "min_per_slot")
    hi = _as_rows(total if max_per_slot is None else max_per_slot, rows, "max_per_slot")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or (lo < 0).any():
        raise ValueError("min_per_slot and max_per_slot must be non-negative integers (None: no maximum)")
    if (lo != lo.round()).any() or (hi != hi.round()).any():
        raise ValueError("min_per_slot and max_per_slot must be non-negative integers (None: no maximum)")
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
    return shares.reshape(scores.shape).to(scores.device)


def _check_slots(slots: object, batch: int, patches: int) -> None:
    if not isinstance(slots, Slots):
        raise TypeError(
            f"slots must be a tb.vlm.Slots (e.g. from tb.vlm.cluster_slots), got {type(slots).__name__}"
        )
    if tuple(slots.assignment.shape) != (batch, patches):
        raise ValueError(
            f"slots cover {tuple(slots.assignment.shape)} patch tokens, the tokens have {(batch, patches)} "
            "(B, N - num_prefix): make the slots from the same tokens and num_prefix"
        )


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
    z = unit_vectors(tokens[:, num_prefix:].double())  # [B, N, C]
    means = group_mean(z, slots.assignment, slots.max_slots)  # [B, S, C]
    squared = (z - means.gather(1, slots.assignment[..., None].expand_as(z))).square().sum(-1)  # [B, N]
    scatter = torch.zeros_like(counts).scatter_add_(1, slots.assignment, squared)
    return scatter if measure == "scatter" else scatter / counts.clamp_min(1)


def query_relevance(slot_features: Tensor, query: Tensor) -> Tensor:
    """Cosine [B, S] between each slot feature [B, S, C] and a query vector [C] or [B, C]."""
    if not isinstance(query, Tensor) or not query.is_floating_point():
        raise TypeError(f"query must be a float tensor [C] or [B, C], got {type(query).__name__}")
    if query.ndim not in (1, 2) or query.shape[-1] != slot_features.shape[-1]:
        raise ValueError(
            f"the query has shape {tuple(query.shape)} but the tokens have width {slot_features.shape[-1]}; "
            "give a query vector [C] or [B, C] in the token space"
        )
    if query.ndim == 2 and query.shape[0] not in (1, slot_features.shape[0]):
        raise ValueError(
            f"got {query.shape[0]} queries for {slot_features.shape[0]} images; give one or one per image"
        )
    check_finite(query, "the query")
    if bool((query.abs().amax(-1) == 0).any()):
        raise ValueError("the query is all zeros, so it points nowhere; give a query vector with a direction")
    q = unit_vectors(query).float()
    q = q.expand(slot_features.shape[0], -1) if q.ndim == 1 or q.shape[0] == 1 else q
    return torch.einsum("bsc,bc->bs", unit_vectors(slot_features).float(), q)


def relevance_weights(cosine: Tensor, present: Tensor, temperature: float = 0.05) -> Tensor:
    """Softmax over the present slots of ``cosine / temperature``: [B, S], zero for absent slots."""
    if isinstance(temperature, bool) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0 (e.g. 0.05), got {temperature}")
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
    batch, n, _ = check_tokens(tokens, num_prefix, finite=True)
    _check_slots(slots, batch, n - num_prefix)
    if not isinstance(budgets, Tensor) or budgets.is_floating_point() or budgets.dtype == torch.bool:
        raise TypeError("budgets must be an integer tensor [B, S] (e.g. from tb.vlm.allocate)")
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
    than it has patches, and every non-empty slot gets at least ``min(max(min_per_slot, 1), its patches)``
    (merging within a slot never removes it)."""
    batch, n, _ = check_tokens(tokens, num_prefix, finite=True)
    _check_slots(slots, batch, n - num_prefix)
    for name, value in (("min_per_slot", min_per_slot), ("max_per_slot", max_per_slot)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 0):
            raise ValueError(
                f"{name} must be an int >= 0{' or None' if name == 'max_per_slot' else ''}, got {value!r}"
            )
    if max_per_slot is not None and max_per_slot < 1:
        raise ValueError(
            f"max_per_slot must be >= 1 (merging within a slot keeps at least one token of it), got {max_per_slot}"
        )
    counts = slots.counts()  # [B, S]
    present = counts > 0
    # Merging never drops a slot: a non-empty slot keeps at least one token.
    lo = torch.minimum(torch.full_like(counts, max(min_per_slot, 1)), counts)
    need = int(lo.sum(1).max())
    if total < need:
        raise ValueError(
            f"total={total} is too small: the non-empty slots keep at least {need} tokens together (at least "
            f"{max(min_per_slot, 1)} each, merging never drops a slot); raise the total or lower min_per_slot"
        )
    hi = counts if max_per_slot is None else torch.minimum(torch.full_like(counts, max_per_slot), counts)
    complexity = slot_complexity(tokens, slots, num_prefix, measure)
    relevance = None
    if query is not None:
        cosine = query_relevance(slot_means(tokens, slots, num_prefix), query)
        relevance = relevance_weights(cosine, present, temperature)
    budgets = allocate(complexity, total, lo, hi, relevance)
    return merge_slots(tokens, slots, budgets, num_prefix)
