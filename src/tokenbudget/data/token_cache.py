"""Backbone output tokens of a dataset, computed once and cached on disk.

Compressors, text projections, slots and saccades all train or score on the *frozen* backbone's
output tokens. Embedding thousands of images with DINOv2-S takes minutes on two CPU cores, so the
tokens are cached (float16, ``torch.save``) under ``~/.cache/tokenbudget/tokens`` keyed by a name
the caller builds from everything that determines them (model, dataset, split, count, seed).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..models.dinov2 import default_cache_dir


def backbone_tokens(
    model: nn.Module,
    images: Tensor,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """``model.forward_features`` of normalized ``images`` [N, 3, H, W]: float32 [N, T, C] (prefix first).

    The tokens are the backbone's final normed output, what a VLM's projector receives.
    ``progress(k)`` is called after each batch with the number of images done in it.
    """
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            out.append(model.forward_features(batch).float())
            if progress is not None:
                progress(len(batch))
    return torch.cat(out)


def token_cache_path(key: str) -> str:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.fspath(default_cache_dir() / "tokens" / f"{digest}.pt")


def cached_tokens(key: str, compute: Callable[[], Tensor], *, cache: bool = True) -> Tensor:
    """``compute()`` once per ``key``; later calls load it (float16 on disk, float32 returned)."""
    path = token_cache_path(key)
    if cache and os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True).float()
    tokens = compute()
    if cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(tokens.to(torch.float16).contiguous(), tmp)
        os.replace(tmp, path)
    return tokens.float()
