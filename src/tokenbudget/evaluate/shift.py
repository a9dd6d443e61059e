"""Bias diagnostic: does a reduction move features *towards another class*?

A reduction that loses information makes features noisier; one that is *biased* moves every
image's features the same way. On a k-NN or linear classifier fitted on full-token features, a
common shift along a between-class direction turns one class into another even when each
image keeps most of its information. This module measures that shift, as pure functions of
feature tensors (no model):

* the mean shift ``s = mean_i (reduced_i - full_i)`` over test images [C];
* for each pair of classes ``(a, b)``, the direction ``d = mu_b - mu_a`` between the class means
  of the *full-token train* features (what the classifier was fitted on);
* ``fraction = <s, d> / |d|^2``: the share of the class gap the shift covers along ``d``, signed
  (positive: towards ``b``; 1: the mean image moved as far as from class ``a``'s mean to ``b``'s);
* ``cosine = <s, d> / (|s| |d|)``: how squarely the shift points along ``d``.

The scalar summary (:attr:`ShiftReport.worst`) is the largest ``|fraction|`` over the class pairs
whose gap is at least ``min_gap`` (default a quarter) of the largest gap: the furthest the reduction
pushes features across a class gap the features actually open. Pairs of classes whose means
nearly coincide (a defect too small to move the mean feature) give unstable fractions of a
near-zero gap; they are reported in :attr:`ShiftReport.pairs` but left out of the summary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PairShift", "ShiftReport", "feature_shift"]


@dataclass(frozen=True)
class PairShift:
    """The mean shift measured along the direction from class ``a``'s mean to class ``b``'s."""

    a: int
    b: int
    fraction: float  # <s, d> / |d|^2, signed: > 0 towards b
    cosine: float  # <s, d> / (|s| |d|)
    gap: float  # |d| = |mu_b - mu_a| (full-token train features)


@dataclass(frozen=True)
class ShiftReport:
    """Shift of reduced test features against full ones, along every between-class direction.

    Attributes:
        pairs: one :class:`PairShift` per class pair ``a < b``, over all test images.
        shift_norm: ``|s|``, the length of the mean shift.
        worst: the scalar summary: the largest ``|fraction|`` over the pairs whose gap is at least
            ``min_gap`` times the largest gap (see :func:`feature_shift`).
        by_class: per true test class ``c``, the pairs measured on the mean shift of the test
            images of class ``c`` only (``None`` when no test labels were given).
    """

    pairs: tuple[PairShift, ...]
    shift_norm: float
    worst: float
    by_class: dict[int, tuple[PairShift, ...]] | None = None

    def pair(self, a: int, b: int, true_class: int | None = None) -> PairShift:
        """The entry for direction ``a -> b`` (either order: the sign flips for ``b -> a``),
        over all test images or over those of ``true_class``."""
        pairs = self.pairs if true_class is None else (self.by_class or {}).get(true_class)
        if pairs is None:
            raise ValueError(f"no shift recorded for test class {true_class}; give test_labels")
        for p in pairs:
            if (p.a, p.b) == (a, b):
                return p
            if (p.a, p.b) == (b, a):
                return PairShift(a, b, -p.fraction, -p.cosine, p.gap)
        raise ValueError(
            f"no class pair ({a}, {b}); classes: {sorted({p.a for p in pairs} | {p.b for p in pairs})}"
        )


def _pairs(shift: Tensor, means: Tensor, classes: list[int]) -> tuple[PairShift, ...]:
    """Project ``shift`` [C] on every between-class direction of ``means`` [K, C]."""
    out = []
    shift_norm = shift.norm()
    for i, a in enumerate(classes):
        for j in range(i + 1, len(classes)):
            d = means[j] - means[i]
            gap = d.norm()
            if gap == 0:
                raise ValueError(
                    f"classes {a} and {classes[j]} have the same mean feature: no direction between them"
                )
            dot = torch.dot(shift, d)
            cosine = dot / (shift_norm * gap) if shift_norm > 0 else torch.zeros(())
            out.append(PairShift(a, classes[j], float(dot / gap**2), float(cosine), float(gap)))
    return tuple(out)


def feature_shift(
    train_full: Tensor,
    train_labels: Tensor,
    test_full: Tensor,
    test_reduced: Tensor,
    test_labels: Tensor | None = None,
    *,
    normalize: bool = True,
    min_gap: float = 0.25,
) -> ShiftReport:
    """How far, and towards which class, a reduction moves the features on average.

    Args:
        train_full: [N, C] full-token train features (the classifier's reference).
        train_labels: [N] integer class labels of the train features (at least two classes).
        test_full: [M, C] full-token test features.
        test_reduced: [M, C] the same test images with the reduction, rows in the same order.
        test_labels: optional [M] labels of the test images, for the per-class breakdown.
        normalize: L2-normalize every feature row first (default): the geometry a cosine k-NN
            sees. ``False`` measures raw features.
        min_gap: pairs whose gap is below this fraction of the largest gap are left out of the
            summary :attr:`ShiftReport.worst` (0 keeps every pair).

    Returns:
        A :class:`ShiftReport` (:attr:`ShiftReport.worst` is the largest ``|fraction|`` over the
        pairs with a gap of at least ``min_gap`` times the largest).
    """
    for name, t in (("train_full", train_full), ("test_full", test_full), ("test_reduced", test_reduced)):
        if not isinstance(t, Tensor) or t.ndim != 2 or not t.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point [rows, C] tensor, got {getattr(t, 'shape', t)!r}"
            )
    if test_full.shape != test_reduced.shape:
        raise ValueError(
            f"test_full {tuple(test_full.shape)} and test_reduced {tuple(test_reduced.shape)} must match "
            "(the same images, in the same order)"
        )
    if train_full.shape[1] != test_full.shape[1]:
        raise ValueError(f"train features have C={train_full.shape[1]}, test features C={test_full.shape[1]}")
    if train_labels.ndim != 1 or len(train_labels) != len(train_full):
        raise ValueError(f"train_labels must be [N={len(train_full)}], got {tuple(train_labels.shape)}")
    if test_labels is not None and (test_labels.ndim != 1 or len(test_labels) != len(test_full)):
        raise ValueError(f"test_labels must be [M={len(test_full)}], got {tuple(test_labels.shape)}")
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)) or not 0.0 <= min_gap <= 1.0:
        raise ValueError(f"min_gap is a fraction of the largest class gap in [0, 1], got {min_gap!r}")
    classes = sorted(int(c) for c in train_labels.unique())
    if len(classes) < 2:
        raise ValueError("the shift needs at least two classes in train_labels (one direction between them)")
    with torch.no_grad():
        dtype = torch.promote_types(train_full.dtype, torch.float32)
        prep = (lambda t: F.normalize(t.to(dtype), dim=1)) if normalize else (lambda t: t.to(dtype))
        train, full, reduced = prep(train_full), prep(test_full), prep(test_reduced)
        labels = train_labels.to(train.device)
        means = torch.stack([train[labels == c].mean(0) for c in classes])  # [K, C]
        delta = reduced - full.to(reduced.device)  # [M, C]
        shift = delta.mean(0)
        pairs = _pairs(shift, means, classes)
        by_class = None
        if test_labels is not None:
            by_class = {}
            for c in sorted(int(c) for c in test_labels.unique()):
                by_class[c] = _pairs(delta[test_labels.to(delta.device) == c].mean(0), means, classes)
        largest = max(p.gap for p in pairs)
        worst = max(abs(p.fraction) for p in pairs if p.gap >= min_gap * largest)
    return ShiftReport(pairs, float(shift.norm()), worst, by_class)


def format_shift(report: ShiftReport, class_names: list[str] | tuple[str, ...] | None = None) -> str:
    """One line per class pair: ``a->b fraction (cosine)``, then the per-class breakdown if any."""

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and c < len(class_names) else str(c)

    def line(pairs: tuple[PairShift, ...]) -> str:
        return "  ".join(f"{name(p.a)}->{name(p.b)} {p.fraction:+.3f} ({p.cosine:+.2f})" for p in pairs)

    lines = [f"all: {line(report.pairs)}  |s|={report.shift_norm:.4f}  worst={report.worst:.3f}"]
    for c, pairs in (report.by_class or {}).items():
        lines.append(f"{name(c)}: {line(pairs)}")
    return "\n".join(lines)
