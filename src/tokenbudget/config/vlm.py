"""Configs that cut the visual tokens of a vision-language model: what every such config shares.

A VLM config says how many of each image's visual tokens reach the language model (``tokens``: a
count, a fraction of that image's tokens, or with ``allocation="adaptive"`` a per-image spread that
holds the mean) and where they are cut. ``tb.apply(vlm, config)`` installs it on a transformers VLM
(see ``tokenbudget.adapters.hf_vlm``); the method-specific configs subclass :class:`VisualTokens`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..ops.visual_budget import check_visual_budget
from .base import ReductionConfig


@dataclass(frozen=True)
class VisualTokens(ReductionConfig):
    """Base of every VLM visual-token config (not a method itself).

    Args:
        tokens: visual tokens per image that reach the language model: an int (a count, e.g. 64)
            or a float in (0, 1] (a fraction of each image's own visual tokens, e.g. 0.25; 1.0 keeps
            them all and leaves the model's outputs unchanged).
        allocation: ``"fixed"`` (every image gets ``tokens``) or ``"adaptive"`` (the same total
            spread over the images of a call by how varied each image's tokens are; mean held).
    """

    method: ClassVar[str] = ""

    tokens: int | float = 0.25
    allocation: str = "fixed"

    def __post_init__(self) -> None:
        check_visual_budget(type(self).__name__, self.tokens, self.allocation)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @property
    def is_identity(self) -> bool:
        """True when every visual token is kept (``tokens=1.0``)."""
        return isinstance(self.tokens, float) and self.tokens == 1.0
