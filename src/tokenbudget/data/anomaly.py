"""A development set where the class is decided by a small local detail: textures with a synthetic flaw.

ToMe's weak spot is an image whose meaning sits in one or two unusual patches: bipartite matching
averages the odd patch into its bland neighbours. This set exposes it, offline and reproducibly.

Each *base* image is a random crop of one of scikit-image's bundled textures (brick, grass,
gravel, the moon's surface) or a smooth synthetic surface, randomly flipped, rotated, tinted and
contrast-jittered. Every base image appears once per class, so the background says nothing about
the label:

    0 clean     the base image itself (the clean counterpart of the three others)
    1 spot      a filled disk, 3-5 % of the image side in radius, much darker or brighter
    2 scratch   a thin straight line, 1.5 % wide and 12-20 % of the side long, at any angle
    3 flaw      a square of 9-11 % of the side whose texture contrast is cut to 15 % (a
                washed-out patch: a texture defect without a colour change); on a plain surface,
                a patch of coarse grain instead

Each flaw sits at a uniformly random place (away from the border), so at 224 px it covers about
one to four of a ViT's 14-16 px patches. Train and test come from disjoint base crops.

Generation is seeded and deterministic; the arrays are cached as ``.npz`` under
``~/.cache/tokenbudget`` (``TOKENBUDGET_CACHE`` overrides), keyed by every generation parameter.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ANOMALY_CLASSES = ("clean", "spot", "scratch", "flaw")
TEXTURES = ("brick", "grass", "gravel", "moon", "smooth")
_VERSION = 1  # bump when the generator changes, so stale caches are not reused


@dataclass(frozen=True)
class AnomalySet:
    """uint8 RGB images [N, S, S, 3] with labels [N] (index into :data:`ANOMALY_CLASSES`), the texture
    each base crop came from [N] (index into :data:`TEXTURES`) and its base-crop id [N]."""

    images: np.ndarray
    labels: np.ndarray
    textures: np.ndarray
    base_ids: np.ndarray


def _cache_dir() -> Path:
    root = os.environ.get("TOKENBUDGET_CACHE") or os.path.join(Path.home(), ".cache", "tokenbudget")
    return Path(root)


def _texture_sources() -> dict[str, np.ndarray]:
    """Grayscale float32 arrays in [0, 1] of the bundled textures (``smooth`` is made per crop)."""
    try:
        import skimage.data
    except ImportError:
        raise ImportError(
            "the anomaly set needs scikit-image; install it with: pip install 'tokenbudget[demo]'"
        ) from None
    return {name: getattr(skimage.data, name)().astype(np.float32) / 255.0 for name in TEXTURES[:-1]}


def _resize(gray: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(gray.astype(np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _smooth_surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain surface: a low-frequency field (bilinear-upsampled coarse noise) plus faint grain."""
    coarse = rng.uniform(0.3, 0.7, size=(4, 4)).astype(np.float32)
    field = _resize(coarse, size)
    return field + rng.normal(0.0, 0.015, size=(size, size)).astype(np.float32)


def _base_image(
    rng: np.random.Generator, sources: dict[str, np.ndarray], size: int
) -> tuple[np.ndarray, int]:
    """One base image [S, S] in [0, 1] and the index of its texture."""
    texture = int(rng.integers(len(TEXTURES)))
    name = TEXTURES[texture]
    if name == "smooth":
        gray = _smooth_surface(rng, size)
    else:
        src = sources[name]
        side = int(rng.integers(160, 320))
        top, left = (
            int(rng.integers(0, src.shape[0] - side + 1)),
            int(rng.integers(0, src.shape[1] - side + 1)),
        )
        gray = _resize(src[top : top + side, left : left + side], size)
        gray = np.rot90(gray, int(rng.integers(4)))
        if rng.random() < 0.5:
            gray = gray[:, ::-1]
        # Contrast and brightness jitter around the crop's mean.
        mean = gray.mean()
        gray = (gray - mean) * rng.uniform(0.7, 1.2) + mean + rng.uniform(-0.1, 0.1)
    return np.clip(gray, 0.0, 1.0).astype(np.float32), texture


