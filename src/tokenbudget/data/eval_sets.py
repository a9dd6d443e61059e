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
    n_train: int = 1000,
    n_test: int = 500,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> EvalData:
    """``"fashion-mnist"`` (offline Debian copy, a balanced seeded subset of ``n_train``/``n_test``
    images), ``"skimage"`` (:func:`skimage_crops`), ``"anomaly"`` / ``"anomaly-small"``
    (:func:`anomaly_data`, flaws at full and half size), or a directory: Fashion-MNIST IDX files, or
    an image folder with one subfolder per class."""
    from pathlib import Path

    from .fashion_mnist import fashion_mnist_subset, to_model_input
    from .folder import load_image_folder, load_images

    def fashion(root: str | None) -> EvalData:
        if n_train < 10 or n_test < 10:
            raise ValueError(
                "Fashion-MNIST subsets need at least 10 train and 10 test images (one per class)"
            )
        tr_x, tr_y = fashion_mnist_subset("train", n_train // 10, seed, root)
        te_x, te_y = fashion_mnist_subset("test", n_test // 10, seed, root)
        return EvalData(
            "fashion-mnist",
            to_model_input(tr_x, size, mean, std),
            tr_y,
            to_model_input(te_x, size, mean, std),
            te_y,
        )

    if source == "fashion-mnist":
        return fashion(None)
    if source == "skimage":
        return skimage_crops(size, mean, std, seed=seed)
    if source in ("anomaly", "anomaly-small"):
        return anomaly_data(
            size,
            mean,
            std,
            n_train=n_train,
            n_test=n_test,
            seed=seed,
            scale=1.0 if source == "anomaly" else 0.5,
        )
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"no dataset at {source!r}; give 'fashion-mnist' or a directory (image folder or IDX files)"
        )
    if any(path.glob("*-idx?-ubyte*")):
        return fashion(str(path))
    folder = load_image_folder(path, test_fraction=test_fraction, seed=seed)
    tr_x, tr_y = load_images(folder.train, size, mean, std)
    te_x, te_y = load_images(folder.test, size, mean, std)
    return EvalData(path.name or str(path), tr_x, tr_y, te_x, te_y)


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

    if n_train < 4 or n_test < 4:
        raise ValueError("the anomaly set needs at least 4 train and 4 test images (one per class)")
    n_train_base, n_test_base = n_train // 4, n_test // 4
    data = anomaly_set(n_train_base + n_test_base, size, seed, scale)
    x = rgb_uint8_to_model_input(data.images, mean, std)  # [N, 3, S, S]
    y = torch.from_numpy(data.labels)
    train = torch.from_numpy(data.base_ids) < n_train_base
    name = "anomaly" if scale == 1.0 else f"anomaly-x{scale:g}"
    return EvalData(name, x[train], y[train], x[~train], y[~train])
