"""Visual token compression for vision-language models: one contract for every compressor.

Every compressor takes vision tokens [B, N, C] (optionally with ``num_prefix`` class/register tokens
in front and the patch ``grid``) and a budget ``k`` (one int, or one per image) and returns a
:class:`CompressedTokens` with ``.tokens`` ([B, k, C], or a list when budgets differ) and
``.assignment`` ([B, N], the output each input token went into, -1 where dropped).

Compressors: :func:`pool` (2-D grid pooling), :func:`select` (query-aware: the k tokens most
relevant to a vector, an image exemplar (:func:`exemplar_query`) or text (:class:`ProjectedTextQuery`,
:class:`OpenCLIPTextQuery`)), and the learned :class:`Resampler` (Perceiver-style, nested budgets)
and :class:`TokenAutoencoder` (trained by :func:`train_compressor`, saved by :func:`save_compressor`).
"""

from .autoencoder import TokenAutoencoder
from .base import CompressedTokens, check_budget, check_tokens, infer_grid
from .compressor_io import load_compressor, save_compressor
from .latent import LatentCompressor
from .pooling import pool
from .resampler import Resampler
from .select import exemplar_query, select, select_by_scores
from .text import (
    MiniLMTextEncoder,
    OpenCLIPTextQuery,
    ProjectedTextQuery,
    TextProjection,
    load_text_projection,
    save_text_projection,
)
from .train import train_compressor

__all__ = [
    "CompressedTokens",
    "LatentCompressor",
    "MiniLMTextEncoder",
    "OpenCLIPTextQuery",
    "ProjectedTextQuery",
    "Resampler",
    "TextProjection",
    "TokenAutoencoder",
    "check_budget",
    "check_tokens",
    "exemplar_query",
    "infer_grid",
    "load_compressor",
    "load_text_projection",
    "pool",
    "save_compressor",
    "save_text_projection",
    "select",
    "select_by_scores",
    "train_compressor",
]
