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
    """Token features of normalized ``images`` [N, 3, H, W]: float32 [N, T, C] (prefix first).

    The tokens are the backbone's final normed output, what a VLM's projector receives.
    ``progress(k)`` is called after each batch with the number of images done in it.
    """
    from ..adapters import find_adapter

    features = find_adapter(model).features
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            out.append(features(batch).float())
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


def _embed_in_chunks(
    model: nn.Module, to_input: Callable[[int, int], Tensor], count: int, batch_size: int, progress
) -> Tensor:  # noqa: ANN001 - progress: Callable[[int], None] | None
    """Tokens of ``count`` images converted to model input one batch at a time (bounded memory)."""
    chunks = []
    for start in range(0, count, batch_size):
        images = to_input(start, min(start + batch_size, count))
        chunks.append(backbone_tokens(model, images, batch_size, progress).to(torch.float16))
    return torch.cat(chunks)


def dinov2_scene_tokens(
    num_scenes: int,
    split: str = "test",
    seed: int = 0,
    *,
    first: int | None = None,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    cache: bool = True,
):  # noqa: ANN201 - (SceneSet, Tensor)
    """The scenes of :func:`~tokenbudget.data.scenes.scene_set` and the embedded DINOv2-S tokens of
    each: ``(scenes, tokens [S, 257, 384])`` (class token first, then the 16 x 16 patch grid).

    ``first``: only the first ``first`` of the ``num_scenes`` scenes (they do not depend on
    ``num_scenes``): taken from the cached tokens of all ``num_scenes`` when those exist, else only
    these scenes are generated and embedded (and cached as a set of ``first``).
    ``progress(k)`` is called after each embedded batch of ``k`` images (not when the cache is read).
    """
    from ..models import dinov2_small
    from .images import model_normalization, rgb_uint8_to_model_input
    from .scenes import _VERSION, scene_set

    if first is not None:
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= num_scenes:
            raise ValueError(f"first must be an int in [1, num_scenes={num_scenes}], got {first!r}")
        full_key = f"dinov2_small-imgfocus-scenes-v{_VERSION}-{num_scenes}-{split}-{seed}"
        if first < num_scenes and not (cache and os.path.exists(token_cache_path(full_key))):
            return dinov2_scene_tokens(
                first, split, seed, batch_size=batch_size, progress=progress, cache=cache
            )
        scenes, tokens = dinov2_scene_tokens(num_scenes, split, seed, batch_size=batch_size, cache=cache)
        return scenes.first(first), tokens[:first]

    scenes = scene_set(num_scenes, split, seed=seed, cache=cache)

    def compute() -> Tensor:
        model = dinov2_small().eval()
        mean, std = model_normalization(model)
        return _embed_in_chunks(
            model,
            lambda lo, hi: rgb_uint8_to_model_input(scenes.images[lo:hi], mean, std),
            len(scenes.images),
            batch_size,
            progress,
        )

    key = f"dinov2_small-imgfocus-scenes-v{_VERSION}-{num_scenes}-{split}-{seed}"
    return scenes, cached_tokens(key, compute, cache=cache)


def dinov2_fashion_mnist_tokens(
    split: str = "test",
    n_per_class: int = 50,
    seed: int = 0,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    cache: bool = True,
) -> tuple[Tensor, Tensor]:
    """Embedded DINOv2-S tokens of a balanced Fashion-MNIST subset at 224 px (one item per image):
    ``(tokens [10 * n_per_class, 257, 384], labels [10 * n_per_class])``."""
    from ..models import dinov2_small
    from .fashion_mnist import fashion_mnist_subset, to_model_input
    from .images import model_normalization

    images, labels = fashion_mnist_subset(split, n_per_class, seed)

    def compute() -> Tensor:
        model = dinov2_small().eval()
        mean, std = model_normalization(model)
        return _embed_in_chunks(
            model,
            lambda lo, hi: to_model_input(images[lo:hi], 224, mean, std),
            len(images),
            batch_size,
            progress,
        )

    key = f"dinov2_small-imgfocus-fashion-mnist-{split}-{n_per_class}-{seed}"
    return cached_tokens(key, compute, cache=cache), labels
