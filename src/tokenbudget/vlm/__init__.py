"""Visual token compression for vision-language models: one contract for every compressor.

Every compressor takes vision tokens [B, N, C] (optionally with ``num_prefix`` class/register tokens
in front and the patch ``grid``) and a budget ``k`` (one int, or one per image) and returns a
:class:`CompressedTokens` with ``.tokens`` ([B, k, C], or a list when budgets differ) and
``.assignment`` ([B, N], the output each input token went into, -1 where dropped).

Compressors: :func:`pool` (2-D grid pooling), :func:`select` (query-aware: the k tokens most
relevant to a vector, an image exemplar (:func:`exemplar_query`) or text (:class:`ProjectedTextQuery`,
:class:`OpenCLIPTextQuery`)), and the learned :class:`Resampler` (Perceiver-style, nested budgets)
and :class:`TokenAutoencoder` (trained by :func:`train_compressor`, saved by :func:`save_compressor`).

Objects: :func:`cluster_slots` (k-means slots) and :class:`SlotAttention` group tokens into slots;
:func:`allocate` splits a total budget across slots (exact sums); :func:`compress_slots` merges
within each slot to its budget; :class:`Saccade` spends tokens step by step where the query or the
uncertainty points.

A small VLM to measure cuts on answers: :func:`build_tiny_llava` / :func:`train_vqa_llava` build and
train a real ``LlavaForConditionalGeneration`` (frozen DINOv2-S tower) on the shapes VQA set;
:func:`load_tiny_llava` loads a saved one (default folder :func:`vlm_dir`); :func:`answer_questions`
and :func:`per_kind_accuracy` score it.
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
from .autoencoder import TokenAutoencoder
from .base import CompressedTokens, check_budget, check_tokens, infer_grid
from .compressor_io import load_compressor, save_compressor
from .latent import LatentCompressor
from .pooling import pool
from .resampler import Resampler
from .saccade import KnnClassifier, Saccade, SaccadeResult, SaccadeStep, SaccadeTrace
from .select import exemplar_query, select, select_by_scores
from .slot_attention import (
    SlotAttention,
    learned_slots,
    load_slot_attention,
    save_slot_attention,
    train_slot_attention,
)
from .slots import Slots, best_match_iou, cluster_slots, foreground_ari
from .text import (
    MiniLMTextEncoder,
    OpenCLIPTextQuery,
    ProjectedTextQuery,
    TextProjection,
    load_text_projection,
    save_text_projection,
)
from .tiny_llava import build_processor, build_tiny_llava, load_tiny_llava, save_tiny_llava, vlm_dir
from .tiny_llava_train import answer_questions, per_kind_accuracy, train_vqa_llava
from .train import train_compressor

__all__ = [
    "CompressedTokens",
    "KnnClassifier",
    "LatentCompressor",
    "MiniLMTextEncoder",
    "OpenCLIPTextQuery",
    "ProjectedTextQuery",
    "Resampler",
    "Saccade",
    "SaccadeResult",
    "SaccadeStep",
    "SaccadeTrace",
    "SlotAttention",
    "SlotTokens",
    "Slots",
    "TextProjection",
    "TokenAutoencoder",
    "allocate",
    "answer_questions",
    "best_match_iou",
    "build_processor",
    "build_tiny_llava",
    "check_budget",
    "check_tokens",
    "cluster_slots",
    "compress_slots",
    "exemplar_query",
    "foreground_ari",
    "infer_grid",
    "learned_slots",
    "load_compressor",
    "load_slot_attention",
    "load_text_projection",
    "load_tiny_llava",
    "merge_slots",
    "per_kind_accuracy",
    "pool",
    "query_relevance",
    "relevance_weights",
    "save_compressor",
    "save_slot_attention",
    "save_text_projection",
    "save_tiny_llava",
    "select",
    "select_by_scores",
    "slot_complexity",
    "slot_means",
    "train_compressor",
    "train_slot_attention",
    "train_vqa_llava",
    "vlm_dir",
]
