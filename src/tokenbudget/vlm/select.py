"""Query-aware selection: keep the k patch tokens most relevant to a query (``tb.vlm.select``).

The query is a vector in the space the tokens are scored in: a tensor ([C] for the batch or [B, C]
per image), an image exemplar embedded by the same backbone (:func:`exemplar_query`), or text
(a string or one per image) encoded by a text query encoder (:mod:`tokenbudget.vlm.text`: the
offline MiniLM through a trained projection, or an OpenCLIP model's own text tower).

Relevance [B, N] is cosine similarity (default) or dot product between the query and each token,
or each row of ``keys`` when the tokens are scored in another space than they are returned in (an
OpenCLIP text embedding lives in the joint space the image tower projects its tokens into). With
``diversity > 0`` the k tokens are picked by maximal marginal relevance, so near-duplicates of a
kept token lose to less redundant ones. The kept tokens are returned in their input (raster) order,
after the passed-through prefix tokens; ``.assignment`` maps each kept input token to its output
slot and every other patch to -1; ``.scores`` holds the relevance of all N tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..ops.select import SCORES, mmr_select, relevance
from .base import (
    Budget,
    CompressedTokens,
    check_budget,
    check_finite,
    check_tokens,
    infer_grid,
    pack,
    prefix_assignment,
)

Query = Tensor | str | Sequence[str]


@runtime_checkable
class TextQueryEncoder(Protocol):
    """What :func:`select` needs to take text queries (see :mod:`tokenbudget.vlm.text`)."""

    def encode(self, texts: Sequence[str]) -> Tensor:
        """[T, D] query vectors of ``texts`` in the space tokens are scored in."""
        ...

    def token_space(self, tokens: Tensor) -> Tensor:
        """[B, N, D] the tokens in the space the text queries live in (identity when they share it)."""
        ...


def _query_vectors(
    query: Query, batch: int, dim: int, text_encoder: TextQueryEncoder | None
) -> Tensor:  # [B, D]
    if isinstance(query, str) or (
        isinstance(query, Sequence)
        and not isinstance(query, Tensor)
        and all(isinstance(q, str) for q in query)
    ):
        texts = [query] if isinstance(query, str) else list(query)
        if text_encoder is None:
            raise ValueError(
                "a text query needs a text encoder: pass text_encoder=tb.vlm.ProjectedTextQuery.load(PATH) "
                "(MiniLM + a projection trained by tokenbudget train-text-projection) or "
                "tb.vlm.OpenCLIPTextQuery(model)"
            )
        if len(texts) not in (1, batch):
            raise ValueError(
                f"got {len(texts)} text queries for a batch of {batch}; give one or one per image"
            )
        query = text_encoder.encode(texts)
    if not isinstance(query, Tensor):
        raise TypeError(
            f"query must be a tensor [C] or [B, C], a string or one string per image; got {type(query).__name__}"
        )
    if not query.is_floating_point():
        raise TypeError(f"query must be a float tensor, got dtype {query.dtype}")
    if query.ndim == 1:
        query = query[None]
    if query.ndim != 2 or query.shape[0] not in (1, batch):
        raise ValueError(
            f"query must be [C] or [B, C] with B = {batch} (one per image), got shape {tuple(query.shape)}"
        )
    if query.shape[1] != dim:
        raise ValueError(
            f"query has {query.shape[1]} channels but the tokens are scored in {dim}: embed the query with the "
            "same backbone (tb.vlm.exemplar_query) or use a text projection trained for this width"
        )
    check_finite(query, "the query")
    if bool((query.abs().amax(dim=-1) == 0).any()):
        raise ValueError(
            "the query is all zeros, so it points nowhere: every token would be equally relevant; "
            "give a query vector with a direction (e.g. tb.vlm.exemplar_query of an example image)"
        )
    return query.expand(batch, -1)


def select(
    tokens: Tensor,
    query: Query,
    k: Budget,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix: int = 0,
    score: str = "cosine",
    diversity: float = 0.0,
    keys: Tensor | None = None,
    text_encoder: TextQueryEncoder | None = None,
) -> CompressedTokens:
    """Keep the ``k`` patch tokens of ``tokens`` [B, N, C] most relevant to ``query`` (one k or one per image).

    Args:
        tokens: vision tokens [B, N, C], ``num_prefix`` prefix tokens first (always kept, in front).
        query: [C] or [B, C] tensor in the scoring space; a string or one string per image (needs
            ``text_encoder``).
        k: patch tokens to keep per image, in [1, N - num_prefix]; an int or one per image.
        grid: the patch grid (h, w), checked against N - num_prefix (default: square).
        score: "cosine" or "dot".
        diversity: maximal-marginal-relevance weight (0 = plain top-k); 0.1 to 0.5 drops
            near-duplicates with cosine relevance.
        keys: [B, N, D] the representation to score and measure redundancy in (default: ``tokens``,
            or ``text_encoder.token_space(tokens)`` for a text query).
        text_encoder: turns text queries into vectors (:class:`~tokenbudget.vlm.text.ProjectedTextQuery`,
            :class:`~tokenbudget.vlm.text.OpenCLIPTextQuery`).

    Returns:
        :class:`CompressedTokens` with ``.scores`` the relevance [B, N] of every token.
    """
    if score not in SCORES:
        raise ValueError(f"unknown relevance score {score!r}; use one of {SCORES}")
    _check_diversity(diversity)
    batch, n, _ = check_tokens(tokens, num_prefix, finite=True)
    infer_grid(n - num_prefix, grid)
    ks = check_budget(k, batch, n - num_prefix)
    if keys is None:
        text = isinstance(query, str) or (isinstance(query, Sequence) and not isinstance(query, Tensor))
        keys = text_encoder.token_space(tokens) if text and text_encoder is not None else tokens
    else:
        _check_keys(keys, tokens)
    q = _query_vectors(query, batch, keys.shape[-1], text_encoder).to(keys.device)
    scores = relevance(keys, q, score)  # [B, N]
    return select_by_scores(
        tokens, scores, ks, grid=grid, num_prefix=num_prefix, keys=keys, diversity=diversity
    )


def select_by_scores(
    tokens: Tensor,
    scores: Tensor,
    k: Budget,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix: int = 0,
    keys: Tensor | None = None,
    diversity: float = 0.0,
) -> CompressedTokens:
    """Keep the ``k`` patch tokens with the highest ``scores`` [B, N] (any ranking: relevance, class
    attention, random); ``diversity`` > 0 picks by maximal marginal relevance with redundancy measured
    in ``keys`` (default ``tokens``). Same output as :func:`select`, ``.scores`` = ``scores``."""
    _check_diversity(diversity)
    batch, n, _ = check_tokens(tokens, num_prefix)
    infer_grid(n - num_prefix, grid)
    ks = check_budget(k, batch, n - num_prefix)
    if not isinstance(scores, Tensor) or scores.shape != tokens.shape[:2]:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be [B, N] = {tuple(tokens.shape[:2])}, got {shape}")
    if bool(scores.isnan().any()):
        where = tuple(int(i) for i in scores.isnan().nonzero()[0])
        raise ValueError(
            f"scores contain NaN (first at {where}), which has no rank; give every token a number "
            "(-inf to never keep one)"
        )
    if keys is None:
        keys = tokens
    else:
        _check_keys(keys, tokens)
    if diversity > 0:
        check_finite(keys, "the keys (where redundancy is measured)")
    prefix, outputs, rows = tokens[:, :num_prefix], [], []
    for b, kb in enumerate(ks):
        order = mmr_select(keys[b, num_prefix:], scores[b, num_prefix:], kb, float(diversity))
        kept = order.sort().values  # raster order of the kept patches
        outputs.append(tokens[b, num_prefix + kept])
        row = torch.full((n - num_prefix,), -1, dtype=torch.long, device=tokens.device)
        row[kept] = torch.arange(num_prefix, num_prefix + kb, device=tokens.device)
        rows.append(row)
    assignment = torch.cat([prefix_assignment(batch, num_prefix, tokens.device), torch.stack(rows)], dim=1)
    return pack(prefix, outputs, assignment, scores)


def _check_diversity(diversity: object) -> None:
    if (
        isinstance(diversity, bool)
        or not isinstance(diversity, (int, float))
        or not 0 <= diversity < float("inf")
    ):
        raise ValueError(f"diversity must be a finite number >= 0 (0 = plain top-k), got {diversity!r}")


def _check_keys(keys: object, tokens: Tensor) -> None:
    if not isinstance(keys, Tensor) or keys.ndim != 3 or keys.shape[:2] != tokens.shape[:2]:
        shape = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
        raise ValueError(f"keys must be [B, N, D] with B, N = {tuple(tokens.shape[:2])}, got {shape}")
    if not keys.is_floating_point() or keys.shape[2] == 0:
        raise ValueError(
            f"keys must be a float tensor [B, N, D] with D >= 1, got {keys.dtype} {tuple(keys.shape)}"
        )
    check_finite(keys, "the keys")


def exemplar_query(
    backbone: nn.Module, image: Tensor, *, mask: Tensor | None = None, num_prefix: int | None = None
) -> Tensor:
    """The query vector of an image exemplar: the mean of its patch tokens under ``backbone``.

    ``image``: model input [3, H, W] or [B, 3, H, W] (normalized as the backbone expects). ``mask``:
    optional [h, w] or [B, h, w] weights on the patch grid (e.g. the exemplar's foreground), so only
    the object is averaged. ``num_prefix``: prefix tokens of the backbone's output (default: what
    its adapter says). Returns [C] for one image, [B, C] for a batch.
    """
    single = image.ndim == 3
    images = image[None] if single else image
    if images.ndim != 4:
        raise ValueError(f"expected an image [3, H, W] or a batch [B, 3, H, W], got {tuple(image.shape)}")
    from ..adapters import find_adapter

    adapter = find_adapter(backbone)
    prefix = adapter.num_prefix if num_prefix is None else int(num_prefix)
    with torch.no_grad():
        patches = adapter.features(images)[:, prefix:].float()  # [B, P, C]
    if mask is None:
        out = patches.mean(1)
    else:
        weight = (mask[None] if mask.ndim == 2 else mask).flatten(1).float()  # [B, P]
        if weight.shape != patches.shape[:2]:
            raise ValueError(
                f"mask covers {weight.shape[1]} patches per image but the backbone gave {patches.shape[1]} "
                f"(after {prefix} prefix tokens); give a mask on the patch grid"
            )
        if bool((weight.sum(1) <= 0).any()):
            raise ValueError("mask selects no patch of an exemplar; it must cover part of the object")
        out = (patches * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
    return out[0] if single else out
