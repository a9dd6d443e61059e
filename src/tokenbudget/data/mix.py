"""A heterogeneous development set: simple items, textures, photo crops, multi-object scenes and
surface-inspection images in one labelled set, so that how many tokens an image needs differs from
image to image.

Real inputs are mixed: a plain item on a blank background next to a busy photo or a surface whose
class is one small flaw. A per-image token budget can only pay where the need differs; a set of one
kind (Fashion-MNIST alone) cannot show it.

Five sources, each with its own classes (the ids are disjoint, :data:`MIX_CLASSES` names them):

==========  ======  =========================================================================
source      ids     images
==========  ======  =========================================================================
fashion     0-9     one Fashion-MNIST item on its black background, upscaled (class = item class)
texture     10-16   procedural textures: gratings, checks, blobs, pink noise, dots, warped waves
                    and Voronoi cells, randomly tinted (class = texture). Natural texture photos
                    (brick, grass, gravel) are left to the inspection source, whose surfaces
                    they are: one surface under two label spaces would make the set ill-posed
photo       17-26   crops of ten scikit-image photos (class = the photo the crop comes from)
scene       27-34   three Fashion-MNIST items on one black canvas; the class is the scene type,
                    a fixed set of three item classes (:data:`SCENE_TYPES`), so it takes every
                    item to tell e.g. ``sport`` (t-shirt, trouser, sneaker) from ``summer``
                    (t-shirt, trouser, sandal)
inspection  35-38   textured or plain surfaces, clean or with one small spot, scratch or
                    washed-out flaw (:mod:`tokenbudget.data.anomaly`; class = the flaw): the
                    class sits in one to four of a ViT's patches
==========  ======  =========================================================================

Train and test never share a base image or a crop: Fashion-MNIST items (alone or in scenes) come
from Fashion-MNIST's own train or test split; photos are cut into a 3 x 3 grid whose cells alternate
between train and test like a checkerboard and every crop lies inside one cell; procedural textures
are drawn from different random streams per split; inspection images of train and test come from
disjoint base crops.

Generation is seeded and deterministic; the arrays are cached as ``.npz`` under
``~/.cache/tokenbudget`` (``TOKENBUDGET_CACHE`` overrides), keyed by every parameter.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models.dinov2 import default_cache_dir
from .anomaly import ANOMALY_CLASSES
from .fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_subset, load_fashion_mnist
from .images import SAMPLE_IMAGES

SOURCES = ("fashion", "texture", "photo", "scene", "inspection")
TEXTURES = ("gratings", "checks", "blobs", "pink-noise", "dots", "waves", "cells")
# the photos the rest of the package samples, and two grey ones scikit-image also bundles
PHOTOS = (*SAMPLE_IMAGES, "coins", "clock")
#: scene type -> the Fashion-MNIST classes of its three items. Types overlap in two items, so one
#: item decides between them (sport / summer: sneaker or sandal; winter / autumn: coat or trouser).
SCENE_TYPES: dict[str, tuple[int, int, int]] = {
    "summer": (0, 1, 5),  # t-shirt, trouser, sandal
    "sport": (0, 1, 7),  # t-shirt, trouser, sneaker
    "winter": (2, 4, 9),  # pullover, coat, ankle boot
    "autumn": (2, 1, 9),  # pullover, trouser, ankle boot
    "office": (6, 1, 8),  # shirt, trouser, bag
    "party": (3, 5, 8),  # dress, sandal, bag
    "evening": (3, 9, 8),  # dress, ankle boot, bag
    "travel": (4, 7, 8),  # coat, sneaker, bag
}
MIX_CLASSES: tuple[str, ...] = (
    tuple(f"fashion:{name}" for name in FASHION_MNIST_CLASSES)
    + tuple(f"texture:{name}" for name in TEXTURES)
    + tuple(f"photo:{name}" for name in PHOTOS)
    + tuple(f"scene:{name}" for name in SCENE_TYPES)
    + tuple(f"inspection:{name}" for name in ANOMALY_CLASSES)
)
_FIRST_ID = {"fashion": 0, "texture": 10, "photo": 17, "scene": 27, "inspection": 35}
_PHOTO_GRID = 3
#: generator version of each source: bump one when its images change, so stale caches are not reused
SOURCE_VERSIONS = {"fashion": 1, "texture": 2, "photo": 1, "scene": 1, "inspection": 1}


@dataclass(frozen=True)
class MixSet:
    """One split of the mix.

    ``images`` uint8 [N, S, S, 3]; ``labels`` int64 [N] (ids into :data:`MIX_CLASSES`);
    ``sources`` int64 [N] (index into :data:`SOURCES`).
    """

    images: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def source_names(self) -> list[str]:
        return [SOURCES[s] for s in self.sources.tolist()]


def _split_counts(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible (the first ones take the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _resize(array: np.ndarray, side: int) -> np.ndarray:
    """float or uint8 [H, W] or [H, W, 3] -> uint8 [side, side, 3] (antialiased bilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(array)).float()
    if x.ndim == 2:
        x = x[..., None].expand(-1, -1, 3)
    x = x.permute(2, 0, 1)[None]
    if tuple(x.shape[-2:]) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _fashion(split: str, count: int, size: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    per_class = _split_counts(count, len(FASHION_MNIST_CLASSES))
    items, labels = fashion_mnist_subset(split, max(per_class), seed)
    images, out_labels = [], []
    for c, n in enumerate(per_class):
        chosen = np.flatnonzero(labels.numpy() == c)[:n]
        images += [_resize(items[i].numpy(), size) for i in chosen]
        out_labels += [_FIRST_ID["fashion"] + c] * n
    return images, out_labels


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[S, S] smooth random field in [0, 1]: ``cells x cells`` noise upsampled bicubically."""
    coarse = torch.from_numpy(rng.uniform(0, 1, size=(1, 1, cells, cells)))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()


def _tint(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] in [0, 255]: between two random colours."""
    low, high = rng.uniform(0, 0.4, 3), rng.uniform(0.6, 1.0, 3)
    return 255.0 * (low + (high - low) * gray[..., None])


def _procedural(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] / size
    if name == "gratings":
        gray = np.zeros((size, size))
        for _ in range(int(rng.integers(1, 3))):
            angle, cycles = rng.uniform(0, np.pi), rng.uniform(6, 20)
            phase = rng.uniform(0, 2 * np.pi)
            gray += np.sin(2 * np.pi * cycles * (xs * np.cos(angle) + ys * np.sin(angle)) + phase)
        gray = (gray - gray.min()) / (np.ptp(gray) + 1e-9)
    elif name == "checks":
        angle, cells = rng.uniform(0, np.pi / 2), rng.uniform(5, 14)
        u = xs * np.cos(angle) + ys * np.sin(angle)
        v = -xs * np.sin(angle) + ys * np.cos(angle)
        gray = ((np.floor(u * cells) + np.floor(v * cells)) % 2).astype(float)
    elif name == "blobs":
        from skimage.data import binary_blobs

        blobs = binary_blobs(
            size,
            blob_size_fraction=rng.uniform(0.04, 0.12),
            volume_fraction=rng.uniform(0.3, 0.6),
            rng=int(rng.integers(2**31)),
        )
        gray = blobs.astype(float)
    elif name == "pink-noise":
        freq_y = np.fft.fftfreq(size)[:, None]
        freq_x = np.fft.fftfreq(size)[None, :]
        radius = np.sqrt(freq_y**2 + freq_x**2)
        radius[0, 0] = 1.0
        spectrum = (
            rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))
        ) / radius ** rng.uniform(1.2, 2.0)
        gray = np.real(np.fft.ifft2(spectrum))
        gray = (gray - gray.min()) / (np.ptp(gray) + 1e-9)
    elif name == "dots":
        gray = np.zeros((size, size))
        radius = rng.uniform(0.015, 0.05) * size
        for cy, cx in rng.uniform(0, size, size=(int(rng.integers(20, 80)), 2)):
            gray[(ys * size - cy) ** 2 + (xs * size - cx) ** 2 <= radius**2] = 1.0
    elif name == "waves":
        warp = _smooth_field(rng, size, cells=4) * rng.uniform(1.5, 4.0)
        angle, cycles = rng.uniform(0, np.pi), rng.uniform(5, 14)
        gray = 0.5 + 0.5 * np.sin(2 * np.pi * (cycles * (xs * np.cos(angle) + ys * np.sin(angle)) + warp))
    elif name == "cells":
        seeds = rng.uniform(0, 1, size=(int(rng.integers(15, 60)), 2))
        points = np.stack([ys.ravel(), xs.ravel()], axis=1)
        nearest = np.sqrt(((points[:, None, :] - seeds[None]) ** 2).sum(-1)).min(axis=1)
        gray = nearest.reshape(size, size)
        gray = (gray - gray.min()) / (np.ptp(gray) + 1e-9)
    else:
        raise ValueError(f"unknown procedural texture {name!r}; choose from {TEXTURES}")
    noisy = np.clip(gray + rng.normal(0, 0.03, gray.shape), 0, 1)
    return _resize(_tint(noisy, rng), size)


