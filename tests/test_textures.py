"""The woven-texture development set: seeded, cached, balanced, split by base fabric; local vs global classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokenbudget.data.textures import (
    FAMILIES,
    TEXTURE_CLASSES,
    generate_texture_set,
    save_image_folder,
    save_preview,
    texture_set,
    texture_tensors,
)


def test_texture_set_is_seeded_cached_and_balanced(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path))
    data = texture_set(6, size=64, seed=3, num_types=2)
    assert data.images.shape == (18, 64, 64, 3) and data.images.dtype == np.uint8
    assert list(tmp_path.glob("textures-*.npz"))  # cached
    again = texture_set(6, size=64, seed=3, num_types=2)  # from the cache
    fresh = generate_texture_set(6, size=64, seed=3, num_types=2)  # regenerated
    assert np.array_equal(again.images, data.images) and np.array_equal(fresh.images, data.images)
    assert not np.array_equal(generate_texture_set(6, size=64, seed=4, num_types=2).images, data.images)
    # Every base fabric appears once in each class, with one family.
    for base in range(6):
        rows = data.base_ids == base
        assert sorted(data.labels[rows].tolist()) == list(range(len(TEXTURE_CLASSES)))
        assert len(set(data.families[rows].tolist())) == 1
    assert set(data.families.tolist()) <= set(range(len(FAMILIES)))
    # Bases alternate over the two fabric types: 0, 2, 4 share a type, so a family.
    assert len(set(data.families[np.isin(data.base_ids, [0, 2, 4])].tolist())) == 1


def test_local_defect_is_a_few_pixels_and_the_global_change_is_everywhere() -> None:
    data = generate_texture_set(12, size=224, seed=0)
    for base in range(12):
        nominal, local, changed = (
            data.images[(data.base_ids == base) & (data.labels == c)][0] for c in range(3)
        )
        touched = np.abs(local.astype(int) - nominal.astype(int)).max(axis=-1) > 8
        # A defect of a few pixels: visible, but within a couple of 14-px patches (2 % of the image).
        assert 0 < touched.sum() < 0.02 * 224 * 224
        ys, xs = np.nonzero(touched)
        assert np.ptp(ys) < 40 and np.ptp(xs) < 40
        change = np.abs(changed.astype(int) - nominal.astype(int)).max(axis=-1)
        per_patch = change.reshape(16, 14, 16, 14).mean(axis=(1, 3))  # mean change of each 14-px patch
        assert (per_patch > 2).mean() > 0.9  # the global change reaches (almost) every patch
        # ... and is subtle: the mean colour stays close.
        assert np.abs(changed.mean(axis=(0, 1)) - nominal.mean(axis=(0, 1))).max() < 25


def test_global_change_lowers_contrast() -> None:
    data = generate_texture_set(16, size=128, seed=1)
    nominal = data.images[data.labels == 0].astype(float)
    changed = data.images[data.labels == 2].astype(float)
    contrast = lambda x: x.std(axis=(1, 2)).mean(axis=-1)  # noqa: E731 - per-image pixel std
    assert (contrast(changed) < contrast(nominal)).mean() >= 0.75


def test_texture_tensors_split_by_base_fabric(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TOKENBUDGET_CACHE", str(tmp_path))
    tr_x, tr_y, te_x, te_y = texture_tensors(64, (0.5,) * 3, (0.25,) * 3, n_train=12, n_test=6, num_types=3)
    assert tr_x.shape == (12, 3, 64, 64) and te_x.shape == (6, 3, 64, 64)
    assert torch.equal(torch.bincount(tr_y), torch.tensor([4, 4, 4]))
    assert torch.equal(torch.bincount(te_y), torch.tensor([2, 2, 2]))
    # Normalized with the given mean/std, and test images are not train images.
    assert -2.01 <= float(tr_x.min()) and float(tr_x.max()) <= 2.01
    flat_train = tr_x.flatten(1)
    assert all((flat_train - row).abs().amax(1).min() > 0 for row in te_x.flatten(1))
    with pytest.raises(ValueError, match="at least 3 train and 3 test"):
        texture_tensors(64, (0.5,) * 3, (0.25,) * 3, n_train=2, n_test=6)


def test_folder_and_preview(tmp_path) -> None:
    data = generate_texture_set(3, size=64, seed=0)
    save_image_folder(data, tmp_path / "set")
    train = sorted(p.parent.name for p in (tmp_path / "set" / "train").rglob("*.png"))
    test = sorted(p.parent.name for p in (tmp_path / "set" / "test").rglob("*.png"))
    assert train == sorted(list(TEXTURE_CLASSES) * 2) and test == sorted(TEXTURE_CLASSES)
    save_preview(data, tmp_path / "preview.png", rows=2)
    assert Image.open(tmp_path / "preview.png").size == (3 * 64, 2 * 64)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_base": 0}, "num_base must be >= 1"),
        ({"size": 32}, "size must be >= 64"),
        ({"num_types": 0}, "num_types must be an int >= 1"),
        ({"defect_scale": 0.0}, "must be > 0"),
    ],
)
def test_bad_parameters_are_refused(kwargs, match) -> None:
    args = {"num_base": 2, "size": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_texture_set(**args)
