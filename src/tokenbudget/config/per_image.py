"""Config of per-image budgets: a glance at each image picks its own budget level (Auto or ToMe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import ReductionConfig

#: the glance scores a per-image budget can be chosen by (:mod:`tokenbudget.strategies.per_image`)
PER_IMAGE_POLICIES = ("redundancy", "entropy", "detail", "spread", "predictor")
#: the fixed reducers a per-image level can run
PER_IMAGE_REDUCERS = ("auto", "tome")
#: default per-image budget levels, as FLOPs-ideal speedups of the blocks (1.0: all tokens)
DEFAULT_PER_IMAGE_LEVELS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class PerImage(ReductionConfig):
    """A per-image token budget: a cheap glance at each image picks its own budget level, so
    that images that need few tokens spend few and the mean cost meets a target.

    Each level is a FLOPs-ideal speedup of the blocks (``1.0`` runs all tokens); a level runs as
    ``reducer`` (Auto by default) with the schedule that reaches it (:func:`tokenbudget.strategies.per_image.resolve_levels`).
    The policy scores each image's need (higher: more tokens) from a glance; ``thresholds`` split
    the scores into levels: an image with score ``s`` gets ``levels[len(levels) - 1 - i]``, ``i``
    the number of thresholds ``<= s`` (low scores run the fastest level). A batch runs as one
    sub-batch per level (never padded) and outputs return in input order
    (:mod:`tokenbudget.strategies.per_image`).

    Give exactly one mean budget, then calibrate the thresholds on training images with
    ``tb.adaptive.calibrate_per_image(model, images, flops_speedup=2)``, which returns the config
    with ``thresholds`` filled in (and round-trips through JSON).

    Args:
        keep: mean budget as the FLOPs of ``tb.ToMe(keep=keep)`` on the model.
        flops_speedup: mean budget as a FLOPs-ideal speedup of the blocks (e.g. 2.0).
        policy: the glance score (:data:`PER_IMAGE_POLICIES`): ``"redundancy"`` (how many of the
            first block's tokens ToMe's matching finds near-duplicates of), ``"entropy"`` (the
            patch embeddings' token entropy, the entropy guard's measure), ``"detail"`` (pixel
            variance below the patch scale, adaptive patching's score), ``"spread"`` (how far the
            patch embeddings spread around their mean) or ``"predictor"`` (a trained budget
            predictor's expected need, ``predictor`` is its path).
        levels: the FLOPs-ideal speedups an image may run at, increasing, at least two, from 1.
        thresholds: ``len(levels) - 1`` non-decreasing score thresholds (calibrated).
        predictor: path of a trained budget predictor (policy ``"predictor"``).
        target_flops: FLOPs fraction the thresholds were calibrated to (a record of calibration).
        calibrated_flops: mean FLOPs fraction the calibration images reached (a record).
        prop_attn: proportional attention in every level, as in :class:`ToMe`.
        anchor: the level nearest the mean budget runs the fixed budget itself (ToMe's ``keep``
            schedule at exactly the mean FLOPs) instead of the geometric schedule, so that images
            that all get that level are exactly the fixed budget.
        reducer: what every level runs: ``"auto"`` (default, :class:`~tokenbudget.Auto`, the best
            fixed reducer we measured, so the anchored level is ``tb.Auto(keep=...)``) or
            ``"tome"`` (:class:`~tokenbudget.ToMe`).
    """

    method: ClassVar[str] = "per-image"

    keep: float | None = None
    flops_speedup: float | None = None
    policy: str = "redundancy"
    levels: tuple[float, ...] = DEFAULT_PER_IMAGE_LEVELS
    thresholds: tuple[float, ...] | None = None
    predictor: str | None = None
    target_flops: float | None = None
    calibrated_flops: float | None = None
    prop_attn: bool = True
    anchor: bool = True
    reducer: str = "auto"

    def __post_init__(self) -> None:
        given = [name for name in ("keep", "flops_speedup") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "PerImage needs exactly one mean budget: keep (the FLOPs of tb.ToMe(keep=...), e.g. "
                f"PerImage(keep=0.4)) or flops_speedup (e.g. PerImage(flops_speedup=2)); got {given or 'none'}"
            )
        if self.keep is not None:
            _check_positive_number("keep", self.keep)
            if self.keep > 1:
                raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.flops_speedup is not None:
            _check_positive_number("flops_speedup", self.flops_speedup)
            if self.flops_speedup < 1:
                raise ValueError(f"flops_speedup must be >= 1 (1: all tokens), got {self.flops_speedup!r}")
        if self.policy not in PER_IMAGE_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(PER_IMAGE_POLICIES)}")
        levels = self.levels
        if not isinstance(levels, (list, tuple)) or len(levels) < 2:
            raise ValueError(
                f"levels must be at least two FLOPs-ideal speedups, e.g. (1.0, 2.0, 4.0); got {levels!r}"
            )
        for level in levels:
            _check_positive_number("every level", level)
        levels = tuple(float(level) for level in levels)
        if levels[0] < 1 or any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
            raise ValueError(f"levels must increase strictly from >= 1 (1: all tokens), got {list(levels)}")
        object.__setattr__(self, "levels", levels)
        if self.thresholds is not None:
            values = self.thresholds
            if not isinstance(values, (list, tuple)) or len(values) != len(levels) - 1:
                raise ValueError(
                    f"{len(levels)} levels need {len(levels) - 1} thresholds, got {values!r}; calibrate them "
                    "with tb.adaptive.calibrate_per_image(model, images, ...)"
                )
            for t in values:
                if isinstance(t, bool) or not isinstance(t, (int, float)):
                    raise ValueError(f"thresholds must be numbers, got {list(values)}")
            values = tuple(float(t) for t in values)
            if any(b < a for a, b in zip(values, values[1:], strict=False)):
                raise ValueError(f"thresholds must not decrease, got {list(values)}")
            object.__setattr__(self, "thresholds", values)
        if self.policy == "predictor" and self.predictor is None:
            raise ValueError("policy='predictor' needs predictor=PATH of a trained budget predictor")
        if self.predictor is not None and not isinstance(self.predictor, str):
            object.__setattr__(self, "predictor", str(self.predictor))  # pathlib.Path
        for name in ("target_flops", "calibrated_flops"):
            value = getattr(self, name)
            if value is not None:
                _check_positive_number(name, value)
        if self.reducer not in PER_IMAGE_REDUCERS:
            raise ValueError(f"reducer must be one of {list(PER_IMAGE_REDUCERS)}, got {self.reducer!r}")
        for name in ("prop_attn", "anchor"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in ("levels", "thresholds"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @property
    def is_identity(self) -> bool:
        """Never certain: images may run at any level."""
        return False