def _textures(
    split: str, count: int, size: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    for t, (name, n) in enumerate(zip(TEXTURES, _split_counts(count, len(TEXTURES)), strict=True)):
        for _ in range(n):
            images.append(_procedural(name, rng, size))
            labels.append(_FIRST_ID["texture"] + t)
    return images, labels


def _photo_cells(split: str) -> list[tuple[int, int]]:
    """Cells (row, col) of the 3 x 3 photo grid that belong to ``split`` (a checkerboard)."""
    parity = 0 if split == "train" else 1
    return [(r, c) for r in range(_PHOTO_GRID) for c in range(_PHOTO_GRID) if (r + c) % 2 == parity]


def _photos(
    split: str, count: int, size: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int]]:
    import skimage.data

    cells = _photo_cells(split)
    images, labels = [], []
    for p, (name, n) in enumerate(zip(PHOTOS, _split_counts(count, len(PHOTOS)), strict=True)):
        photo = getattr(skimage.data, name)()
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=-1)
        photo = photo[..., :3]
        cell_h, cell_w = photo.shape[0] // _PHOTO_GRID, photo.shape[1] // _PHOTO_GRID
        cell_side = min(cell_h, cell_w)
        for _ in range(n):
            row, col = cells[int(rng.integers(len(cells)))]
            side = int(rng.integers(int(0.6 * cell_side), cell_side + 1))
            top = row * cell_h + int(rng.integers(0, cell_h - side + 1))
            left = col * cell_w + int(rng.integers(0, cell_w - side + 1))
            crop = photo[top : top + side, left : left + side]
            images.append(_resize(crop[:, ::-1] if rng.random() < 0.5 else crop, size))
            labels.append(_FIRST_ID["photo"] + p)
    return images, labels


