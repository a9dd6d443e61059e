"""Perceiver-style resampler: k learned queries cross-attend to the vision tokens.

The resampler is a :class:`~tokenbudget.vlm.latent.LatentCompressor` trained to keep what the
full token set carries (``tokenbudget train-compressor --kind resampler``, see
:mod:`tokenbudget.vlm.train`): its outputs are in the backbone's token space, the mean of the
first k outputs is distilled towards the mean of all patch tokens (the pooled feature a k-NN or a
pooling head reads), and a one-layer decoder must rebuild all patch tokens from them.

Budgets are nested: with budget k the first k of its ``k_max`` queries run, and the first k' outputs
of budget k equal the outputs of budget k'. ``.assignment``: each patch token goes to the output
whose query gave it the largest head-averaged attention weight in the last cross-attention layer
(among the first k queries); prefix tokens pass through as outputs 0..num_prefix-1.

    rs = tb.vlm.load_compressor("compressors/dinov2_small_resampler")
    out = rs.compress(tokens, k=64, num_prefix=1)   # tokens [B, 257, 384] -> out.tokens [B, 65, 384]
"""

from __future__ import annotations

from typing import Any

from .latent import LatentCompressor


class Resampler(LatentCompressor):
    """A :class:`LatentCompressor` of kind "resampler" (a light one-layer decoder by default)."""

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        k_max: int,
        *,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        decoder_depth: int = 1,
        num_prefix: int = 1,
        info: dict[str, Any] | None = None,
        kind: str = "resampler",
    ) -> None:
        if kind != "resampler":
            raise ValueError(f"a Resampler has kind 'resampler', got {kind!r}")
        super().__init__(
            dim,
            grid,
            k_max,
            width=width,
            depth=depth,
            heads=heads,
            decoder_depth=decoder_depth,
            kind=kind,
            num_prefix=num_prefix,
            info=info,
        )
