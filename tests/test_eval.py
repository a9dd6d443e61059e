"""The quality harness end to end on a tiny model and small real or synthetic data."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from conftest import make_tiny, write_two_class_folder
from tokenbudget.cli import main
from tokenbudget.data.eval_sets import EvalData
from tokenbudget.evaluate.budgets import method_config
from tokenbudget.evaluate.quality import evaluate
from tokenbudget.evaluate.tables import format_eval_table, pareto_plot, rows_to_csv


def _clustered_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 32 px images that differ in brightness: separable even by a random ViT."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, 32, 32, generator=g) * 0.3 + (labels.float() * 2 - 1)[:, None, None, None]
    return images, labels


def test_harness_rows(tmp_path) -> None:
    model = make_tiny("dinov2_registers")
    tr_x, tr_y = _clustered_images(40, 0)
    te_x, te_y = _clustered_images(20, 1)
    rows = evaluate(
        model, EvalData("toy", tr_x, tr_y, te_x, te_y), ("tome", "random", "pool"), (1.0, 0.5),
        k=5, speed_batch_size=4, speed_samples=1,
    )  # fmt: skip
    assert [r.method for r in rows] == ["full", "tome", "random", "pool"]
    full = rows[0]
    assert full.knn_acc == 1.0 and full.cosine == 1.0 and full.final_tokens == 69
    for r in rows[1:]:
        assert r.final_tokens == 5 + 32  # the same token count for every method
        assert 0 < r.flops_ratio < 1 and r.speedup > 0
        assert -1 <= r.cosine < 1
        assert r.knn_drop == pytest.approx(100 * (full.knn_acc - r.knn_acc))
    table = format_eval_table(rows)
    assert "random" in table and "pool" in table
    parsed = list(csv.DictReader(io.StringIO(rows_to_csv(rows))))
    assert len(parsed) == 4 and parsed[1]["method"] == "tome"
    plot = tmp_path / "pareto.png"
    pareto_plot(rows, str(plot))
    assert plot.stat().st_size > 5000
    assert not hasattr(model, "_tokenbudget")  # the harness leaves the model unpatched


def test_bad_method_and_budget() -> None:
    with pytest.raises(ValueError, match="unknown method 'evit'"):
        method_config("evit", 0.5)
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        method_config("tome", 1.5)


def test_eval_cli_on_an_image_folder(tmp_path, capsys) -> None:

    write_two_class_folder(tmp_path / "data")
    argv = ["eval", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path / "data"), "--methods", "tome,pool",
            "--keep", "1.0,0.5", "--speed-batch-size", "2", "--speed-samples", "1", "--json",
            "--csv", str(tmp_path / "out.csv")]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["full", "tome", "pool"]
    assert rows[0]["knn_k"] == 10  # fewer training images than k=20: all of them
    assert (tmp_path / "out.csv").read_text().startswith("method,keep")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--data", "/no/such/dir"], "no dataset at '/no/such/dir'"),
        (["eval", "--keep", "0.5,2"], "keep must be in (0, 1]"),
    ],
)
def test_eval_bad_input(argv, message, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_eval_refuses_an_unknown_method_while_parsing(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--methods", "tome,evit"])
    assert exit_info.value.code == 2 and "unknown method 'evit'" in capsys.readouterr().err


def test_empty_image_folder_is_an_error(tmp_path, capsys) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(["eval", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path)]) == 2
    assert "no images" in capsys.readouterr().err


def test_skimage_crops_are_labelled_by_photo() -> None:
    from tokenbudget.data import SAMPLE_IMAGES
    from tokenbudget.data.eval_sets import load_eval_data
    from tokenbudget.data.images import IMAGENET_MEAN, IMAGENET_STD

    data = load_eval_data("skimage", 32, IMAGENET_MEAN, IMAGENET_STD)
    n = len(SAMPLE_IMAGES) * 4
    assert data.train_images.shape == (n, 3, 32, 32) and data.test_images.shape == (n, 3, 32, 32)
    assert torch.equal(data.train_labels.bincount(), torch.full((len(SAMPLE_IMAGES),), 4))
    assert not torch.equal(data.train_images, data.test_images)
    again = load_eval_data("skimage", 32, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(again.test_images, data.test_images)  # seeded


def test_load_eval_data_takes_seeded_subsets_of_fixed_sets(tmp_path) -> None:
    from tokenbudget.data.eval_sets import load_eval_data
    from tokenbudget.data.images import IMAGENET_MEAN, IMAGENET_STD

    full = load_eval_data("skimage", 32, IMAGENET_MEAN, IMAGENET_STD)
    sub = load_eval_data("skimage", 32, IMAGENET_MEAN, IMAGENET_STD, n_train=5, n_test=3, seed=0)
    assert (len(sub.train_labels), len(sub.test_labels)) == (5, 3)
    # every chosen image is one of the full set's, with its label
    for x, y in zip(sub.train_images, sub.train_labels, strict=True):
        (i,) = [i for i in range(len(full.train_images)) if torch.equal(full.train_images[i], x)]
        assert full.train_labels[i] == y
    again = load_eval_data("skimage", 32, IMAGENET_MEAN, IMAGENET_STD, n_train=5, n_test=3, seed=0)
    assert torch.equal(again.train_images, sub.train_images) and torch.equal(
        again.test_images, sub.test_images
    )
    other = load_eval_data("skimage", 32, IMAGENET_MEAN, IMAGENET_STD, n_train=5, n_test=3, seed=1)
    assert not torch.equal(other.train_images, sub.train_images)
    with pytest.raises(
        ValueError, match=f"holds {len(full.train_labels)} train and {len(full.test_labels)} test"
    ):
        load_eval_data("skimage", 32, IMAGENET_MEAN, IMAGENET_STD, n_train=len(full.train_labels) + 1)

    folder = write_two_class_folder(tmp_path / "data")
    data = load_eval_data(str(folder), 32, IMAGENET_MEAN, IMAGENET_STD, n_train=4, n_test=0)
    assert data.train_images.shape == (4, 3, 32, 32) and data.test_images.shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="data holds 10 train and 2 test images; asked for 3 test"):
        load_eval_data(str(folder), 32, IMAGENET_MEAN, IMAGENET_STD, n_test=3)
    with pytest.raises(ValueError, match="non-negative number of images"):
        load_eval_data(str(folder), 32, IMAGENET_MEAN, IMAGENET_STD, n_train=-1)


def test_load_eval_data_sizes_of_drawn_sets() -> None:
    from tokenbudget.data.eval_sets import load_eval_data
    from tokenbudget.data.images import IMAGENET_MEAN, IMAGENET_STD

    data = load_eval_data("fashion-mnist", 32, IMAGENET_MEAN, IMAGENET_STD, n_train=25, n_test=0)
    assert data.train_images.shape == (20, 3, 32, 32) and data.test_images.shape == (0, 3, 32, 32)
    assert torch.equal(data.train_labels.bincount(), torch.full((10,), 2))  # balanced, rounded down
    data = load_eval_data("fashion-mnist", 32, IMAGENET_MEAN, IMAGENET_STD, n_test=20, default_sizes=(30, 99))
    assert (len(data.train_labels), len(data.test_labels)) == (30, 20)
    with pytest.raises(ValueError, match="at least 10 train and 10 test images"):
        load_eval_data("fashion-mnist", 32, IMAGENET_MEAN, IMAGENET_STD, n_train=5)
