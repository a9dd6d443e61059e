"""Visual token compression for vision-language models: one contract for every compressor.

Every compressor takes vision tokens [B, N, C] (optionally with ``num_prefix`` class/register tokens
in front and the patch ``grid``) and a budget ``k`` (one int, or one per image) and returns a
:class:`CompressedTokens` with ``.tokens`` ([B, k, C], or a list when budgets differ) and
``.assignment`` ([B, N], the output each input token went into, -1 where dropped).
"""

from .allocate import (
    SlotTokens,
    allocate,
    compress_slots,
    merge_slots,
    query_relevance,
    relevance_weights,
    slot_complexity,
    slot_means,
)
from .base import CompressedTokens, check_budget, check_tokens, infer_grid
from .pooling import pool
from .saccade import KnnClassifier, Saccade, SaccadeResult, SaccadeStep, SaccadeTrace
from .slot_attention import (
    SlotAttention,
    learned_slots,
    load_slot_attention,
    save_slot_attention,
    train_slot_attention,
)
from .slots import Slots, best_match_iou, cluster_slots, foreground_ari

__all__ = [
    "CompressedTokens",
    "KnnClassifier",
    "Saccade",
    "SaccadeResult",
    "SaccadeStep",
    "SaccadeTrace",
    "SlotAttention",
    "SlotTokens",
    "Slots",
    "allocate",
    "best_match_iou",
    "check_budget",
    "check_tokens",
    "cluster_slots",
    "compress_slots",
    "foreground_ari",
    "infer_grid",
    "learned_slots",
    "load_slot_attention",
    "merge_slots",
    "pool",
    "query_relevance",
    "relevance_weights",
    "save_slot_attention",
    "slot_complexity",
    "slot_means",
    "train_slot_attention",
]
