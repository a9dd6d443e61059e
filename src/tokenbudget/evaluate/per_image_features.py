"""Features of images under budgets, cached, for the per-image evaluation (dev mix and real runs).

ToMe reduces every image on its own (no guard: nothing depends on the batch), so an image's
features under a budget do not depend on which other images share its batch. The features of
every test image under every budget level are computed once (:func:`level_features`) and any
per-image allocation is scored by picking each image's row; a real grouped run of ``tb.PerImage``
(:func:`real_run`) checks that shortcut.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..adapters import find_adapter
from ..config import ReductionConfig
from ..data.images import model_normalization, rgb_uint8_to_model_input
from ..flops import model_flops
from ..models.dinov2 import default_cache_dir
from ..patch import apply, last_state, remove
from .features import extract_features


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


def measured_flops(model: nn.Module, input_tokens: int) -> float:
    """Mean block FLOPs fraction of the latest forward of a patched model."""
    state = last_state(model)
    flops = getattr(state, "flops", None)
    if flops is not None:  # a PerImageState: per image
        return float(flops.double().mean())
    dims = find_adapter(model).block_dims()
    full = model_flops(input_tokens, [input_tokens] * len(dims), dims)
    return model_flops(state.input_tokens, state.tokens_per_layer, dims) / full


def real_run(
    model: nn.Module, images: Tensor, config: ReductionConfig, batch_size: int
) -> tuple[Tensor, Tensor]:
    """(harness features [N, 2C], per-image block FLOPs fraction [N]) of a real run under ``config``."""
    input_tokens = find_adapter(model).default_num_tokens
    apply(model, config)
    feats, flops = [], []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            feats.append(extract_features(model, x, batch_size).float())
            per_image = getattr(last_state(model), "flops", None)
            if per_image is None:
                per_image = torch.full((len(x),), measured_flops(model, input_tokens), dtype=torch.float64)
            flops.append(per_image.double())
    finally:
        remove(model)
    return torch.cat(feats), torch.cat(flops)


def mix_level_features(
    model: nn.Module,
    model_key: str,
    split: str,
    configs: Sequence[ReductionConfig | None],
    *,
    n_per_source: int = 300,
    sources: Sequence[str] | None = None,
    seed: int = 0,
    stride: int = 1,
    batch_size: int = 32,
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(features [N, K, 2C] of the dev mix's ``split`` under each config, labels [N], source ids [N]),
    cached per source (``model_key`` names the model), so adding a source or a config embeds only
    what is new. ``stride > 1`` takes every ``stride``-th image of each source (a subset, e.g. to
    calibrate on)."""
    from ..data.mix import SOURCE_VERSIONS, SOURCES, dev_mix, source_set

    sources = tuple(sources or SOURCES)
    size = int(find_adapter(model).image_size[0])
    feats = []
    for source in sources:
        images, _ = source_set(source, split, n_per_source, size=size, seed=seed, cache=cache)
        key = f"{model_key}|mix-v{SOURCE_VERSIONS[source]}-{source}-{split}-{n_per_source}-{size}-{seed}"
        if stride > 1:
            images, key = images[::stride], f"{key}-stride{stride}"
        feats.append(
            level_features(
                model,
                images,
                configs,
                key,
                batch_size=batch_size,
                cache=cache,
                progress=None if progress is None else lambda name, s=source: progress(f"{s}: {name}"),
            )
        )
    data = dev_mix(split, n_per_source, size=size, seed=seed, sources=sources, cache=cache)
    labels, source_ids = torch.from_numpy(data.labels), torch.from_numpy(data.sources)
    if stride > 1:
        keep = torch.cat([torch.nonzero(source_ids == SOURCES.index(s)).flatten()[::stride] for s in sources])
        labels, source_ids = labels[keep], source_ids[keep]
    return torch.cat(feats), labels, source_ids


__all__ = [
    "cached_features",
    "embed_features",
    "level_features",
    "measured_flops",
    "mix_level_features",
    "real_run",
]
