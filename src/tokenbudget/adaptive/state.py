"""AdaptivePatchState: what one forward of an adaptively patched model did to each image."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class AdaptivePatchState:
    """Per-image record of one forward under :class:`tokenbudget.AdaptivePatch` (input order).

    Attributes:
        scores: [B] complexity scores.
        patch_sizes: [B] patch side in px each image ran at (``mode="resolution"``: the patch size
            it stands in for; the image was resized to ``grid * native_patch`` px instead).
        grids: per image, (rows, cols) of its patch grid.
        num_prefix: class / distillation / register tokens in front of every sequence.
        num_layers: blocks of the model.
        mode: ``"patch"`` (resampled patch embedding) or ``"resolution"`` (resized input).
    """

    scores: Tensor
    patch_sizes: Tensor
    grids: list[tuple[int, int]]
    num_prefix: int
    num_layers: int
    mode: str

    @property
    def batch_size(self) -> int:
        return len(self.grids)

    @property
    def patch_tokens(self) -> list[int]:
        """Patch tokens of each image (prefix excluded): 64 / 256 / 1024 for DINOv2 at 28 / 14 / 7 px."""
        return [rows * cols for rows, cols in self.grids]

    @property
    def tokens(self) -> list[int]:
        """Tokens of each image entering the first block, prefix included."""
        return [n + self.num_prefix for n in self.patch_tokens]

    @property
    def mean_tokens(self) -> float:
        """Mean tokens per image (prefix included) through every block."""
        return sum(self.tokens) / max(self.batch_size, 1)

    @property
    def tokens_per_layer(self) -> list[float]:
        """Mean tokens per image after each block: blocks do not reduce, so it is constant."""
        return [self.mean_tokens] * self.num_layers

    def summary(self) -> dict:
        """JSON-friendly description (no tensors)."""
        return {
            "batch_size": self.batch_size,
            "mode": self.mode,
            "scores": [round(float(s), 6) for s in self.scores],
            "patch_sizes": [int(p) for p in self.patch_sizes],
            "tokens": self.tokens,
            "mean_tokens": self.mean_tokens,
        }
