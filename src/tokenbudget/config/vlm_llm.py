"""Configs that cut visual tokens inside the language model of a VLM (not before it).

:class:`FastV` (Chen et al. 2024, "An image is worth 1/2 tokens after layer 2") lets every visual
token through the first ``layer`` decoder layers, then keeps, per image, the ``tokens`` visual
tokens that the prompt's last token attends to most at that layer; the others leave the hidden
states and the KV cache of every later layer. ``tb.apply(vlm, tb.FastV(...))`` installs it through
``tokenbudget.adapters.hf_vlm_llm.install_fastv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .vlm import VisualTokens


@dataclass(frozen=True)
class FastV(VisualTokens):
    """FastV: drop low-attention visual tokens inside the LLM from decoder layer ``layer`` on.

    Args:
        tokens: visual tokens per image kept from layer ``layer`` on: a count (e.g. 64) or a fraction
            of each image's visual tokens (e.g. 0.25); 1.0 keeps them all (outputs unchanged).
        layer: the decoder layer K (0-based) at whose input the tokens are scored and cut; layers
            0..K-1 see every token. ``None`` (the default) is resolved when installed, from the
            language model's config: 2 as in the paper, or the last layer that has one before it
            (N-1) when the language model has N <= 2 layers. An explicit layer must be >= 1 (layer 0
            has no attention to score with yet) and smaller than the number of layers (checked when
            installed, with an error naming the valid range).
        allocation: ``"fixed"`` or ``"adaptive"`` (each prompt's total spread over its images in
            proportion to the attention each image receives from the prompt's last token).
    """

    method: ClassVar[str] = "fastv"

    tokens: int | float = 0.5
    layer: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is None:
            return
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(
                f"FastV: layer is the decoder layer (0-based, >= 1) where visual tokens are cut, "
                f"e.g. FastV(tokens=0.5, layer=2) as in the paper, or None for that default; got {self.layer!r}"
            )
