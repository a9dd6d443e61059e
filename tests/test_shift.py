"""The bias diagnostic on synthetic features where the answer is known."""

from __future__ import annotations

import pytest
import torch

from tokenbudget.evaluate.shift import feature_shift, format_shift


def _classes(means: torch.Tensor, per_class: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train features whose class means are exactly ``means`` [K, C]: each class is its mean plus
    zero-sum noise (rows of noise and their negatives)."""
    g = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for c, mean in enumerate(means):
        noise = torch.randn(per_class // 2, means.shape[1], generator=g, dtype=torch.float64)
        rows.append(mean + torch.cat([noise, -noise]))
        labels += [c] * (2 * (per_class // 2))
    return torch.cat(rows), torch.tensor(labels)


MEANS = torch.tensor([[0.0, 0.0, 0.0, 1.0], [2.0, 0.0, 0.0, 1.0], [0.0, 4.0, 0.0, 1.0]], dtype=torch.float64)


def test_a_shift_along_one_class_gap_is_that_fraction_of_it() -> None:
    train, labels = _classes(MEANS)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(30, 4, generator=g, dtype=torch.float64)
    reduced = full + 0.25 * (MEANS[2] - MEANS[0])  # a quarter of the way from class 0 to class 2
    report = feature_shift(train, labels, full, reduced, normalize=False)
    p02 = report.pair(0, 2)
    assert p02.fraction == pytest.approx(0.25) and p02.cosine == pytest.approx(1.0)
    assert p02.gap == pytest.approx(4.0)
    # Along 0 -> 1 (the first axis) the shift (0, 1, 0, 0) has no component.
    assert report.pair(0, 1).fraction == pytest.approx(0.0, abs=1e-12)
    # Along 1 -> 2, d = (-2, 4, 0, 0): <s, d> / |d|^2 = 4 / 20.
    assert report.pair(1, 2).fraction == pytest.approx(0.2)
    assert report.pair(2, 1).fraction == pytest.approx(-0.2)  # the other way round flips the sign
    assert report.worst == pytest.approx(0.25)
    assert report.shift_norm == pytest.approx(1.0)


def test_summary_leaves_out_classes_whose_means_nearly_coincide() -> None:
    means = torch.tensor([[0.0, 0.0, 1.0], [0.01, 0.0, 1.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    train, labels = _classes(means)
    full = torch.randn(8, 3, dtype=torch.float64)
    reduced = full + torch.tensor([0.1, 0.2, 0.0], dtype=torch.float64)
    report = feature_shift(train, labels, full, reduced, normalize=False)
    assert report.pair(0, 1).fraction == pytest.approx(10.0)  # a tenth of a unit over a 0.01 gap
    assert report.worst == pytest.approx(0.1)  # pairs 0-2 and 1-2 only (gap 2 vs 0.01)
    assert feature_shift(train, labels, full, reduced, normalize=False, min_gap=0.0).worst == pytest.approx(
        10.0
    )
    with pytest.raises(ValueError, match="min_gap"):
        feature_shift(train, labels, full, reduced, min_gap=2.0)


def test_no_shift_is_zero_and_a_shift_off_every_direction_has_zero_fraction() -> None:
    train, labels = _classes(MEANS)
    full = torch.randn(12, 4, dtype=torch.float64)
    same = feature_shift(train, labels, full, full.clone(), normalize=False)
    assert same.worst == 0.0 and same.shift_norm == 0.0
    orthogonal = full + torch.tensor(
        [0.0, 0.0, 3.0, 0.0], dtype=torch.float64
    )  # the class means share axis 2
    report = feature_shift(train, labels, full, orthogonal, normalize=False)
    assert report.worst == pytest.approx(0.0, abs=1e-12) and report.shift_norm == pytest.approx(3.0)


def test_per_class_breakdown_sees_whose_features_moved() -> None:
    train, labels = _classes(MEANS)
    full = torch.randn(20, 4, dtype=torch.float64)
    test_labels = torch.tensor([0] * 10 + [1] * 10)
    reduced = full.clone()
    reduced[:10] += 0.5 * (MEANS[2] - MEANS[0])  # only the class-0 images move, half-way to class 2
    report = feature_shift(train, labels, full, reduced, test_labels, normalize=False)
    assert report.pair(0, 2, true_class=0).fraction == pytest.approx(0.5)
    assert report.pair(0, 2, true_class=1).fraction == pytest.approx(0.0, abs=1e-12)
    assert report.pair(0, 2).fraction == pytest.approx(0.25)  # averaged over all test images
    text = format_shift(report, ("nominal", "local", "global"))
    assert "nominal->global +0.250" in text and text.count("\n") == 2


def test_normalized_shift_measures_the_cosine_geometry() -> None:
    train, labels = _classes(MEANS)
    full = MEANS[1] + 0.1 * torch.randn(16, 4, dtype=torch.float64)  # images near class 1
    scaled = 3.0 * full  # a pure change of length: invisible to a cosine k-NN
    assert feature_shift(train, labels, full, scaled).worst == pytest.approx(0.0, abs=1e-12)
    assert feature_shift(train, labels, full, scaled, normalize=False).worst > 0.1


def test_bad_input_is_refused() -> None:
    train, labels = _classes(MEANS)
    full = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="must match"):
        feature_shift(train, labels, full, full[:4])
    with pytest.raises(ValueError, match="at least two classes"):
        feature_shift(train, torch.zeros(len(train), dtype=torch.long), full, full)
    with pytest.raises(ValueError, match="train_labels must be"):
        feature_shift(train, labels[:3], full, full)
    with pytest.raises(ValueError, match="C=4"):
        feature_shift(train, labels, full[:, :3], full[:, :3])
    with pytest.raises(ValueError, match="same mean"):
        twins = torch.tensor([0] * len(train) + [1] * len(train))  # two classes, the same rows
        feature_shift(torch.cat([train, train]), twins, full, full)
