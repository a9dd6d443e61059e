"""Backbone outputs the adaptive trainers need, computed once per dataset and cached on disk.

Exit heads train on the class token after every block, and the budget predictor's targets come
from the harness features of the model at each candidate ToMe budget. Both take minutes of
DINOv2-S on two CPU cores, so they go through :func:`tokenbudget.data.token_cache.cached_tokens`,
keyed by everything that determines them (model, data, split, count, seed, budgets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..adaptive.blockwise import layer_class_tokens
from ..config import ToMe
from ..data.token_cache import cached_tokens
from ..patch import apply, remove
from .features import extract_features


def cached_layer_tokens(
    model: nn.Module,
    images: Tensor,
    key: str,
    *,
    cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """:func:`~tokenbudget.adaptive.blockwise.layer_class_tokens` of ``images``, cached under ``key``:
    [N, depth + 2, C] (class token after each block, then the full-token harness feature halves)."""
    return cached_tokens(
        f"layer-class-tokens-v1-{key}",
        lambda: layer_class_tokens(model, images, progress=progress),
        cache=cache,
    )


def budget_features(
    model: nn.Module,
    images: Tensor,
    keeps: Sequence[float],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """[N, len(keeps), 2C]: the harness feature (class token ‖ size-weighted mean patch token) of each
    image under ``tb.ToMe(keep=k)`` for every ``k`` (``k == 1.0``: the unpatched model)."""
    columns = []
    for keep in keeps:
        if keep < 1.0:
            apply(model, ToMe(keep=keep))
        try:
            columns.append(extract_features(model, images, batch_size, progress))
        finally:
            remove(model)
    return torch.stack(columns, dim=1)


def cached_budget_features(
    model: nn.Module,
    images: Tensor,
    keeps: Sequence[float],
    key: str,
    *,
    cache: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """:func:`budget_features` cached under ``key`` and the budgets."""
    budgets = "-".join(f"{k:g}" for k in keeps)
    return cached_tokens(
        f"budget-features-v1-{key}-{budgets}",
        lambda: budget_features(model, images, keeps, progress=progress),
        cache=cache,
    )


def fashion_mnist_inputs(
    split: str, n_per_class: int, seed: int = 0, size: int = 224
) -> tuple[Tensor, Tensor]:
    """Normalised model input [10 n, 3, size, size] and labels [10 n] of the balanced Fashion-MNIST
    subset (the same images as ``tokenbudget eval --data fashion-mnist`` and the token caches)."""
    from ..data.fashion_mnist import fashion_mnist_subset, to_model_input
    from ..data.images import IMAGENET_MEAN, IMAGENET_STD

    images, labels = fashion_mnist_subset(split, n_per_class, seed)
    return to_model_input(images, size, IMAGENET_MEAN, IMAGENET_STD), labels
