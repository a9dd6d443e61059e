"""A development set of stationary woven-fabric textures: nominal, a tiny local defect, a subtle global change.

Token merging averages similar tokens. On a stationary texture almost every patch resembles every
other, so bipartite matching builds very large groups, and an average of many texture patches is
smoother and lower in contrast than any one of them: it looks like a fabric whose statistics
changed. This set reproduces that situation offline: each *base* fabric is rendered three times,

    0 nominal   the fabric as woven
    1 local     the same pixels with one tiny defect of a few pixels (2-6 % of the image side):
                a broken thread (a short missing thread segment), a knot (a small bright or
                dark lump) or a small stain (a soft tinted spot)
    2 global    the same fabric with subtly changed statistics everywhere: a softer, lower-contrast
                yarn (less contrast between threads and gaps, slightly blurred fibre detail) woven
                a little denser (thread spacing 5-10 % smaller)

so the background says nothing about the label and only the defect or the change decides it.

A base fabric is one of five families: plain weave, twill (2/1, 3/1, 2/2; left or right hand),
basket weave, 5-end satin (warp- or weft-faced), and oriented filtered noise (a brushed or felted
surface: white noise band-passed around one orientation, sometimes two). Threads are 4-11 px
apart at 224 px, the weave is rotated by any angle, warp and weft have their own colours, every
thread its own brightness and thickness, fibres run along each thread, and the threads meander
slowly. Rendering is supersampled 2x and box-filtered, then lit by a faint gradient and given a
little sensor noise.

Train and test come from disjoint base fabrics (:func:`texture_tensors`). Generation is seeded and
deterministic; the arrays are cached as ``.npz`` under ``~/.cache/tokenbudget``
(``TOKENBUDGET_CACHE`` overrides), keyed by every generation parameter and a version.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

TEXTURE_CLASSES = ("nominal", "local", "global")
FAMILIES = ("plain", "twill", "basket", "satin", "noise")
DEFECTS = ("broken", "knot", "stain")
_VERSION = 3  # bump when the generator changes, so stale caches are not reused
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class TextureSet:
    """uint8 RGB images [N, S, S, 3] with labels [N] (index into :data:`TEXTURE_CLASSES`), the family
    of each base fabric [N] (index into :data:`FAMILIES`) and its base id [N]."""

    images: np.ndarray
    labels: np.ndarray
    families: np.ndarray
    base_ids: np.ndarray


@dataclass(frozen=True)
class _Fabric:
    """Everything that defines one base fabric (lengths in output pixels)."""

    family: int
    period: float  # warp thread spacing
    aspect: float  # weft spacing / warp spacing
    angle: float  # orientation of the warp, radians
    warp_rgb: tuple[float, float, float]
    weft_rgb: tuple[float, float, float]
    contrast: float  # yarn contrast around the mean colour
    softness: float  # blur of the fibre detail (Gaussian sigma, output px)
    meander: float  # amplitude of the slow thread displacement, in thread spacings
    yarn: float  # per-thread brightness spread
    fibre: float  # strength of the fibre streaks along each thread
    weave: tuple[int, int, int]  # (repeat n, float k, direction) of twills and satins
    noise_spread: float  # angular spread of the noise family's band-pass, radians
    second_angle: float | None  # a second orientation of the noise family (crossed fibres)
    seed: int  # seeds the noise fields, shared by the three versions of the base


def _cache_dir() -> Path:
    root = os.environ.get("TOKENBUDGET_CACHE") or os.path.join(Path.home(), ".cache", "tokenbudget")
    return Path(root)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A fabric colour: a random hue, moderate saturation, mid brightness (RGB in [0, 1])."""
    hue = rng.uniform(0.0, 1.0)
    sat = rng.uniform(0.1, 0.7)
    val = rng.uniform(0.35, 0.85)
    # HSV -> RGB
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - sat * f), val * (1 - sat * (1 - f))
    return np.array([(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i])


def _random_fabric(rng: np.random.Generator) -> _Fabric:
    """A fabric type: the weave, its yarns and their colours."""
    family = int(rng.integers(len(FAMILIES)))
    warp = _random_colour(rng)
    # Weft: often the warp's colour shifted a little, sometimes a contrasting yarn.
    weft = warp * rng.uniform(0.75, 1.15, size=3) if rng.random() < 0.6 else _random_colour(rng)
    n = int(rng.choice([3, 4])) if family == 1 else 5
    k = int(rng.integers(1, n // 2 + 1)) if family == 1 else 1
    return _Fabric(
        family=family,
        period=float(rng.uniform(3.5, 8.0)),
        aspect=float(rng.uniform(0.8, 1.25)),
        angle=float(rng.uniform(0.0, np.pi)),
        warp_rgb=tuple(np.clip(warp, 0.05, 0.95).tolist()),
        weft_rgb=tuple(np.clip(weft, 0.05, 0.95).tolist()),
        contrast=float(rng.uniform(0.8, 1.1)),
        softness=float(rng.uniform(0.0, 0.3)),
        meander=float(rng.uniform(0.05, 0.15)),
        yarn=float(rng.uniform(0.04, 0.12)),
        fibre=float(rng.uniform(0.05, 0.15)),
        weave=(n, k, int(rng.choice([-1, 1]))),
        noise_spread=float(rng.uniform(0.15, 0.35)),
        second_angle=float(rng.uniform(0.0, np.pi)) if rng.random() < 0.4 else None,
        seed=int(rng.integers(2**31)),
    )


def _sample_of(fabric: _Fabric, rng: np.random.Generator) -> _Fabric:
    """Another piece of the same fabric type: its own noise, placement and small variations of
    thread spacing, orientation, yarn contrast and colour (as between rolls of one product)."""
    return replace(
        fabric,
        period=fabric.period * rng.uniform(0.97, 1.03),
        angle=fabric.angle + rng.normal(0.0, 0.03),
        contrast=fabric.contrast * rng.uniform(0.96, 1.04),
        warp_rgb=tuple(np.clip(np.array(fabric.warp_rgb) * rng.uniform(0.96, 1.04, size=3), 0, 1).tolist()),
        weft_rgb=tuple(np.clip(np.array(fabric.weft_rgb) * rng.uniform(0.96, 1.04, size=3), 0, 1).tolist()),
        seed=int(rng.integers(2**31)),
    )


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A zero-mean, unit-std Gaussian random field [size, size], smooth over ``scale`` px."""
    freq = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    kernel = np.exp(-0.5 * (fx**2 + fy**2) * (2 * np.pi * scale) ** 2)
    field = np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * kernel).real
    return (field - field.mean()) / (field.std() + 1e-8)


def _streaks(rng: np.random.Generator, length: int, width: int = 256) -> np.ndarray:
    """[width, width] noise smoothed along axis 1 over ``length`` cells: fibres along that axis."""
    noise = rng.normal(size=(width, width + length))
    kernel = np.ones(length) / np.sqrt(length)
    smooth = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="valid"), 1, noise)
    return smooth[:, :width]


def _weave_top(family: int, weave: tuple[int, int, int], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """True where the warp (thread ``i``) lies over the weft (thread ``j``)."""
    n, k, direction = weave
    if family == 0:  # plain
        return (i + j) % 2 == 0
    if family == 1:  # twill: a diagonal rib of floats k over, n - k under
        return (i - direction * j) % n < k
    if family == 2:  # basket: plain weave of pairs
        return (i // 2 + j // 2) % 2 == 0
    # satin, 5 ends, move 2: long floats, the interlacings scattered; warp- or weft-faced
    tie = (2 * i - j) % 5 == 0
    return tie if direction > 0 else ~tie


def _render_weave(fabric: _Fabric, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB [size, size, 3] of a woven fabric, ``size`` already supersampled."""
    ss = size / 224 * 1.0  # lengths were drawn for 224 px output: scale with the image
    period = fabric.period * ss * _SUPERSAMPLE
    weft_period = period * fabric.aspect
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cos, sin = np.cos(fabric.angle), np.sin(fabric.angle)
    u = cos * xx + sin * yy + rng.uniform(0, 100 * period)
    v = -sin * xx + cos * yy + rng.uniform(0, 100 * period)
    # Threads meander: a slow displacement field, a fraction of a thread spacing in amplitude.
    u = u + fabric.meander * period * _smooth_field(rng, size, 6 * period)
    v = v + fabric.meander * weft_period * _smooth_field(rng, size, 6 * period)
    i, fu = np.divmod(u / period, 1.0)
    j, fv = np.divmod(v / weft_period, 1.0)
    i, j = i.astype(np.int64), j.astype(np.int64)
    # Per-thread brightness and thickness; the thickness sets how far the gap between threads eats in.
    warp_gain = 1.0 + fabric.yarn * rng.normal(size=4096)
    weft_gain = 1.0 + fabric.yarn * rng.normal(size=4096)
    warp_thick = np.clip(0.8 + 0.15 * rng.normal(size=4096), 0.55, 1.0)
    weft_thick = np.clip(0.8 + 0.15 * rng.normal(size=4096), 0.55, 1.0)
    wi, wj = i % 4096, j % 4096
    # Cross-section of a round yarn: bright in the middle, dark at the edges and in the gaps.
    across_warp = np.clip(1.0 - ((2 * fu - 1) / warp_thick[wi]) ** 2, 0.0, 1.0) ** 0.5
    across_weft = np.clip(1.0 - ((2 * fv - 1) / weft_thick[wj]) ** 2, 0.0, 1.0) ** 0.5
    # Fibres: streaks along each thread (warp threads run along v, weft threads along u).
    streak = _streaks(rng, max(3, int(2 * period)))
    cell = max(1.0, period / 6)
    fib_warp = streak[(u / cell).astype(np.int64) % 256, (v / cell).astype(np.int64) % 256]
    fib_weft = streak[(v / cell).astype(np.int64) % 256, (u / cell).astype(np.int64) % 256]
    # A thread dips where it passes under the crossing one: darker towards the float's ends.
    warp_shade = (0.3 + 0.7 * across_warp) * (0.85 + 0.15 * np.sin(np.pi * fv)) * warp_gain[wi]
    weft_shade = (0.3 + 0.7 * across_weft) * (0.85 + 0.15 * np.sin(np.pi * fu)) * weft_gain[wj]
    warp_shade = warp_shade * (1.0 + fabric.fibre * fib_warp)
    weft_shade = weft_shade * (1.0 + fabric.fibre * fib_weft)
    top = _weave_top(fabric.family, fabric.weave, i, j)
    shade = np.where(top, warp_shade, weft_shade)[..., None]
    colour = np.where(top[..., None], np.array(fabric.warp_rgb), np.array(fabric.weft_rgb))
    return shade * colour


def _render_noise(fabric: _Fabric, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB [size, size, 3] of oriented filtered noise (brushed or felted cloth), supersampled."""
    freq = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    radius = np.hypot(fx, fy) + 1e-9
    phi = np.arctan2(fy, fx)
    centre = 1.0 / (fabric.period * size / 224 * _SUPERSAMPLE)  # cycles per pixel
    band = np.exp(-0.5 * (np.log(radius / centre) / 0.45) ** 2)
    angles = [fabric.angle] + ([fabric.second_angle] if fabric.second_angle is not None else [])
    spread = np.zeros_like(radius)
    for angle in angles:
        # Energy concentrated around one orientation of the spectrum (and its mirror).
        delta = np.angle(np.exp(1j * 2 * (phi - angle))) / 2
        spread = spread + np.exp(-0.5 * (delta / fabric.noise_spread) ** 2)
    field = np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * band * spread).real
    field = (field - field.mean()) / (field.std() + 1e-8)
    mix = 1.0 / (1.0 + np.exp(-1.5 * field))  # [0, 1]: which yarn colour shows
    shade = 0.75 + 0.25 * np.tanh(field)
    colour = (1 - mix[..., None]) * np.array(fabric.warp_rgb) + mix[..., None] * np.array(fabric.weft_rgb)
    return shade[..., None] * colour


def _render(fabric: _Fabric, size: int) -> np.ndarray:
    """The fabric as RGB float [size, size, 3] in [0, 1], lit and with sensor noise."""
    rng = np.random.default_rng(fabric.seed)
    big = size * _SUPERSAMPLE
    render = _render_noise if FAMILIES[fabric.family] == "noise" else _render_weave
    rgb = render(fabric, big, rng)
    rgb = rgb.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    mean = rgb.mean(axis=(0, 1), keepdims=True)
    rgb = mean + fabric.contrast * (rgb - mean)
    if fabric.softness > 0:
        rgb = _blur(rgb, fabric.softness * size / 224)
    # Faint lighting gradient and sensor noise, the same for the three versions of a base.
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    gy, gx = rng.uniform(-0.08, 0.08, size=2)
    rgb = rgb * (1.0 + gy * yy + gx * xx)[..., None]
    rgb = rgb + rng.normal(0.0, 0.008, size=rgb.shape)
    return np.clip(rgb, 0.0, 1.0)


def _blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``rgb`` [S, S, 3] (reflected borders, so no seam appears at the edges)."""
    pad = int(np.ceil(4 * sigma)) + 1
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    size = padded.shape[0]
    freq = np.fft.fftfreq(size)
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    kernel = np.exp(-0.5 * (fx**2 + fy**2) * (2 * np.pi * sigma) ** 2)[..., None]
    blurred = np.fft.ifft2(np.fft.fft2(padded, axes=(0, 1)) * kernel, axes=(0, 1)).real
    return blurred[pad:-pad, pad:-pad]


def _globally_changed(fabric: _Fabric, rng: np.random.Generator, strength: float) -> _Fabric:
    """The same fabric with subtly different statistics everywhere (``strength`` 1 = the default
    change): a softer, lower-contrast yarn woven a little denser."""
    return replace(
        fabric,
        contrast=fabric.contrast * (1.0 - strength * rng.uniform(0.1, 0.2)),
        softness=fabric.softness + strength * rng.uniform(0.3, 0.6),
        period=fabric.period * (1.0 - strength * rng.uniform(0.05, 0.1)),
    )


def _paint_defect(rgb: np.ndarray, fabric: _Fabric, rng: np.random.Generator, scale: float) -> int:
    """Paint one tiny defect into ``rgb`` [S, S, 3] in place; returns its index in :data:`DEFECTS`."""
    size = rgb.shape[0]
    kind = int(rng.integers(len(DEFECTS)))
    s = size / 224 * scale
    margin = int(12 * s) + 2
    cy, cx = rng.uniform(margin, size - margin, size=2)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    mean = rgb.reshape(-1, 3).mean(0)
    if DEFECTS[kind] == "broken":
        # A short stretch of one thread missing: a dark gap along the thread direction.
        angle = fabric.angle + (np.pi / 2 if rng.random() < 0.5 else 0.0)
        length, half_width = rng.uniform(7, 13) * s, max(0.8, 0.35 * fabric.period * s)
        along = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        across = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        weight = np.clip(1.2 - np.abs(across) / half_width, 0, 1) * np.clip(
            (length / 2 - np.abs(along)) / 1.5, 0, 1
        )
        target = mean * rng.uniform(0.25, 0.45)
    elif DEFECTS[kind] == "knot":
        # A lump of yarn: a small bright or dark blob with a soft edge.
        radius = rng.uniform(2.0, 3.5) * s
        weight = np.clip((radius - np.hypot(yy - cy, xx - cx)) / 1.0 + 0.5, 0, 1)
        target = np.clip(
            mean * (rng.uniform(1.45, 1.7) if rng.random() < 0.5 else rng.uniform(0.3, 0.5)), 0, 1
        )
    else:
        # A stain: a soft spot of shifted colour.
        radius = rng.uniform(3.0, 5.0) * s
        weight = np.exp(-0.5 * (np.hypot(yy - cy, xx - cx) / radius) ** 4)
        tint = rng.uniform(0.45, 0.75, size=3)
        tint[int(rng.integers(3))] = rng.uniform(0.9, 1.1)
        target = rgb * tint  # keeps the weave visible through the stain
    weight = weight[..., None]
    rgb *= 1 - weight
    rgb += weight * target
    return kind


def generate_texture_set(
    num_base: int,
    size: int = 224,
    seed: int = 0,
    *,
    num_types: int = 8,
    defect_scale: float = 1.0,
    global_strength: float = 1.0,
) -> TextureSet:
    """``num_base`` base fabrics, each in all three classes: ``3 * num_base`` images [S, S, 3] uint8.

    The bases are pieces of ``num_types`` fabric types (products) drawn from ``seed``, base ``i``
    of type ``i % num_types``, each with its own noise, placement and small variations.
    ``defect_scale`` scales the local defects (1: 2-6 % of the side at any size); ``global_strength``
    scales the global change (1: the default; 0 would make ``global`` a copy of ``nominal``).
    """
    if num_base < 1:
        raise ValueError(f"num_base must be >= 1, got {num_base}")
    if size < 64:
        raise ValueError(f"size must be >= 64 px for threads and defects of a few pixels, got {size}")
    if not defect_scale > 0 or not global_strength > 0:
        raise ValueError(
            f"defect_scale and global_strength must be > 0 (1 = default), got {defect_scale}, {global_strength}"
        )
    if isinstance(num_types, bool) or not isinstance(num_types, int) or num_types < 1:
        raise ValueError(f"num_types must be an int >= 1, got {num_types!r}")
    rng = np.random.default_rng(seed)
    types = [_random_fabric(rng) for _ in range(num_types)]
    images, labels, families, base_ids = [], [], [], []
    for base_id in range(num_base):
        fabric = _sample_of(types[base_id % num_types], rng)
        nominal = _render(fabric, size)
        local = nominal.copy()
        _paint_defect(local, fabric, rng, defect_scale)
        changed = _render(_globally_changed(fabric, rng, global_strength), size)
        for label, rgb in enumerate((nominal, local, changed)):
            images.append((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
            labels.append(label)
            families.append(fabric.family)
            base_ids.append(base_id)
    return TextureSet(np.stack(images), np.array(labels), np.array(families), np.array(base_ids))


def texture_set(
    num_base: int,
    size: int = 224,
    seed: int = 0,
    *,
    num_types: int = 8,
    defect_scale: float = 1.0,
    global_strength: float = 1.0,
    cache: bool = True,
) -> TextureSet:
    """:func:`generate_texture_set`, cached on disk (``.npz`` keyed by the version and every parameter)."""
    key = f"v{_VERSION}-{num_base}-{size}-{seed}-{num_types}-{defect_scale}-{global_strength}"
    path = _cache_dir() / f"textures-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache and path.exists():
        with np.load(path) as f:
            return TextureSet(f["images"], f["labels"], f["families"], f["base_ids"])
    data = generate_texture_set(
        num_base, size, seed, num_types=num_types, defect_scale=defect_scale, global_strength=global_strength
    )
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(
            tmp, images=data.images, labels=data.labels, families=data.families, base_ids=data.base_ids
        )
        os.replace(tmp, path)
    return data


def texture_tensors(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    n_train: int = 300,
    n_test: int = 150,
    seed: int = 0,
    num_types: int = 8,
    defect_scale: float = 1.0,
    global_strength: float = 1.0,
):  # noqa: ANN201 - (train_x, train_y, test_x, test_y) tensors
    """Model-ready ``(train_x [n_train, 3, S, S], train_y [n_train], test_x, test_y)`` from disjoint
    base fabrics (``n_train // 3`` and ``n_test // 3`` of them, each in all three classes),
    normalized with the model's ``mean`` and ``std``."""
    import torch

    from .images import rgb_uint8_to_model_input

    if n_train < 3 or n_test < 3:
        raise ValueError("the texture set needs at least 3 train and 3 test images (one per class)")
    n_train_base, n_test_base = n_train // 3, n_test // 3
    data = texture_set(
        n_train_base + n_test_base,
        size,
        seed,
        num_types=num_types,
        defect_scale=defect_scale,
        global_strength=global_strength,
    )
    x = rgb_uint8_to_model_input(data.images, mean, std)
    y = torch.from_numpy(data.labels)
    train = torch.from_numpy(data.base_ids) < n_train_base
    return x[train], y[train], x[~train], y[~train]


def save_image_folder(data: TextureSet, root: str | os.PathLike, test_fraction: float = 1 / 3) -> None:
    """Write ``root/train/CLASS/NNNNN.png`` and ``root/test/CLASS/NNNNN.png`` (usable as
    ``tokenbudget eval --data root``), split by base fabric: the last ``test_fraction`` of the bases
    are test, so no fabric is in both."""
    from PIL import Image

    root = Path(root)
    num_base = int(data.base_ids.max()) + 1
    first_test = num_base - max(1, round(num_base * test_fraction))
    for index, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        split = "test" if data.base_ids[index] >= first_test else "train"
        folder = root / split / TEXTURE_CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")


def save_preview(data: TextureSet, path: str | os.PathLike, rows: int = 4) -> None:
    """A PNG grid: one row per base fabric, its three versions (nominal, local, global) side by side."""
    from PIL import Image

    rows = min(rows, int(data.base_ids.max()) + 1)
    grid = [np.concatenate(list(data.images[data.base_ids == b]), axis=1) for b in range(rows)]
    Image.fromarray(np.concatenate(grid, axis=0)).save(path)
