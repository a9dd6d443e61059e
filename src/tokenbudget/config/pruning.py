"""Configs of the pruning methods: a per-stage keep ratio at chosen blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import ReductionConfig


def _check_stages(name: str, keep: Any, layers: Any) -> tuple[int, ...]:
    """Validate a per-stage keep ratio and stage layers; returns the layers as a sorted tuple."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(
            f"{name}: keep is the fraction of tokens kept at each pruning layer, in (0, 1], got {keep!r}"
        )
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = (layers,)
    if not isinstance(layers, (list, tuple)) or any(
        isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers
    ):
        raise ValueError(f"{name}: layers must be block indices (ints >= 0), e.g. (3, 6, 9); got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}: layers must not repeat, got {list(layers)}")
    return tuple(sorted(layers))


@dataclass(frozen=True)
class Prune(ReductionConfig):
    """Training-free attention pruning (EViT, Liang et al., ICLR 2022).

    After the attention of each block in ``layers`` the non-prefix tokens are ranked by the class
    token's attention to them (head average; only the class query's row is computed, so the fused
    attention kernel stays on) and the best ``ceil(keep * M)`` of the ``M`` that entered are kept.

    ``keep`` is EViT's per-stage keep ratio, not the final fraction of ``ToMe(keep=...)``: stages
    compound, so ``Prune(keep=0.7)`` with three stages leaves about 0.7**3 = 34 % of the tokens after
    the last stage (and all of them before the first). Compare methods at equal FLOPs, which
    ``tokenbudget bench`` and ``tokenbudget eval`` report for every condition.

    Args:
        keep: fraction of the non-prefix tokens kept at each pruning layer, in (0, 1].
        layers: 0-based indices of the blocks after whose attention tokens are pruned.
        fuse: the pruned tokens become one extra token, their class-attention-weighted average,
            whose size is the sum of theirs (size-weighted pooling and proportional attention then
            count it as every patch it stands for); it competes like any token at later stages.
        prop_attn: add log(token size) to the attention logits once a fused token exists.

    Prefix tokens (class, distillation, registers) are always kept. Models without a class token
    are refused with a ``ValueError`` (there is no class attention to rank by).
    """

    method: ClassVar[str] = "prune"

    keep: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    fuse: bool = True
    prop_attn: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_stages("Prune", self.keep, self.layers))
        for flag in ("fuse", "prop_attn"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"Prune: {flag} must be True or False, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "layers": list(self.layers)}

    @property
    def is_identity(self) -> bool:
        """True when nothing is ever pruned (keep=1 or no layers)."""
        return self.keep == 1.0 or not self.layers


@dataclass(frozen=True)
class DynamicViT(ReductionConfig):
    """Learned token pruning (DynamicViT, Rao et al., NeurIPS 2021) with trained predictors.

    At each block in ``layers`` a small predictor (an MLP over each token's feature joined with
    the mean of the kept tokens) scores the tokens after the block's attention; the best
    ``ceil(keep * M)`` of the ``M`` non-prefix tokens that entered are kept and the rest removed
    before the MLP. ``keep`` is per stage and compounds, as in :class:`Prune` without fusion, so
    both leave the same token counts. Prefix tokens are always kept.

    Args:
        keep: fraction of the non-prefix tokens kept at each pruning layer, in (0, 1].
        layers: 0-based indices of the blocks after whose attention tokens are pruned; must be the
            layers the predictor was trained for.
        predictor: path of trained predictors (``tokenbudget train-predictor`` writes
            ``NAME.safetensors`` and ``NAME.json``; either path, or the stem, works). Required to
            patch a model; a predictor trained for another model width, depth or layer set is refused.
    """

    method: ClassVar[str] = "dynamicvit"

    keep: float = 0.7
    layers: tuple[int, ...] = (3, 6, 9)
    predictor: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_stages("DynamicViT", self.keep, self.layers))
        if self.predictor is not None and not isinstance(self.predictor, str):
            object.__setattr__(self, "predictor", str(self.predictor))  # pathlib.Path

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "layers": list(self.layers)}

    @property
    def is_identity(self) -> bool:
        """True when nothing is ever pruned (keep=1 or no layers)."""
        return self.keep == 1.0 or not self.layers
