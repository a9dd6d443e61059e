"""Visual token compression for vision-language models: one contract for every compressor.

Every compressor takes vision tokens [B, N, C] (optionally with ``num_prefix`` class/register tokens
in front and the patch ``grid``) and a budget ``k`` (one int, or one per image) and returns a
:class:`CompressedTokens` with ``.tokens`` ([B, k, C], or a list when budgets differ) and
``.assignment`` ([B, N], the output each input token went into, -1 where dropped).
"""

from .autoencoder import TokenAutoencoder
from .base import CompressedTokens, check_budget, check_tokens, infer_grid
from .compressor_io import load_compressor, save_compressor
from .latent import LatentCompressor
from .pooling import pool
from .resampler import Resampler
from .train import train_compressor

__all__ = [
    "CompressedTokens",
    "LatentCompressor",
    "Resampler",
    "TokenAutoencoder",
    "check_budget",
    "check_tokens",
    "infer_grid",
    "load_compressor",
    "pool",
    "save_compressor",
    "train_compressor",
]
