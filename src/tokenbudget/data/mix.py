"""A heterogeneous development set: simple items, textures, photo crops and multi-object scenes in one
labelled set, so that how many tokens an image needs differs from image to image.

Real inputs are mixed: a plain item on a blank background next to a busy photo. A per-image token
budget can only pay where the need differs; a set of one kind (Fashion-MNIST alone) cannot show it.

Four sources, each with its own classes (the ids are disjoint, :data:`MIX_CLASSES` names them):

==========  ======  =========================================================================
source      ids     images
==========  ======  =========================================================================
fashion     0-9     one Fashion-MNIST item on its black background, upscaled (class = item class)
texture     10-16   crops of scikit-image's brick, grass and gravel photographs, and procedural
                    gratings, checks, blobs and pink noise (class = texture)
photo       17-26   crops of ten scikit-image photos (class = the photo the crop comes from)
scene       27-34   three Fashion-MNIST items on one black canvas; the class is the scene type,
                    a fixed set of three item classes (:data:`SCENE_TYPES`), so it takes every
                    item to tell e.g. ``sport`` (t-shirt, trouser, sneaker) from ``summer``
                    (t-shirt, trouser, sandal)
==========  ======  =========================================================================

Train and test never share a base image or a crop: Fashion-MNIST items (alone or in scenes) come
from Fashion-MNIST's own train or test split; texture photographs are cropped from their top half
for train and their bottom half for test; photos are cut into a 3 x 3 grid whose cells alternate
between train and test like a checkerboard and every crop lies inside one cell; procedural textures
are drawn from different random streams per split.

Generation is seeded and deterministic; the arrays are cached as ``.npz`` under
``~/.cache/tokenbudget`` (``TOKENBUDGET_CACHE`` overrides), keyed by every parameter.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models.dinov2 import default_cache_dir
from .fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_subset, load_fashion_mnist

SOURCES = ("fashion", "texture", "photo", "scene")
TEXTURE_PHOTOS = ("brick", "grass", "gravel")
PROCEDURAL_TEXTURES = ("gratings", "checks", "blobs", "pink-noise")
TEXTURES = TEXTURE_PHOTOS + PROCEDURAL_TEXTURES
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "clock",
)
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
)
_FIRST_ID = {"fashion": 0, "texture": 10, "photo": 17, "scene": 27}
_PHOTO_GRID = 3
_VERSION = 1  # bump when the generator changes, so stale caches are not reused


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


def _augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rotation by a multiple of 90 degrees and a random flip."""
    crop = np.rot90(crop, int(rng.integers(4)))
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _fashion(split: str, count: int, size: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    per_class = _split_counts(count, len(FASHION_MNIST_CLASSES))
    items, labels = fashion_mnist_subset(split, max(per_class), seed)
    images, out_labels = [], []
    for c, n in enumerate(per_class):
        chosen = np.flatnonzero(labels.numpy() == c)[:n]
        images += [_resize(items[i].numpy(), size) for i in chosen]
        out_labels += [_FIRST_ID["fashion"] + c] * n
    return images, out_labels


def _texture_photo(name: str, split: str, rng: np.random.Generator, size: int) -> np.ndarray:
    import skimage.data

    photo = getattr(skimage.data, name)()  # [512, 512] gray
    half = photo.shape[0] // 2
    region = photo[:half] if split == "train" else photo[half:]
    side = int(rng.integers(half // 2, half + 1))
    top = int(rng.integers(0, region.shape[0] - side + 1))
    left = int(rng.integers(0, region.shape[1] - side + 1))
    crop = _augment(region[top : top + side, left : left + side], rng)
    return _resize(crop * rng.uniform(0.8, 1.2), size)


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
    else:
        raise ValueError(f"unknown procedural texture {name!r}; choose from {PROCEDURAL_TEXTURES}")
    noisy = np.clip(gray + rng.normal(0, 0.03, gray.shape), 0, 1)
    return _resize(_tint(noisy, rng), size)


def _textures(
    split: str, count: int, size: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    for t, (name, n) in enumerate(zip(TEXTURES, _split_counts(count, len(TEXTURES)), strict=True)):
        for _ in range(n):
            if name in TEXTURE_PHOTOS:
                images.append(_texture_photo(name, split, rng, size))
            else:
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


def generate_mix(split: str = "test", n_per_source: int = 300, *, size: int = 224, seed: int = 0) -> MixSet:
    """Build one split of the mix: ``n_per_source`` images from each of the four :data:`SOURCES`,
    spread evenly over each source's classes. See the module docstring."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n_per_source < len(FASHION_MNIST_CLASSES):
        raise ValueError(f"n_per_source must be at least 10 (one image per class), got {n_per_source}")
    if size < 64 or size % 2:
        raise ValueError(f"size must be an even number of px >= 64, got {size}")
    # One generator per source and split: a source's images do not change when another's count does.
    streams = {
        source: np.random.default_rng([seed, i, 0 if split == "train" else 1])
        for i, source in enumerate(SOURCES)
    }
    parts = [
        _fashion(split, n_per_source, size, seed),
        _textures(split, n_per_source, size, streams["texture"]),
        _photos(split, n_per_source, size, streams["photo"]),
        _scenes(split, n_per_source, size, streams["scene"]),
    ]
    images = np.stack([image for part, _ in parts for image in part])
    labels = np.array([label for _, part in parts for label in part], dtype=np.int64)
    sources = np.repeat(np.arange(len(SOURCES)), [len(part) for _, part in parts])
    return MixSet(images, labels, sources.astype(np.int64))


def dev_mix(
    split: str = "test", n_per_source: int = 300, *, size: int = 224, seed: int = 0, cache: bool = True
) -> MixSet:
    """:func:`generate_mix`, cached on disk as ``.npz`` keyed by every parameter."""
    text = f"mix-v{_VERSION}-{split}-{n_per_source}-{size}-{seed}"
    path = default_cache_dir() / f"mix-{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            return MixSet(f["images"], f["labels"], f["sources"])
    data = generate_mix(split, n_per_source, size=size, seed=seed)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, images=data.images, labels=data.labels, sources=data.sources)
        os.replace(tmp, path)
    return data
