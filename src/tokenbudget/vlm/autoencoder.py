"""Autoencoder compression: an encoder to k latent tokens and a decoder back to all N tokens.

The encoder is the nested-query encoder of :class:`~tokenbudget.vlm.latent.LatentCompressor`
(k latent queries cross-attend to the patch tokens and to earlier latents); the decoder is P
positional queries (the 2-D sin-cos code of each patch plus a learned bias) cross-attending to the
k latents, two layers by default. It is trained with reconstruction loss only
(``tokenbudget train-compressor --kind autoencoder``): the mean squared error of the rebuilt
patch tokens, per channel standardised, at a budget sampled per step. The latents are the
compressed tokens; they have the backbone's width C but, unlike the resampler's outputs, nothing
ties their mean to the backbone's pooled feature.

``.assignment``: as for the resampler, each patch token goes to the latent whose query gave it the
largest head-averaged attention weight in the last encoder layer (among the first k).

    ae = tb.vlm.load_compressor("compressors/dinov2_small_autoencoder")
    out = ae.compress(tokens, k=16, num_prefix=1)          # out.tokens [B, 17, C]: class + 16 latents
    rebuilt = ae.reconstruct(tokens, k=16, num_prefix=1)   # [B, 256, C]
"""

from __future__ import annotations

from .latent import LatentCompressor


class TokenAutoencoder(LatentCompressor):
    """A :class:`LatentCompressor` of kind "autoencoder" (a two-layer decoder by default)."""

    KIND = "autoencoder"
    DECODER_DEPTH = 2
