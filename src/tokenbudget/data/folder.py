"""A labelled image folder (one subfolder per class), split into train and test, for the quality harness.

Two layouts are accepted::

    ROOT/CLASS/*.jpg                     split per class by a seeded fraction (stratified)
    ROOT/train/CLASS/*.jpg, ROOT/test/CLASS/*.jpg   the split as given
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .images import IMAGENET_MEAN, IMAGENET_STD, preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class ImageFolderData:
    """Class names (sorted; a label is an index into them) and the (path, label) items of each split."""

    classes: list[str]
    train: list[tuple[Path, int]] = field(default_factory=list)
    test: list[tuple[Path, int]] = field(default_factory=list)


def _hint(root: Path) -> str:
    return (
        f"expected {root}/CLASS/*.jpg (one subfolder per class; extensions {' '.join(IMAGE_EXTENSIONS)}), "
        f"or {root}/train/CLASS/*.jpg with {root}/test/CLASS/*.jpg"
    )


def _class_dirs(directory: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints, ...) are never classes.
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursively, like torchvision's ImageFolder), sorted for determinism."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _scan(directory: Path, root: Path) -> dict[str, list[Path]]:
    """{class name: image paths} for the class subfolders of ``directory``; errors name what is missing."""
    classes = {d.name: _images(d) for d in _class_dirs(directory)}
    if not classes or not any(classes.values()):
        raise ValueError(f"no images found under {directory}; {_hint(root)}")
    empty = [name for name, paths in classes.items() if not paths]
    if empty:
        raise ValueError(
            f"class folder(s) with no images under {directory}: {', '.join(empty)}; "
            f"add images ({' '.join(IMAGE_EXTENSIONS)}) or remove the folder(s)"
        )
    return classes


def load_image_folder(
    root: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0
) -> ImageFolderData:
    """Index a labelled image folder and split it into train and test items.

    With ``ROOT/train`` and ``ROOT/test`` the split is taken as given (classes come from train). Otherwise
    each class is split on its own (stratified): ``round(n * test_fraction)`` of its images, chosen by
    ``seed``, go to test, keeping at least one train and one test image for any class with >= 2 images.
    Items are ``(path, label)`` with ``label`` an index into ``classes``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}; {_hint(root)}")

    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        # Half a split layout is almost surely a mistake, not a class called "train" or "test".
        have, missing = (train_dir, test_dir) if train_dir.is_dir() else (test_dir, train_dir)
        raise ValueError(f"found {have} but no {missing}; give both for a fixed split, or neither")
    if train_dir.is_dir():
        train_classes, test_classes = _scan(train_dir, root), _scan(test_dir, root)
        unknown = sorted(set(test_classes) - set(train_classes))
        if unknown:
            raise ValueError(
                f"classes in {test_dir} not in {train_dir}: {', '.join(unknown)}; "
                "every test class needs training images"
            )
        classes = sorted(train_classes)
        return ImageFolderData(
            classes=classes,
            train=[(p, label) for label, c in enumerate(classes) for p in train_classes[c]],
            test=[(p, label) for label, c in enumerate(classes) for p in test_classes.get(c, [])],
        )

    by_class = _scan(root, root)
    classes = sorted(by_class)
    data = ImageFolderData(classes=classes)
    for label, name in enumerate(classes):
        paths = by_class[name]
        n = len(paths)
        n_test = min(max(round(n * test_fraction), 1), n - 1) if n >= 2 else 0
        # One generator per class, seeded by (seed, class name): a class's split does not change when
        # other classes are added or removed. String seeds are hashed stably (not PYTHONHASHSEED).
        shuffled = list(paths)
        random.Random(f"{seed}:{name}").shuffle(shuffled)
        test = set(shuffled[:n_test])
        data.train.extend((p, label) for p in paths if p not in test)
        data.test.extend((p, label) for p in paths if p in test)
    return data


def load_images(
    items: Sequence[tuple[Path, int]],
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``(path, label)`` items -> (float tensor [N, 3, size, size] normalized, int64 labels [N]).

    Each image is converted to RGB, its shorter side resized to ``size`` and the centre square cropped.
    """
    from PIL import Image, UnidentifiedImageError

    tensors = []
    for path, _ in items:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except FileNotFoundError:
            raise
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
        tensors.append(preprocess(rgb, size, mean, std))
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    if not tensors:
        return torch.empty(0, 3, size, size), labels
    return torch.stack(tensors), labels