def _scenes(
    split: str, count: int, size: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int]]:
    """Three items of the scene type's classes in three of the four cells of a 2 x 2 canvas."""
    pool, pool_labels = load_fashion_mnist(None, split)
    pool, pool_labels = pool.numpy(), pool_labels.numpy()
    by_class = [np.flatnonzero(pool_labels == c) for c in range(len(FASHION_MNIST_CLASSES))]
    cell = size // 2
    item_min, item_max = round(cell * 0.72), cell - round(cell * 0.04)
    images, labels = [], []
    for s, (classes, n) in enumerate(
        zip(SCENE_TYPES.values(), _split_counts(count, len(SCENE_TYPES)), strict=True)
    ):
        for _ in range(n):
            canvas = np.zeros((size, size), np.uint8)
            places = rng.choice(4, size=len(classes), replace=False)
            for label, place in zip(rng.permutation(classes), places, strict=True):
                item = pool[int(rng.choice(by_class[int(label)]))]
                side = int(rng.integers(item_min, item_max + 1))
                row, col = divmod(int(place), 2)
                top = row * cell + int(rng.integers(0, cell - side + 1))
                left = col * cell + int(rng.integers(0, cell - side + 1))
                canvas[top : top + side, left : left + side] = _resize(item, side)[..., 0]
            images.append(np.repeat(canvas[..., None], 3, axis=-1))
            labels.append(_FIRST_ID["scene"] + s)
    return images, labels


def _inspection(split: str, count: int, size: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """Surface inspection: :mod:`tokenbudget.data.anomaly` images (clean, spot, scratch, flaw); train
    and test from disjoint base crops (one generated set, split by base crop)."""
    from .anomaly import anomaly_set

    per_split = -(-count // 4)  # base crops per split; each gives one image of every class
    data = anomaly_set(2 * per_split, size, seed=seed + 7919)
    chosen = data.base_ids < per_split if split == "train" else data.base_ids >= per_split
    index = np.flatnonzero(chosen)[:count]
    return list(data.images[index]), [_FIRST_ID["inspection"] + int(v) for v in data.labels[index]]


def generate_source(
    source: str, split: str = "test", count: int = 300, *, size: int = 224, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images of one source: (uint8 [count, S, S, 3], labels int64 [count]), spread evenly
    over the source's classes. A source's images depend only on these arguments."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if count < len(FASHION_MNIST_CLASSES):
        raise ValueError(f"count must be at least 10 (one image per class), got {count}")
    if size < 64 or size % 2:
        raise ValueError(f"size must be an even number of px >= 64, got {size}")
    # One generator per source and split: a source's images do not change when another's count does.
    rng = np.random.default_rng([seed, SOURCES.index(source), 0 if split == "train" else 1])
    if source == "fashion":
        images, labels = _fashion(split, count, size, seed)
    elif source == "texture":
        images, labels = _textures(split, count, size, rng)
    elif source == "photo":
        images, labels = _photos(split, count, size, rng)
    elif source == "scene":
        images, labels = _scenes(split, count, size, rng)
    else:
        images, labels = _inspection(split, count, size, seed)
    return np.stack(images), np.array(labels, dtype=np.int64)


def source_set(
    source: str, split: str = "test", count: int = 300, *, size: int = 224, seed: int = 0, cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`generate_source`, cached on disk as ``.npz`` keyed by every parameter."""
    text = f"mix-v{SOURCE_VERSIONS.get(source, 0)}-{source}-{split}-{count}-{size}-{seed}"
    path = default_cache_dir() / f"mix-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            return f["images"], f["labels"]
    images, labels = generate_source(source, split, count, size=size, seed=seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    return images, labels


def dev_mix(
    split: str = "test",
    n_per_source: int = 300,
    *,
    size: int = 224,
    seed: int = 0,
    sources: Sequence[str] = SOURCES,
    cache: bool = True,
) -> MixSet:
    """One split of the mix: ``n_per_source`` images of each of ``sources`` (default all of
    :data:`SOURCES`), in that order; each source cached on its own (:func:`source_set`)."""
    parts = [source_set(s, split, n_per_source, size=size, seed=seed, cache=cache) for s in sources]
    source_ids = [SOURCES.index(s) for s in sources]
    return MixSet(
        np.concatenate([images for images, _ in parts]),
        np.concatenate([labels for _, labels in parts]),
        np.repeat(np.array(source_ids, dtype=np.int64), [len(labels) for _, labels in parts]),
    )
