"""Feature-quality metrics: pure torch functions on feature tensors, no model knowledge.

Used by the quality harness to measure how much a token reduction hurts a backbone's
features: cosine k-NN accuracy (as in DINO's evaluation), a full-batch logistic-regression
linear probe, and the cosine fidelity between reduced and full features.

All accuracies are fractions in [0, 1]; :func:`accuracy_drop` converts a pair of them
into percentage points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LinearProbe",
    "accuracy_drop",
    "cosine_fidelity",
    "fit_linear_probe",
    "knn_accuracy",
    "knn_predictions",
    "linear_probe_accuracy",
]


def _check_split(name: str, feats: Tensor, labels: Tensor) -> None:
    """Validate one (features [N, C], labels [N]) pair."""
    if not isinstance(feats, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{name}: features and labels must be torch tensors")
    if feats.ndim != 2:
        raise ValueError(f"{name}_feats must be 2-D [N, C], got shape {tuple(feats.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"{name}_labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if feats.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: {feats.shape[0]} feature rows but {labels.shape[0]} labels (they must match)"
        )
    if feats.shape[0] == 0:
        raise ValueError(f"{name}: empty split")
    if feats.is_complex() or not feats.is_floating_point():
        raise TypeError(f"{name}_feats must be a real floating-point tensor, got {feats.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name}_labels must be an integer tensor, got {labels.dtype}")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name}_feats contains NaN or Inf")


def _check_pair(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int | None,
) -> int:
    """Validate a train/test split and return the number of classes.

    When ``num_classes`` is None it is inferred as ``max(label) + 1`` over both splits, so
    a class present only in the test split still gets a (never predicted) slot.
    """
    _check_split("train", train_feats, train_labels)
    _check_split("test", test_feats, test_labels)
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"feature widths differ: train has C={train_feats.shape[1]}, test has C={test_feats.shape[1]}"
        )
    lo = min(int(train_labels.min()), int(test_labels.min()))
    hi = max(int(train_labels.max()), int(test_labels.max()))
    if num_classes is None:
        num_classes = hi + 1
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found range [{lo}, {hi}]")
    return num_classes


def knn_predictions(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Weighted cosine k-NN predictions [M], as in DINO's ``eval_knn``.

    Features are L2-normalised; each test row votes with its ``k`` most similar train rows,
    a neighbour with cosine similarity ``s`` adding ``exp(s / temperature)`` to its class.
    The prediction is the class with the largest vote (ties go to the lowest class index).

    Args:
        train_feats: [N, C] floating-point train features.
        train_labels: [N] integer labels in ``[0, num_classes)``.
        test_feats: [M, C] test features (moved to ``train_feats``' device).
        test_labels: [M] integer labels.
        k: neighbours per test row, ``1 <= k <= N``.
        temperature: vote temperature (> 0); smaller values weight the nearest more.
        num_classes: number of classes; inferred from the labels when None.
        chunk: test rows per similarity block, bounding memory to ``chunk * N`` floats.

    Returns:
        [M] int64 predicted class of each test row (on ``train_feats``' device).
    """
    num_classes = _check_pair(train_feats, train_labels, test_feats, test_labels, num_classes)
    n = train_feats.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= N (number of train rows = {n}), got k={k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    device = train_feats.device
    # no_grad: nothing here needs autograd, and it also works unchanged inside inference_mode.
    with torch.no_grad():
        # Half-precision similarities lose the ordering of close neighbours: score in float32
        # (or float64 when given).
        dtype = torch.promote_types(train_feats.dtype, torch.float32)
        train = F.normalize(train_feats.to(dtype), dim=1)
        test = F.normalize(test_feats.to(device=device, dtype=dtype), dim=1)
        train_y = train_labels.to(device=device, dtype=torch.long)

        predictions = []
        for start in range(0, test.shape[0], chunk):
            sims = test[start : start + chunk] @ train.T  # [m, N]
            top_sims, top_idx = sims.topk(k, dim=1)  # [m, k], sorted descending
            # Subtract the row's best similarity before exp: the argmax is unchanged and a
            # small temperature cannot overflow float32 (exp(1 / 0.001) would).
            weights = ((top_sims - top_sims[:, :1]) / temperature).exp()
            votes = torch.zeros(top_sims.shape[0], num_classes, dtype=dtype, device=device)
            votes.scatter_add_(1, train_y[top_idx], weights)
            predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predictions` (same arguments) on the test split."""
    pred = knn_predictions(
        train_feats,
        train_labels,
        test_feats,
        test_labels,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk=chunk,
    )
    return int((pred == test_labels.to(pred.device)).sum()) / len(pred)


class LinearProbe:
    """A fitted probe (:func:`fit_linear_probe`): train-split standardisation, then ``x @ W + b``."""

    def __init__(self, mean: Tensor, inv_std: Tensor, weight: Tensor, bias: Tensor) -> None:
        self.mean, self.inv_std, self.weight, self.bias = mean, inv_std, weight, bias

    def predict(self, feats: Tensor) -> Tensor:
        """[M] int64 predicted class of each row of ``feats`` [M, C]."""
        if feats.ndim != 2 or feats.shape[1] != self.weight.shape[0]:
            raise ValueError(f"expected features [M, {self.weight.shape[0]}], got shape {tuple(feats.shape)}")
        with torch.no_grad():
            x = (feats.detach().to(device=self.mean.device, dtype=self.mean.dtype) - self.mean) * self.inv_std
            return (x @ self.weight + self.bias).argmax(dim=1)


def fit_linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    *,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LinearProbe:
    """Fit the probe of :func:`linear_probe_accuracy` on train features [N, C] and labels [N] in
    ``[0, num_classes)``, once, to score several test feature sets with :meth:`LinearProbe.predict`."""
    _check_split("train", train_feats, train_labels)
    if num_classes < 1 or int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(f"train labels must lie in [0, num_classes={num_classes})")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")

    device = train_feats.device
    # Inference tensors cannot be saved for backward, so leave inference mode (if any) and
    # make fresh copies; enable_grad overrides a caller's no_grad.
    with torch.inference_mode(False), torch.enable_grad():
        x_train = train_feats.detach().to(device=device, dtype=dtype).clone()
        y_train = train_labels.detach().to(device=device, dtype=torch.long).clone()

        # Standardise with train statistics only, so the test split never leaks into the fit.
        mean = x_train.mean(dim=0, keepdim=True)
        # unbiased=False: a single train row gives std 0 rather than NaN.
        std = x_train.std(dim=0, unbiased=False, keepdim=True)
        # A dimension that is constant on train (up to rounding) carries no information the
        # probe can learn, but a clamped tiny std would still blow a test-time difference
        # up to ~1e6 and swamp the logits. Zero such dimensions instead; the rest are
        # divided by a clamped std so nothing is ever divided by ~0.
        tol = 100 * torch.finfo(dtype).eps * (1 + mean.abs())
        inv_std = torch.where(std > tol, 1 / std.clamp_min(1e-12), torch.zeros_like(std))
        x_train = (x_train - mean) * inv_std

        n_feat = x_train.shape[1]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        # Small init: the loss starts near log(K) and the first line search is well scaled.
        w0 = torch.randn(n_feat, num_classes, generator=gen, dtype=dtype) * 1e-3
        weight = w0.to(device).requires_grad_(True)
        bias = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)

        opt = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            tolerance_grad=1e-7,
            tolerance_change=1e-10,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            logits = x_train @ weight + bias
            loss = F.cross_entropy(logits, y_train) + weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return LinearProbe(mean, inv_std, weight.detach(), bias.detach())


def linear_probe_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    num_classes: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Test accuracy of a multinomial logistic-regression probe trained on frozen features.

    Features are standardised with the train split's mean and std (dimensions constant on
    train are zeroed, so they cannot blow up at test time), then ``W [C, K]`` and ``b [K]`` minimise
    ``cross_entropy(x @ W + b, y) + weight_decay * ||W||^2`` full-batch with L-BFGS
    (strong-Wolfe line search). The problem is convex, so the result barely depends on the
    initialisation; it is still drawn from a private generator seeded with ``seed`` so runs
    are reproducible without touching the global RNG.

    Safe to call inside ``torch.inference_mode()``: the inputs are cloned into ordinary
    tensors with inference mode locally disabled and gradients enabled.

    Args:
        train_feats: [N, C] floating-point train features.
        train_labels: [N] integer labels in ``[0, num_classes)``.
        test_feats: [M, C] test features (moved to ``train_feats``' device).
        test_labels: [M] integer labels.
        weight_decay: L2 penalty on ``W`` (the bias is not penalised), >= 0.
        max_iter: maximum L-BFGS iterations.
        seed: seed of the initialisation.
        num_classes: number of classes; inferred from the labels when None.
        dtype: compute dtype; float32 by default, float64 for a tighter optimum.

    Returns:
        Top-1 accuracy on the test split, a float in [0, 1].
    """
    num_classes = _check_pair(train_feats, train_labels, test_feats, test_labels, num_classes)
    probe = fit_linear_probe(
        train_feats,
        train_labels,
        num_classes=num_classes,
        weight_decay=weight_decay,
        max_iter=max_iter,
        seed=seed,
        dtype=dtype,
    )
    pred = probe.predict(test_feats.to(train_feats.device))
    return float((pred == test_labels.to(device=pred.device, dtype=torch.long)).float().mean())


def cosine_fidelity(reduced: Tensor, full: Tensor) -> float:
    """Mean row-wise cosine similarity between reduced and full features.

    Args:
        reduced: [N, C] features from the reduced model.
        full: [N, C] features from the full model, same rows in the same order.

    Returns:
        Mean cosine similarity over the N rows, in [-1, 1] (1 = identical directions).
    """
    if reduced.ndim != 2 or reduced.shape != full.shape:
        raise ValueError(
            f"reduced and full must both be [N, C] with equal shapes, got "
            f"{tuple(reduced.shape)} and {tuple(full.shape)}"
        )
    if reduced.shape[0] == 0:
        raise ValueError("cosine_fidelity needs at least one row")
    with torch.no_grad():
        # float32 at least: half-precision norms of wide features lose several digits.
        dtype = torch.promote_types(torch.promote_types(reduced.dtype, full.dtype), torch.float32)
        a = reduced.to(dtype)
        b = full.to(device=a.device, dtype=dtype)
        return float(F.cosine_similarity(a, b, dim=1, eps=1e-8).mean())


def accuracy_drop(full: float, reduced: float) -> float:
    """Accuracy lost by the reduction, in percentage points.

    Args:
        full: accuracy of the full model, a fraction in [0, 1].
        reduced: accuracy of the reduced model, a fraction in [0, 1].

    Returns:
        ``100 * (full - reduced)``; positive when the reduction hurts.
    """
    return 100.0 * (float(full) - float(reduced))
