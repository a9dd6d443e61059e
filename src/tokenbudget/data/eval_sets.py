"""Labelled image sets for the quality harness: train and test images, preprocessed for a model.

``load_eval_data(source, size, mean, std)`` reads Fashion-MNIST (the offline Debian copy), crops of
scikit-image's photos, the generated anomaly set, Fashion-MNIST IDX files or an image folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class EvalData:
    """Images [N, 3, H, W] (normalized for the model) and labels [N] for train and test."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_eval_data(
    source: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    default_sizes: tuple[int, int] = (1000, 500),
) -> EvalData:
    """``"fashion-mnist"`` (offline Debian copy, a balanced seeded subset), ``"skimage"``
    (:func:`skimage_crops`), ``"mix"`` (:func:`mix_data`: the heterogeneous dev mix), ``"anomaly"`` / ``"anomaly-small"`` (:func:`anomaly_data`, flaws at full
    and half size), or a directory: Fashion-MNIST IDX files, or an image folder with one subfolder per
    class.

    ``n_train`` / ``n_test``: ``None`` takes the set's default (Fashion-MNIST and anomaly:
    ``default_sizes``; the mix: as many of each of its sources; skimage crops and image folders: every image). A
    number takes that many: Fashion-MNIST and the anomaly and texture sets draw class-balanced subsets (rounded
    down to a multiple of their 10 / 4 / 3 classes), skimage
    crops and image folders a seeded random subset, and a ``ValueError`` says what the set holds when
    it holds fewer. ``0`` loads no images of that split (for callers that only train or only test).
    """
    from pathlib import Path

    from .fashion_mnist import fashion_mnist_subset, to_model_input
    from .folder import load_image_folder, load_images

    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"{name} must be a non-negative number of images or None, got {n!r}")
    counts = tuple(d if n is None else n for n, d in zip((n_train, n_test), default_sizes, strict=True))

    def fashion(root: str | None) -> EvalData:
        if any(0 < n < 10 for n in counts):
            raise ValueError(
                "Fashion-MNIST subsets need at least 10 train and 10 test images (one per class), or 0"
            )
        splits = []
        for split, n in zip(("train", "test"), counts, strict=True):
            x, y = fashion_mnist_subset(split, n // 10, seed, root) if n else _no_images()
            splits += [to_model_input(x, size, mean, std) if n else _empty_input(size), y]
        return EvalData("fashion-mnist", *splits)

    if source == "fashion-mnist":
        return fashion(None)
    if source == "skimage":
        return _subset(skimage_crops(size, mean, std, seed=seed), n_train, n_test, seed)
    if source == "mix":
        return mix_data(size, mean, std, n_train=counts[0], n_test=counts[1], seed=seed)
    if source in ("anomaly", "anomaly-small"):
        return anomaly_data(
            size,
            mean,
            std,
            n_train=counts[0],
            n_test=counts[1],
            seed=seed,
            scale=1.0 if source == "anomaly" else 0.5,
        )
    if source == "textures":
        from .textures import texture_tensors

        if any(n < 3 for n in counts):
            raise ValueError(
                f"the texture set needs at least 3 train and 3 test images (one per class), got {counts}"
            )
        tr_x, tr_y, te_x, te_y = texture_tensors(
            size, mean, std, n_train=counts[0], n_test=counts[1], seed=seed
        )
        return EvalData("textures", tr_x, tr_y, te_x, te_y)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"no dataset at {source!r}; give 'fashion-mnist' or a directory (image folder or IDX files)"
        )
    if any(path.glob("*-idx?-ubyte*")):
        return fashion(str(path))
    folder = load_image_folder(path, test_fraction=test_fraction, seed=seed)
    name = path.name or str(path)
    if len(folder.classes) < 2:
        raise ValueError(
            f"{source} holds one class ({folder.classes[0]}): accuracy needs at least two classes; "
            "give a folder with one subfolder per class (CLASS/*.jpg or train|test/CLASS/*.jpg)"
        )
    # Choose the subset from the file list, so that only the chosen images are read.
    train = _choose(len(folder.train), n_train, seed, name, "train", len(folder.test))
    test = _choose(len(folder.test), n_test, seed, name, "test", len(folder.train))
    tr_x, tr_y = load_images([folder.train[i] for i in train], size, mean, std)
    te_x, te_y = load_images([folder.test[i] for i in test], size, mean, std)
    return EvalData(name, tr_x, tr_y, te_x, te_y)


def _no_images() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, 28, 28, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)


def _empty_input(size: int) -> torch.Tensor:
    return torch.empty(0, 3, size, size)


