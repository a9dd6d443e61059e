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

from .latent import LatentCompressor


class Resampler(LatentCompressor):
    """A :class:`LatentCompressor` of kind "resampler" (a light one-layer decoder by default)."""

    KIND = "resampler"
    DECODER_DEPTH = 1
