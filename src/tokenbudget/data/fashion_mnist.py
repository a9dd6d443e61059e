"""Fashion-MNIST from local IDX files (offline), for the quality harness.

The Debian package ``dataset-fashion-mnist`` installs the full dataset (60k train + 10k test) as gzipped
IDX files under ``/usr/share/datasets/fashion-mnist/``; any directory holding the four standard IDX files
(gzipped or not) works too. torchvision is only used for the optional ``download=True`` path.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .images import IMAGENET_MEAN, IMAGENET_STD, normalize

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "TOKENBUDGET_FASHION_MNIST"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Standard IDX file stems per split; each may also carry a ".gz" suffix.
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes -> big-endian numpy dtypes (the format is always big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip (sniffed from the content, not the name)."""
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        # A truncated or damaged download shows up here; report it like any other corrupt IDX file.
        raise ValueError(f"corrupt IDX file {path}: cannot gunzip ({error})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or plain) into a numpy array with the file's shape and type.

    Raises ``ValueError`` naming the file when the magic number, type code, dimensions or data size are
    wrong (truncated or padded data included), and ``FileNotFoundError`` when the file is missing.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"corrupt IDX file {path}: expected a 4-byte header, found {len(data)} bytes")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0:
        raise ValueError(
            f"corrupt IDX file {path}: bad magic number 0x{data[:4].hex()} (must start with two zero bytes)"
        )
    if code not in _IDX_DTYPES:
        raise ValueError(f"corrupt IDX file {path}: unknown data type code 0x{code:02x}")
    if ndim == 0:
        raise ValueError(f"corrupt IDX file {path}: zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"corrupt IDX file {path}: expected {header} header bytes for {ndim} dimensions, found {len(data)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header
    if found != expected:
        raise ValueError(
            f"corrupt IDX file {path}: expected {expected} bytes of data for shape {shape}, found {found}"
        )
    # Native byte order so torch.from_numpy accepts it; copy so the array owns writable memory.
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _default_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _locate(root: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files for ``split`` in ``root``, or in torchvision's ``FashionMNIST/raw``."""
    images_stem, labels_stem = _FILES[split]
    for directory in (root, root / "FashionMNIST" / "raw"):
        images, labels = _find(directory, images_stem), _find(directory, labels_stem)
        if images is not None and labels is not None:
            return images, labels
    return None


def load_fashion_mnist(
    root: str | os.PathLike | None = None, split: str = "train", download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000) from local IDX files.

    ``root`` defaults to ``$TOKENBUDGET_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``. Returns
    ``(images, labels)``: uint8 tensor [N, 28, 28] and int64 tensor [N] with values in 0..9 (indices into
    ``FASHION_MNIST_CLASSES``). With ``download=True`` missing files are fetched by torchvision into ``root``.
    """
    if split not in _FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    root = Path(root) if root is not None else _default_root()
    found = _locate(root, split)
    if found is None and download:
        from torchvision.datasets import FashionMNIST

        # torchvision writes ROOT/FashionMNIST/raw/*-ubyte[.gz], which _locate also searches.
        FashionMNIST(str(root), train=split == "train", download=True)
        found = _locate(root, split)
    if found is None:
        images_stem, labels_stem = _FILES[split]
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found in {root} (looked for {images_stem}[.gz] and "
            f"{labels_stem}[.gz] there and in {root / 'FashionMNIST' / 'raw'}); fix: "
            "`apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist), "
            f"or pass --data DIR (or set ${ENV_VAR}) to a directory holding the IDX files, "
            "or use download=True with a network"
        )
    images_path, labels_path = found
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(
            f"unexpected Fashion-MNIST images in {images_path}: shape {images.shape} {images.dtype}, "
            "expected [N, 28, 28] uint8"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"unexpected Fashion-MNIST labels in {labels_path}: shape {labels.shape} {labels.dtype}, "
            "expected [N] uint8"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST count mismatch: {len(images)} images in {images_path} "
            f"but {len(labels)} labels in {labels_path}"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST labels in {labels_path} go up to {int(labels.max())}, expected 0..9")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_subset(
    split: str = "test",
    n_per_class: int = 100,
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic class-balanced subset: ``n_per_class`` images of each class, chosen by ``seed``.

    Returns ``(images, labels)``: uint8 [10 * n_per_class, 28, 28] and int64 [10 * n_per_class], in the
    split's original order (so the same seed gives the same tensors on any machine).
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    images, labels = load_fashion_mnist(root, split)
    # A private generator: the subset must not depend on (or disturb) the global torch RNG state.
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(len(FASHION_MNIST_CLASSES)):
        indices = torch.nonzero(labels == label).flatten()
        if len(indices) < n_per_class:
            raise ValueError(
                f"Fashion-MNIST {split} has only {len(indices)} images of class {label} "
                f"({FASHION_MNIST_CLASSES[label]}), fewer than n_per_class={n_per_class}"
            )
        chosen.append(indices[torch.randperm(len(indices), generator=generator)[:n_per_class]])
    order = torch.sort(torch.cat(chosen)).values
    return images[order], labels[order]


def to_model_input(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 grayscale images [N, 28, 28] -> normalized float tensor [N, 3, size, size].

    Bilinear resize (antialiased, so downscaling does not alias), scaled to [0, 1], the gray channel
    repeated to RGB, then ``(x - mean) / std`` per channel. Memory is N * 3 * size**2 * 4 bytes: batch it.
    """
    if images.ndim != 3:
        raise ValueError(f"expected images [N, H, W], got shape {tuple(images.shape)}")
    x = images.to(torch.float32).div_(255.0).unsqueeze(1)  # [N, 1, H, W]
    if x.shape[-2:] != (size, size):
        # Resize the single gray channel before repeating it: a third of the work.
        x = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)  # [N, 3, size, size]
    return normalize(x, mean, std)