def _choose(held: int, wanted: int | None, seed: int, name: str, split: str, other: int) -> list[int]:
    """Sorted indices of a seeded subset of ``wanted`` of ``held`` items (all of them for ``None``);
    ``ValueError`` saying what the set holds when ``wanted`` is more. ``other``: the other split's size,
    for the message."""
    if wanted is None:
        return list(range(held))
    if wanted > held:
        sizes = {"train": held, "test": other} if split == "train" else {"train": other, "test": held}
        raise ValueError(
            f"{name} holds {sizes['train']} train and {sizes['test']} test images; asked for {wanted} "
            f"{split} images (ask for at most {held}, or leave the number out to take them all)"
        )
    # A private generator per split: the subset does not depend on (or disturb) the global RNG.
    offset = 0 if split == "train" else 1
    order = torch.randperm(held, generator=torch.Generator().manual_seed(2 * seed + offset))
    return sorted(order[:wanted].tolist())


def _subset(data: EvalData, n_train: int | None, n_test: int | None, seed: int) -> EvalData:
    """``data`` with seeded subsets of ``n_train`` train and ``n_test`` test images (``None``: all)."""
    held_train, held_test = len(data.train_labels), len(data.test_labels)
    train = _choose(held_train, n_train, seed, data.name, "train", held_test)
    test = _choose(held_test, n_test, seed, data.name, "test", held_train)
    return EvalData(
        data.name,
        data.train_images[train],
        data.train_labels[train],
        data.test_images[test],
        data.test_labels[test],
    )


def skimage_crops(
    size: int, mean: Sequence[float], std: Sequence[float], *, crops_per_image: int = 8, seed: int = 0
) -> EvalData:
    """Label-free data from scikit-image's bundled photos: random crops (30-80 % of the shorter side),
    labelled by the photo they come from, alternately train and test. k-NN then measures whether
    reduced features still retrieve crops of the same photo; cosine measures fidelity."""
    import numpy as np
    from PIL import Image

    from .images import SAMPLE_IMAGES, load_image, preprocess

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(SAMPLE_IMAGES):
        photo = load_image(f"skimage:{name}")
        w, h = photo.size
        for _ in range(crops_per_image):
            side = int(min(w, h) * rng.uniform(0.3, 0.8))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
            images.append(preprocess(crop, size, mean, std))
            labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    train = torch.arange(len(y)) % 2 == 0
    return EvalData("skimage-crops", x[train], y[train], x[~train], y[~train])


def mix_data(
    size: int, mean: Sequence[float], std: Sequence[float], *, n_train: int, n_test: int, seed: int = 0
) -> EvalData:
    """The heterogeneous dev mix (:mod:`tokenbudget.data.mix`: Fashion-MNIST items, textures, photo
    crops, multi-object scenes and inspection surfaces, 39 disjoint classes), ``n // 5`` images of
    each source per split (at least 10), train and test from disjoint base images, at least 64 px.
    Generated once and cached."""
    from .images import rgb_uint8_to_model_input
    from .mix import SOURCES, dev_mix

    parts = len(SOURCES)
    least = 10 * parts  # each source spreads its images over up to 10 classes
    if any(0 < n < least for n in (n_train, n_test)):
        raise ValueError(
            f"the mix needs at least {least} train and {least} test images (10 of each of its {parts} "
            f"sources), or 0; got {n_train} and {n_test}"
        )
    splits = []
    for split, n in (("train", n_train), ("test", n_test)):
        if n == 0:
            splits += [_empty_input(size), torch.empty(0, dtype=torch.int64)]
            continue
        data = dev_mix(split, n // parts, size=size, seed=seed)
        splits += [rgb_uint8_to_model_input(data.images, mean, std), torch.from_numpy(data.labels).long()]
    return EvalData("mix", *splits)


def anomaly_data(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    n_train: int = 400,
    n_test: int = 200,
    seed: int = 0,
    scale: float = 1.0,
) -> EvalData:
    """The detail-decided anomaly set (:mod:`tokenbudget.data.anomaly`): textures labelled clean /
    spot / scratch / flaw, every base crop in all four classes, train and test from disjoint base
    crops (``n_train // 4`` and ``n_test // 4`` of them). Generated once per setting and cached."""
    from .anomaly import anomaly_set
    from .images import rgb_uint8_to_model_input

    if any(0 < n < 4 for n in (n_train, n_test)) or n_train + n_test == 0:
        raise ValueError(
            "the anomaly set needs at least 4 train and 4 test images (one per class), or 0 of one split"
        )
    n_train_base, n_test_base = n_train // 4, n_test // 4
    data = anomaly_set(n_train_base + n_test_base, size, seed, scale)
    x = rgb_uint8_to_model_input(data.images, mean, std)  # [N, 3, S, S]
    y = torch.from_numpy(data.labels)
    train = torch.from_numpy(data.base_ids) < n_train_base
    name = "anomaly" if scale == 1.0 else f"anomaly-x{scale:g}"
    return EvalData(name, x[train], y[train], x[~train], y[~train])
