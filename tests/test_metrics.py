"""Tests for the pure feature-quality metrics in tokenbudget.evaluate.metrics."""

from __future__ import annotations

import math

import pytest
import torch

from tokenbudget.evaluate import accuracy_drop, cosine_fidelity, knn_accuracy, linear_probe_accuracy

NUM_CLASSES = 5
DIM = 32


def gaussian_clusters(n_per_class: int, seed: int, spread: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-separated clusters: [5 * n, 32] features around fixed random centres, [5 * n] labels."""
    centres = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(1234)) * 3.0
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.numel(), DIM, generator=gen)
    perm = torch.randperm(labels.numel(), generator=gen)
    return feats[perm], labels[perm]


@pytest.fixture(scope="module")
def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x_tr, y_tr = gaussian_clusters(60, seed=0)
    x_te, y_te = gaussian_clusters(40, seed=1)
    return x_tr, y_tr, x_te, y_te


def shuffled(labels: torch.Tensor) -> torch.Tensor:
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(7))]


# --- k-NN -----------------------------------------------------------------------------


def test_knn_separable_clusters(split):
    assert knn_accuracy(*split) > 0.95


def test_knn_shuffled_labels_near_chance(split):
    x_tr, y_tr, x_te, y_te = split
    assert knn_accuracy(x_tr, shuffled(y_tr), x_te, y_te) < 0.4


def test_knn_k1_identical_sets_is_perfect():
    # Pure noise (no cluster structure): only the exact self-match can make this 1.0.
    x = torch.randn(200, DIM, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, NUM_CLASSES, (200,), generator=torch.Generator().manual_seed(4))
    assert knn_accuracy(x, y, x, y, k=1) == 1.0


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_knn_chunking_matches_single_block(split, chunk):
    x_tr, y_tr, x_te, _ = split
    y_noisy = shuffled(y_tr)  # imperfect accuracy, so a chunking bug would show
    full = knn_accuracy(x_tr, y_noisy, x_te, split[3], k=10, chunk=10_000)
    assert knn_accuracy(x_tr, y_noisy, x_te, split[3], k=10, chunk=chunk) == full


def test_knn_small_temperature_does_not_overflow(split):
    assert knn_accuracy(*split, temperature=1e-4) > 0.95


def test_knn_half_precision_and_num_classes(split):
    x_tr, y_tr, x_te, y_te = split
    acc = knn_accuracy(x_tr.half(), y_tr, x_te.half(), y_te, num_classes=NUM_CLASSES + 3)
    assert acc > 0.95


def test_knn_errors(split):
    x_tr, y_tr, x_te, y_te = split
    n = x_tr.shape[0]
    with pytest.raises(ValueError, match="k must satisfy"):
        knn_accuracy(x_tr, y_tr, x_te, y_te, k=n + 1)
    with pytest.raises(ValueError, match="k must satisfy"):
        knn_accuracy(x_tr, y_tr, x_te, y_te, k=0)
    with pytest.raises(ValueError, match="feature rows"):
        knn_accuracy(x_tr, y_tr[:-1], x_te, y_te)
    with pytest.raises(ValueError, match="feature widths"):
        knn_accuracy(x_tr, y_tr, x_te[:, :-1], y_te)
    with pytest.raises(ValueError, match="2-D"):
        knn_accuracy(x_tr[0], y_tr[:1], x_te, y_te)
    with pytest.raises(ValueError, match="labels must lie"):
        knn_accuracy(x_tr, y_tr, x_te, y_te, num_classes=NUM_CLASSES - 1)
    bad = y_te.clone()
    bad[0] = -1
    with pytest.raises(ValueError, match="labels must lie"):
        knn_accuracy(x_tr, y_tr, x_te, bad)
    with pytest.raises(TypeError, match="integer"):
        knn_accuracy(x_tr, y_tr.float(), x_te, y_te)
    nan = x_te.clone()
    nan[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        knn_accuracy(x_tr, y_tr, nan, y_te)
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(x_tr, y_tr, x_te, y_te, temperature=0.0)


# --- linear probe ---------------------------------------------------------------------


def test_linear_probe_separable_clusters(split):
    assert linear_probe_accuracy(*split) > 0.95


def test_linear_probe_shuffled_labels_near_chance(split):
    x_tr, y_tr, x_te, y_te = split
    assert linear_probe_accuracy(x_tr, shuffled(y_tr), x_te, y_te) < 0.4


def test_linear_probe_deterministic(split):
    a = linear_probe_accuracy(*split, seed=3, max_iter=20)
    b = linear_probe_accuracy(*split, seed=3, max_iter=20)
    assert a == b
    # The global RNG is left alone.
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    linear_probe_accuracy(*split)
    assert torch.equal(torch.rand(1), before)


def test_linear_probe_inside_inference_mode(split):
    expected = linear_probe_accuracy(*split)
    with torch.inference_mode():
        # Inference tensors, as a feature extractor run under inference_mode would produce.
        inf_split = tuple(t.clone() for t in split)
        assert all(t.is_inference() for t in inf_split)
        got = linear_probe_accuracy(*inf_split)
    assert got == expected
    with torch.no_grad():
        assert linear_probe_accuracy(*split) == expected


def test_linear_probe_constant_dims_and_float64(split):
    x_tr, y_tr, x_te, y_te = split
    # A constant column has train std 0: the clamp must keep everything finite.
    x_tr = torch.cat([x_tr, torch.full((x_tr.shape[0], 1), 5.0)], dim=1)
    x_te = torch.cat([x_te, torch.full((x_te.shape[0], 1), 9.0)], dim=1)
    assert linear_probe_accuracy(x_tr, y_tr, x_te, y_te) > 0.95
    assert linear_probe_accuracy(x_tr.double(), y_tr, x_te.double(), y_te, dtype=torch.float64) > 0.95


def test_linear_probe_errors(split):
    x_tr, y_tr, x_te, y_te = split
    with pytest.raises(ValueError, match="feature rows"):
        linear_probe_accuracy(x_tr[:-1], y_tr, x_te, y_te)
    with pytest.raises(ValueError, match="labels must lie"):
        linear_probe_accuracy(x_tr, y_tr + 10, x_te, y_te, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="weight_decay"):
        linear_probe_accuracy(*split, weight_decay=-1.0)


# --- cosine fidelity and drop ---------------------------------------------------------


def test_cosine_fidelity():
    x = torch.randn(50, DIM, generator=torch.Generator().manual_seed(5))
    assert cosine_fidelity(x, x) == pytest.approx(1.0, abs=1e-6)
    assert cosine_fidelity(-x, x) == pytest.approx(-1.0, abs=1e-6)
    assert cosine_fidelity(2.5 * x, x) == pytest.approx(1.0, abs=1e-6)
    assert cosine_fidelity(x.half(), x) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ValueError, match="equal shapes"):
        cosine_fidelity(x, x[:, :-1])


def test_accuracy_drop():
    assert accuracy_drop(0.9, 0.85) == pytest.approx(5.0)
    assert accuracy_drop(0.8, 0.82) == pytest.approx(-2.0)
    assert accuracy_drop(0.5, 0.5) == 0.0
