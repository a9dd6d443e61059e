"""Offline dataset loaders: IDX parsing, Fashion-MNIST, and labelled image folders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenbudget.data.fashion_mnist import (
    DEFAULT_ROOT,
    FASHION_MNIST_CLASSES,
    fashion_mnist_subset,
    load_fashion_mnist,
    read_idx,
    to_model_input,
)
from tokenbudget.data.folder import ImageFolderData, load_image_folder, load_images

# ---------------------------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """Serialize ``array`` as IDX: two zero bytes, type code, ndim, big-endian dims, big-endian data."""
    codes = {
        np.dtype("uint8"): 0x08,
        np.dtype("int16"): 0x0B,
        np.dtype("int32"): 0x0C,
        np.dtype("float32"): 0x0D,
    }
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("name", ["plain-idx3-ubyte", "zipped-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32"])
def test_idx_round_trip(tmp_path: Path, name: str, dtype: str) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(dtype) - (5 if dtype != "uint8" else 0)
    out = read_idx(write_idx(tmp_path / name, array))
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)
    # Native byte order and writable, so torch.from_numpy takes it without a warning.
    assert out.dtype.isnative and out.flags.writeable
    torch.from_numpy(out)


def test_idx_gzip_sniffed_not_named(tmp_path: Path) -> None:
    # gzip content under a plain name (and vice versa) still reads: the content decides.
    array = np.arange(10, dtype=np.uint8)
    (tmp_path / "a").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "b.gz").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), array)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_bad_magic(tmp_path: Path, gz: bool) -> None:
    data = b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc"
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=r"corrupt IDX file .*bad.*bad magic number 0x01020801"):
        read_idx(path)


def test_idx_unknown_type_code(tmp_path: Path) -> None:
    path = tmp_path / "code"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"x")
    with pytest.raises(ValueError, match=r"corrupt IDX file .*code: unknown data type code 0x07"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_data(tmp_path: Path, gz: bool) -> None:
    data = idx_bytes(np.zeros((4, 5), dtype=np.int32))[:-7]
    path = tmp_path / ("short.gz" if gz else "short")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=r"corrupt IDX file .*short.*: expected 80 bytes of data .*found 73"):
        read_idx(path)


def test_idx_extra_data(tmp_path: Path) -> None:
    # A size mismatch the other way (dims say fewer bytes than present) is corrupt too.
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(6, dtype=np.uint8)) + b"\x00\x00")
    with pytest.raises(ValueError, match=r"corrupt IDX file .*long: expected 6 bytes of data .*found 8"):
        read_idx(path)


def test_idx_truncated_header(tmp_path: Path) -> None:
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=r"corrupt IDX file .*tiny: expected a 4-byte header, found 2"):
        read_idx(tmp_path / "tiny")
    (tmp_path / "dims").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 6)
    with pytest.raises(ValueError, match=r"corrupt IDX file .*dims: expected 16 header bytes"):
        read_idx(tmp_path / "dims")


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    # A download cut short: the gzip stream itself ends early.
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))[:-40])
    with pytest.raises(ValueError, match=r"corrupt IDX file .*cut\.gz: cannot gunzip"):
        read_idx(path)


# ---------------------------------------------------------------------------------------- Fashion-MNIST

N_PER_CLASS = {"train": 6, "test": 4}


def synthetic_split(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), n_per_class))
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    return images, labels


def write_fashion_dir(root: Path, gz: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four standard IDX files of a small synthetic Fashion-MNIST in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = synthetic_split(N_PER_CLASS[split], seed=len(prefix))
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        splits[split] = (images, labels)
    return splits


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_fashion_mnist_synthetic(tmp_path: Path, gz: bool, split: str) -> None:
    expected = write_fashion_dir(tmp_path, gz)[split]
    images, labels = load_fashion_mnist(tmp_path, split)
    assert images.dtype == torch.uint8 and images.shape == (10 * N_PER_CLASS[split], 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (10 * N_PER_CLASS[split],)
    np.testing.assert_array_equal(images.numpy(), expected[0])
    np.testing.assert_array_equal(labels.numpy(), expected[1])


def test_load_fashion_mnist_env_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_dir(tmp_path, gz=True)
    monkeypatch.setenv("TOKENBUDGET_FASHION_MNIST", str(tmp_path))
    assert load_fashion_mnist(split="test")[0].shape == (40, 28, 28)


def test_load_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    # Where torchvision's download=True leaves the files: ROOT/FashionMNIST/raw.
    write_fashion_dir(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert load_fashion_mnist(tmp_path, "train")[1].shape == (60,)


def test_load_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path / "nowhere", "test")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "t10k-images-idx3-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data DIR" in message and "download=True" in message


def test_load_fashion_mnist_half_missing(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path, "train")
    assert load_fashion_mnist(tmp_path, "test")[0].shape[0] == 40


def test_load_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(39, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"count mismatch: 40 images in .*t10k-images.* but 39 labels"):
        load_fashion_mnist(tmp_path, "test")


def test_load_fashion_mnist_bad_split_and_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist(tmp_path, "val")
    write_fashion_dir(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((40, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected \[N, 28, 28\] uint8"):
        load_fashion_mnist(tmp_path, "test")


def test_fashion_mnist_subset_balanced_deterministic(tmp_path: Path) -> None:
    write_fashion_dir(tmp_path, gz=True)
    images, labels = fashion_mnist_subset("train", n_per_class=3, seed=1, root=tmp_path)
    assert images.shape == (30, 28, 28) and labels.shape == (30,)
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10
    again = fashion_mnist_subset("train", n_per_class=3, seed=1, root=tmp_path)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    other = fashion_mnist_subset("train", n_per_class=3, seed=2, root=tmp_path)
    assert not torch.equal(images, other[0])
    # Every chosen image is a real member of its class in the full split.
    full_images, full_labels = load_fashion_mnist(tmp_path, "train")
    for image, label in zip(images, labels, strict=True):
        matches = (full_images == image).flatten(1).all(1).nonzero().flatten()
        assert full_labels[matches].tolist() == [label.item()]
    with pytest.raises(ValueError, match="fewer than n_per_class=7"):
        fashion_mnist_subset("train", n_per_class=7, seed=0, root=tmp_path)


def test_to_model_input() -> None:
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[0] = 255
    images[1, :, 14:] = 255
    mean, std = (0.5, 0.4, 0.3), (0.5, 0.25, 0.1)
    x = to_model_input(images, 56, mean, std)
    assert x.shape == (2, 3, 56, 56) and x.dtype == torch.float32
    # Undo the normalization: back in [0, 1], the three channels equal, white stays 1, black 0.
    raw = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    torch.testing.assert_close(raw[:, 0], raw[:, 1])
    torch.testing.assert_close(raw[:, 0], raw[:, 2])
    torch.testing.assert_close(raw[0], torch.ones(3, 56, 56))
    assert raw[1, :, :, :20].abs().max() < 1e-6 and (raw[1, :, :, 36:] - 1).abs().max() < 1e-6
    assert to_model_input(images, 14).shape == (2, 3, 14, 14)  # downscaling works too


@pytest.mark.skipif(
    not DEFAULT_ROOT.is_dir(), reason=f"{DEFAULT_ROOT} absent: apt-get install dataset-fashion-mnist"
)
def test_real_fashion_mnist_test_split() -> None:
    images, labels = load_fashion_mnist(DEFAULT_ROOT, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert len(FASHION_MNIST_CLASSES) == 10
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert images.float().std() > 50  # real pictures, not blank
    sub_images, sub_labels = fashion_mnist_subset("test", n_per_class=5, seed=0, root=DEFAULT_ROOT)
    assert torch.bincount(sub_labels, minlength=10).tolist() == [5] * 10


# ------------------------------------------------------------------------------------------ folders


def make_png(path: Path, value: int = 0, size: tuple[int, int] = (12, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 128)).save(path)
    return path


def make_folder(root: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        for i in range(count):
            make_png(root / name / f"img{i:02d}.png", value=10 * i)


def test_folder_seeded_split(tmp_path: Path) -> None:
    make_folder(tmp_path, {"cat": 10, "dog": 5, "eel": 2, "fox": 1})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    make_png(tmp_path / "dog" / "UPPER.PNG")  # extensions are case-insensitive
    data = load_image_folder(tmp_path, test_fraction=0.3, seed=0)
    assert isinstance(data, ImageFolderData) and data.classes == ["cat", "dog", "eel", "fox"]

    def count(items: list[tuple[Path, int]]) -> list[int]:
        return torch.bincount(torch.tensor([label for _, label in items]), minlength=4).tolist()

    # Stratified: round(n * 0.3) per class, at least one of each side for n >= 2, a lone image trains.
    assert count(data.test) == [3, 2, 1, 0] and count(data.train) == [7, 4, 1, 1]
    train_paths = {p for p, _ in data.train}
    assert not train_paths & {p for p, _ in data.test}
    assert all(p.parent.name == data.classes[label] for p, label in data.train + data.test)
    assert all(p.suffix.lower() == ".png" for p in train_paths)

    # Deterministic for a seed; another seed picks other test images.
    assert load_image_folder(tmp_path, test_fraction=0.3, seed=0) == data
    assert load_image_folder(tmp_path, test_fraction=0.3, seed=1).test != data.test


def test_folder_train_test_layout(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"a": 3, "b": 2, "c": 1})
    make_folder(tmp_path / "test", {"a": 1, "b": 2})
    data = load_image_folder(tmp_path)
    assert data.classes == ["a", "b", "c"]
    assert [label for _, label in data.train] == [0, 0, 0, 1, 1, 2]
    assert [label for _, label in data.test] == [0, 1, 1]
    assert all(p.parts[-3] == "test" for p, _ in data.test)


def test_folder_test_class_not_in_train(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"a": 2})
    make_folder(tmp_path / "test", {"a": 1, "zebra": 1})
    with pytest.raises(ValueError, match=r"classes in .*test not in .*train: zebra"):
        load_image_folder(tmp_path)


def test_folder_half_split_layout(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"a": 2})
    with pytest.raises(ValueError, match=r"found .*train but no .*test"):
        load_image_folder(tmp_path)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"no image folder at .*missing; expected .*missing/CLASS/\*\.jpg"
    ):
        load_image_folder(tmp_path / "missing")

    empty = tmp_path / "empty"
    empty.mkdir()
    make_png(empty / "loose.png")  # images directly in root are not in a class folder
    with pytest.raises(ValueError, match=r"no images found under .*empty; expected .*empty/CLASS/\*\.jpg"):
        load_image_folder(empty)

    no_images = tmp_path / "no_images"
    (no_images / "a").mkdir(parents=True)
    (no_images / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images found under"):
        load_image_folder(no_images)

    one_empty = tmp_path / "one_empty"
    make_folder(one_empty, {"full": 3})
    (one_empty / "hollow").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) with no images under .*one_empty: hollow"):
        load_image_folder(one_empty)

    make_folder(tmp_path / "ok", {"a": 2})
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
            load_image_folder(tmp_path / "ok", test_fraction=fraction)


def test_load_images(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    Image.new("L", (20, 10), 200).save(grey)  # not RGB: converted
    wide = make_png(tmp_path / "wide.png", value=0, size=(30, 12))
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    x, labels = load_images([(grey, 3), (wide, 1)], 16, mean, std)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert labels.tolist() == [3, 1] and labels.dtype == torch.int64
    torch.testing.assert_close(x[0], torch.full((3, 16, 16), 200 / 255), atol=1e-2, rtol=0)
    torch.testing.assert_close(x[1, 1], torch.ones(16, 16), atol=1e-2, rtol=0)

    empty_x, empty_labels = load_images([], 16)
    assert empty_x.shape == (0, 3, 16, 16) and empty_labels.shape == (0,)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_images([(broken, 0)], 16)
