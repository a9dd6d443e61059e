"""Visual token compression for vision-language models: one contract for every compressor.

Every compressor takes vision tokens [B, N, C] (optionally with ``num_prefix`` class/register tokens
in front and the patch ``grid``) and a budget ``k`` (one int, or one per image) and returns a
:class:`CompressedTokens` with ``.tokens`` ([B, k, C], or a list when budgets differ) and
``.assignment`` ([B, N], the output each input token went into, -1 where dropped).

Compressors: :func:`pool` (2-D grid pooling) and :func:`select` (query-aware: the k tokens most
relevant to a vector, an image exemplar (:func:`exemplar_query`) or text (:class:`ProjectedTextQuery`,
:class:`OpenCLIPTextQuery`)).
"""

from .base import CompressedTokens, check_budget, check_tokens, infer_grid
from .pooling import pool
from .select import exemplar_query, select, select_by_scores
from .text import (
    MiniLMTextEncoder,
    OpenCLIPTextQuery,
    ProjectedTextQuery,
    TextProjection,
    load_text_projection,
    save_text_projection,
)

__all__ = [
    "CompressedTokens",
    "MiniLMTextEncoder",
    "OpenCLIPTextQuery",
    "ProjectedTextQuery",
    "TextProjection",
    "check_budget",
    "check_tokens",
    "exemplar_query",
    "infer_grid",
    "load_text_projection",
    "pool",
    "save_text_projection",
    "select",
    "select_by_scores",
]
