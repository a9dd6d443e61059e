"""Multi-object scenes from Fashion-MNIST: several labelled items on one canvas, positions known.

The benchmark for query-aware selection, compressors, object slots and saccades: a query names or
shows one item, and we know exactly which patches that item covers.

Layout: the canvas (default 224 px, black like Fashion-MNIST's background) is cut into a 2 x 2 grid
of cells; each item takes its own cell (so items never overlap), is resized to a random side in
[``item_min``, ``item_max``] px (antialiased bilinear) and placed at a random offset inside its cell.
The items of one scene have distinct classes, so a class name picks out exactly one item. Items of
``split="train"`` scenes come from Fashion-MNIST's train split, ``"test"`` from its test split.

Ground truth: ``owner`` [S, H, W] is the item index (0..num_items-1) at each pixel where the
resized item is brighter than ``FOREGROUND_LEVEL`` (its footprint), else -1 (background).
:meth:`SceneSet.patch_owner` turns it into the item that covers each ViT patch.

Generation is seeded and deterministic; scenes are cached as ``.npz`` under ``~/.cache/tokenbudget``
(``TOKENBUDGET_CACHE`` overrides), keyed by every generation parameter.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..models.dinov2 import default_cache_dir
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

FOREGROUND_LEVEL = 16  # uint8 level above which a pixel belongs to an item (Fashion-MNIST's background is 0)
_CELLS = (2, 2)
_VERSION = 1  # bump when the generator changes, so stale caches are not reused


@dataclass(frozen=True)
class SceneSet:
    """Scenes and their ground truth.

    ``images`` uint8 [S, H, W, 3]; ``labels`` int64 [S, I] (Fashion-MNIST class of each item);
    ``boxes`` int64 [S, I, 4] (top, left, bottom, right) in pixels, bottom/right exclusive;
    ``owner`` int8 [S, H, W] (item index at each pixel, -1 background); ``sources`` int64 [S, I]
    (index of each item in its Fashion-MNIST split).
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    owner: np.ndarray
    sources: np.ndarray

    @property
    def num_items(self) -> int:
        return self.labels.shape[1]

    def patch_owner(self, patch_size: int, min_cover: float = 0.25) -> np.ndarray:
        """int64 [S, H // p, W // p]: the item covering the largest share of each patch, or -1 when no
        item covers at least ``min_cover`` of the patch's pixels."""
        s, h, w = self.owner.shape
        gh, gw = h // patch_size, w // patch_size
        owner = self.owner[:, : gh * patch_size, : gw * patch_size].astype(np.int64)
        blocks = owner.reshape(s, gh, patch_size, gw, patch_size).transpose(0, 1, 3, 2, 4)
        blocks = blocks.reshape(s, gh, gw, patch_size * patch_size)
        cover = np.stack([(blocks == i).mean(-1) for i in range(self.num_items)], axis=-1)  # [S, gh, gw, I]
        best = cover.argmax(-1)
        return np.where(cover.max(-1) >= min_cover, best, -1)

    def first(self, n: int) -> SceneSet:
        """The first ``n`` scenes. Generation is sequential, so ``scene_set(m).first(n)`` equals
        ``scene_set(n)`` for the same split, seed and parameters."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self.images):
            raise ValueError(f"n must be an int in [1, {len(self.images)}] (the scenes there are), got {n!r}")
        return SceneSet(self.images[:n], self.labels[:n], self.boxes[:n], self.owner[:n], self.sources[:n])

    def class_names(self) -> list[list[str]]:
        """The class name of every item, [S][I]."""
        return [[FASHION_MNIST_CLASSES[c] for c in row] for row in self.labels.tolist()]


def _resize_item(item: np.ndarray, side: int) -> np.ndarray:
    x = torch.from_numpy(item).float()[None, None]
    x = torch.nn.functional.interpolate(
        x, size=(side, side), mode="bilinear", align_corners=False, antialias=True
    )
    return x[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def generate_scenes(
    num_scenes: int,
    split: str = "test",
    *,
    size: int = 224,
    num_items: int = 4,
    item_min: int = 80,
    item_max: int = 108,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> SceneSet:
    """Build ``num_scenes`` scenes of ``num_items`` (1..4) Fashion-MNIST items of distinct classes.

    Scenes are drawn one after another from one seeded generator, so the first ``n`` scenes of a
    larger set are the scenes of a set of ``n``. ``progress(k)`` is called after every ``k`` scenes.
    """
    cells = _CELLS[0] * _CELLS[1]
    if not 1 <= num_items <= cells:
        raise ValueError(
            f"num_items must be in [1, {cells}] (one item per cell of a 2 x 2 canvas), got {num_items}"
        )
    cell = size // _CELLS[0]
    if not 8 <= item_min <= item_max <= cell:
        raise ValueError(
            f"need 8 <= item_min <= item_max <= {cell} (the cell side at size={size}), "
            f"got item_min={item_min}, item_max={item_max}"
        )
    if isinstance(num_scenes, bool) or not isinstance(num_scenes, int) or num_scenes < 1:
        raise ValueError(f"num_scenes must be an int >= 1, got {num_scenes!r}")
    pool_images, pool_labels = load_fashion_mnist(root, split)
    pool_images, pool_labels = pool_images.numpy(), pool_labels.numpy()
    by_class = [np.flatnonzero(pool_labels == c) for c in range(len(FASHION_MNIST_CLASSES))]
    rng = np.random.default_rng(seed)
    images = np.zeros((num_scenes, size, size, 3), np.uint8)
    owner = np.full((num_scenes, size, size), -1, np.int8)
    labels = np.zeros((num_scenes, num_items), np.int64)
    boxes = np.zeros((num_scenes, num_items, 4), np.int64)
    sources = np.zeros((num_scenes, num_items), np.int64)
    for s in range(num_scenes):
        classes = rng.choice(len(FASHION_MNIST_CLASSES), size=num_items, replace=False)
        places = rng.choice(cells, size=num_items, replace=False)
        for i, (label, place) in enumerate(zip(classes, places, strict=True)):
            source = int(rng.choice(by_class[label]))
            side = int(rng.integers(item_min, item_max + 1))
            row, col = divmod(int(place), _CELLS[1])
            top = row * cell + int(rng.integers(0, cell - side + 1))
            left = col * cell + int(rng.integers(0, cell - side + 1))
            item = _resize_item(pool_images[source], side)
            images[s, top : top + side, left : left + side] = item[..., None]
            owner[s, top : top + side, left : left + side][item > FOREGROUND_LEVEL] = i
            labels[s, i], sources[s, i] = label, source
            boxes[s, i] = (top, left, top + side, left + side)
        if progress is not None and ((s + 1) % 50 == 0 or s + 1 == num_scenes):
            progress(50 if (s + 1) % 50 == 0 else (s + 1) % 50)
    return SceneSet(images, labels, boxes, owner, sources)


def scene_set(
    num_scenes: int,
    split: str = "test",
    *,
    seed: int = 0,
    cache: bool = True,
    progress: Callable[[int], None] | None = None,
    **kwargs,
) -> SceneSet:
    """:func:`generate_scenes`, cached on disk as ``.npz`` keyed by every parameter (``progress``
    is called while generating, not when loading the cache)."""
    params = dict(size=224, num_items=4, item_min=80, item_max=108) | kwargs
    text = f"v{_VERSION}-{num_scenes}-{split}-{seed}-" + "-".join(f"{k}={params[k]}" for k in sorted(params))
    path = default_cache_dir() / f"scenes-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            return SceneSet(f["images"], f["labels"], f["boxes"], f["owner"], f["sources"])
    data = generate_scenes(num_scenes, split, seed=seed, progress=progress, **params)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(
            tmp,
            images=data.images,
            labels=data.labels,
            boxes=data.boxes,
            owner=data.owner,
            sources=data.sources,
        )
        os.replace(tmp, path)
    return data
