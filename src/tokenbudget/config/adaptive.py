"""Config of adaptive patching: a per-image patch size chosen by image complexity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import ReductionConfig


@dataclass(frozen=True)
class AdaptivePatch(ReductionConfig):
    """Adaptive patching: each image runs at its own patch size, chosen by its complexity score.

    Simple images get coarse patches (few tokens), detailed ones fine patches (many tokens). The
    patch embedding is resampled to each size by FlexiViT's pseudo-inverse resize and the position
    embeddings to each grid; a batch runs as one sub-batch per size (never padded) through the
    model's unchanged blocks, and outputs come back in input order (:mod:`tokenbudget.adaptive`).

    Args:
        patch_sizes: patch sides in px, coarse to fine; ``None``: twice, once and half the model's
            native patch (32 / 16 / 8 for a /16 model: 49 / 196 / 784 patch tokens at 224 px;
            28 / 14 / 7 for DINOv2 /14: 64 / 256 / 1024). Each must divide the input size.
        thresholds: one fewer than ``patch_sizes``, non-decreasing, in [0, 1]: an image with score
            ``s`` gets ``patch_sizes[i]``, ``i`` the number of thresholds ``<= s``. Calibrate them to
            a mean token count with ``tb.adaptive.calibrate``. Not needed with one patch size.
        score: the complexity score (``"detail"``: :func:`tokenbudget.adaptive.detail_score`).
        score_block: tile side of the score in px; ``None``: the model's native patch size.
        mode: ``"patch"`` (resample the patch embedding) or ``"resolution"``: the same token counts
            by resizing each image to ``grid * native_patch`` px and keeping the native patch size.
        target_tokens: the mean patch tokens per image the thresholds were calibrated to (a record
            written by ``tb.adaptive.calibrate``; not used at run time).
        keep: refused without thresholds: ``AdaptivePatch(keep=0.5)`` cannot know which images are
            complex; calibrate with ``tb.adaptive.calibrate(model, images, keep=0.5)``.
    """

    method: ClassVar[str] = "adaptive-patch"
    _modes: ClassVar[tuple[str, ...]] = ("patch", "resolution")

    patch_sizes: tuple[int, ...] | None = None
    thresholds: tuple[float, ...] | None = None
    score: str = "detail"
    score_block: int | None = None
    mode: str = "patch"
    target_tokens: float | None = None
    keep: float | None = None

    def __post_init__(self) -> None:
        from ..ops.complexity import SCORES
        from ..ops.thresholds import check_thresholds

        sizes = self.patch_sizes
        if sizes is not None:
            if isinstance(sizes, int) and not isinstance(sizes, bool):
                sizes = (sizes,)
            if (
                not isinstance(sizes, (list, tuple))
                or not sizes
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in sizes)
            ):
                raise ValueError(
                    f"patch_sizes must be patch sides in px (ints >= 1), e.g. (28, 14, 7); got {sizes!r}"
                )
            if any(b >= a for a, b in zip(sizes, sizes[1:], strict=False)):
                raise ValueError(
                    f"patch_sizes must run coarse to fine (strictly decreasing), got {list(sizes)}"
                )
            object.__setattr__(self, "patch_sizes", tuple(sizes))
        num_sizes = len(self.patch_sizes) if self.patch_sizes is not None else 3
        if self.thresholds is None:
            if num_sizes > 1:
                target = "" if self.keep is None else f", keep={self.keep}"
                raise ValueError(
                    f"AdaptivePatch needs {num_sizes - 1} thresholds for {num_sizes} patch sizes (which images "
                    f"are complex is learnt from images): calibrate them with tb.adaptive.calibrate(model, "
                    f"images{target or ', target_tokens=...'}), or measure with `tokenbudget adaptive-eval`"
                )
        else:
            object.__setattr__(self, "thresholds", check_thresholds(self.thresholds, num_sizes))
        if self.score not in SCORES:
            raise ValueError(f"unknown complexity score {self.score!r}; choose from {', '.join(SCORES)}")
        block = self.score_block
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(
                f"score_block must be an int >= 1 (px) or None (the native patch), got {block!r}"
            )
        if self.mode not in self._modes:
            raise ValueError(
                f"mode must be 'patch' (resample the patch embedding) or 'resolution' (resize the image), "
                f"got {self.mode!r}"
            )
        if self.keep is not None and (
            isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep
        ):
            raise ValueError(
                f"keep must be a positive fraction of the native patch tokens, got {self.keep!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in ("patch_sizes", "thresholds"):
            if data[name] is not None:
                data[name] = list(data[name])
        return data

    @property
    def is_identity(self) -> bool:
        """Never certain: even one patch size may differ from the model's native one."""
        return False