def _paint_spot(gray: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    size = gray.shape[0]
    radius = rng.uniform(0.03, 0.05) * size * scale
    cy, cx = rng.uniform(radius + 4, size - radius - 4, size=2)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    gray[disk] = _contrasting_value(gray[disk].mean(), rng)


def _paint_scratch(gray: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    size = gray.shape[0]
    length = rng.uniform(0.12, 0.2) * size * scale
    half_width = max(0.0075 * size * scale, 0.75)
    angle = rng.uniform(0.0, np.pi)
    dy, dx = np.sin(angle), np.cos(angle)
    margin = length / 2 + 4
    cy, cx = rng.uniform(margin, size - margin, size=2)
    yy, xx = np.mgrid[:size, :size]
    along = (yy - cy) * dy + (xx - cx) * dx  # signed distance along the line
    across = -(yy - cy) * dx + (xx - cx) * dy  # distance from the line
    line = (np.abs(along) <= length / 2) & (np.abs(across) <= half_width)
    gray[line] = _contrasting_value(gray[line].mean(), rng)


def _paint_flaw(gray: np.ndarray, rng: np.random.Generator, scale: float) -> None:
    size = gray.shape[0]
    side = max(2, int(rng.uniform(0.09, 0.11) * size * scale))
    top, left = (int(v) for v in rng.integers(4, size - side - 4, size=2))
    patch = gray[top : top + side, left : left + side]
    mean = patch.mean()
    if patch.std() > 0.05:
        # Washed out: the patch keeps its mean (no colour change) but loses 85 % of its texture contrast.
        gray[top : top + side, left : left + side] = mean + 0.15 * (patch - mean)
    else:
        # A plain surface has no texture to wash out: the flaw is a patch of coarse grain instead.
        gray[top : top + side, left : left + side] = mean + rng.normal(0.0, 0.15, size=patch.shape)


def _contrasting_value(local_mean: float, rng: np.random.Generator) -> float:
    """A gray level far from the local mean: dark on light ground, light on dark ground."""
    return float(rng.uniform(0.0, 0.12) if local_mean > 0.5 else rng.uniform(0.88, 1.0))


_PAINTERS = (None, _paint_spot, _paint_scratch, _paint_flaw)


def generate_anomaly_set(num_base: int, size: int = 224, seed: int = 0, scale: float = 1.0) -> AnomalySet:
    """``num_base`` base crops, each in all four classes: ``4 * num_base`` images [S, S, 3] uint8."""
    if num_base < 1:
        raise ValueError(f"num_base must be >= 1, got {num_base}")
    if size < 64:
        raise ValueError(f"size must be >= 64 px for flaws a few patches wide, got {size}")
    rng = np.random.default_rng(seed)
    sources = _texture_sources()
    images, labels, textures, base_ids = [], [], [], []
    for base_id in range(num_base):
        gray, texture = _base_image(rng, sources, size)
        tint = rng.uniform(0.75, 1.0, size=3).astype(np.float32)  # a colour cast shared by the 4 versions
        for label, paint in enumerate(_PAINTERS):
            version = gray.copy()
            if paint is not None:
                paint(version, rng, scale)
            rgb = np.clip(version[..., None] * tint, 0.0, 1.0)
            images.append((rgb * 255.0 + 0.5).astype(np.uint8))
            labels.append(label)
            textures.append(texture)
            base_ids.append(base_id)
    return AnomalySet(np.stack(images), np.array(labels), np.array(textures), np.array(base_ids))


def anomaly_set(
    num_base: int, size: int = 224, seed: int = 0, scale: float = 1.0, *, cache: bool = True
) -> AnomalySet:
    """:func:`generate_anomaly_set`, cached on disk (``.npz``, keyed by version, count, size and seed)."""
    key = hashlib.sha256(f"v{_VERSION}-{num_base}-{size}-{seed}-{scale}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"anomaly-{key}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            return AnomalySet(f["images"], f["labels"], f["textures"], f["base_ids"])
    data = generate_anomaly_set(num_base, size, seed, scale)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(
            tmp, images=data.images, labels=data.labels, textures=data.textures, base_ids=data.base_ids
        )
        os.replace(tmp, path)
    return data


def save_image_folder(data: AnomalySet, root: str | os.PathLike, test_fraction: float = 1 / 3) -> None:
    """Write ``root/train/CLASS/NNNNN.png`` and ``root/test/CLASS/NNNNN.png`` (usable as
    ``tokenbudget eval --data root``), split by base crop like :func:`anomaly_data`: the last
    ``test_fraction`` of the base crops are test, so no background is in both."""
    from PIL import Image

    root = Path(root)
    num_base = int(data.base_ids.max()) + 1
    first_test = num_base - max(1, round(num_base * test_fraction))
    for index, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        split = "test" if data.base_ids[index] >= first_test else "train"
        folder = root / split / ANOMALY_CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")


def save_preview(data: AnomalySet, path: str | os.PathLike, rows: int = 4) -> None:
    """A PNG grid: one row per base crop, its four versions (clean, spot, scratch, flaw) side by side."""
    from PIL import Image

    rows = min(rows, int(data.base_ids.max()) + 1)
    grid = [np.concatenate(list(data.images[data.base_ids == b]), axis=1) for b in range(rows)]
    Image.fromarray(np.concatenate(grid, axis=0)).save(path)
