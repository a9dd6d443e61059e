"""Per-image budgets in the quality harness: features of the dev mix under each budget, cached.

ToMe reduces every image on its own (no guard: nothing depends on the batch), so an image's
features under a budget do not depend on which other images share its batch. The features of
every test image under every budget level are computed once (:func:`level_features`) and any
per-image allocation is scored by picking each image's row; a real grouped run of
``tb.PerImage`` checks that shortcut (:func:`tokenbudget.evaluate.per_image_eval`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ReductionConfig
from ..data.images import model_normalization, rgb_uint8_to_model_input
from ..models.dinov2 import default_cache_dir
from ..patch import apply, remove
from .harness import extract_features


def embed_features(
    model: nn.Module,
    images: np.ndarray,
    config: ReductionConfig | None = None,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Harness features [N, 2C] of uint8 RGB ``images`` [N, H, W, 3] under ``config`` (``None``: all
    tokens), converted to model input one batch at a time (bounded memory)."""
    mean, std = model_normalization(model)
    if config is not None:
        apply(model, config)
    try:
        chunks = []
        for start in range(0, len(images), batch_size):
            x = rgb_uint8_to_model_input(images[start : start + batch_size], mean, std)
            chunks.append(extract_features(model, x, batch_size).float())
            if progress is not None:
                progress(len(x))
    finally:
        if config is not None:
            remove(model)
    return torch.cat(chunks)


def cached_features(key: str, compute: Callable[[], Tensor], *, cache: bool = True) -> Tensor:
    """``compute()`` once per ``key`` (float32 on disk under ``<cache>/features``); later calls load it."""
    path = default_cache_dir() / "features" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if cache and path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    feats = compute()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(feats.float().contiguous(), tmp)
        os.replace(tmp, path)
    return feats.float()


def level_features(
    model: nn.Module,
    images: np.ndarray,
    configs: Sequence[ReductionConfig | None],
    key: str,
    *,
    batch_size: int = 32,
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Tensor:
    """[N, K, 2C]: features of ``images`` under each of ``configs`` (``None``: all tokens), each cached
    under ``key`` (what identifies the model and the images) and the config's JSON."""
    out = []
    for config in configs:
        name = "full" if config is None else config.to_json(sort_keys=True)
        if progress is not None:
            progress(name)
        out.append(
            cached_features(
                f"{key}|{name}",
                lambda config=config: embed_features(model, images, config, batch_size=batch_size),
                cache=cache,
            )
        )
    return torch.stack(out, dim=1)
