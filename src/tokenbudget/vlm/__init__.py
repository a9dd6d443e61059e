"""Visual token compression for vision-language models: one contract for every compressor.

Every compressor takes vision tokens [B, N, C] (optionally with ``num_prefix`` class/register tokens
in front and the patch ``grid``) and a budget ``k`` (one int, or one per image) and returns a
:class:`CompressedTokens` with ``.tokens`` ([B, k, C], or a list when budgets differ) and
``.assignment`` ([B, N], the output each input token went into, -1 where dropped).
"""

from .base import CompressedTokens, check_budget, check_tokens, infer_grid
from .pooling import pool

__all__ = ["CompressedTokens", "check_budget", "check_tokens", "infer_grid", "pool"]
