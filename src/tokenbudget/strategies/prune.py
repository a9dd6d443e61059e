"""Training-free attention pruning (EViT): keep the tokens the class token attends to most."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import Prune
from ..ops.prune import fuse_tokens, select_tokens, top_k_split
from ..state import TokenState
from .base import register
from .stages import StageStrategy, stage_keep_count


@register(Prune)
class PruneStrategy(StageStrategy):
    """At each stage keeps ``ceil(keep * M)`` non-prefix tokens by class attention; with ``fuse`` the
    rest become one size-carrying token, their attention-weighted average, appended at the end."""

    #: the adapter hands :meth:`reduce` the class token's attention row [B, N] of this block.
    needs_class_attention = True

    @property
    def extra_token(self) -> bool:  # type: ignore[override]
        return self.config.fuse

    def check_model(self, adapter: Any) -> None:
        if not getattr(adapter, "supports_class_attention", False):
            raise ValueError(
                f"Prune ranks tokens by class-token attention, which the {adapter.name} adapter does not "
                "capture (timm models only); use tb.ToMe or tb.RandomDrop on this model"
            )
        if not adapter.has_class_token:
            raise ValueError(
                "Prune ranks tokens by class-token attention, but this model has no class token "
                "(class_token=False); use tb.ToMe, tb.RandomDrop or a model with a class token"
            )

    def reduce(self, x: Tensor, cls_attn: Tensor, state: TokenState, layer: int) -> Tensor:
        """Prune tokens ``x`` [B, N, C] by ``cls_attn`` [B, N] (class token's attention, the same
        logits as the block used); updates ``state.size`` in place."""
        prefix = state.num_prefix
        mergeable = x.shape[1] - prefix
        kept = stage_keep_count(mergeable, self.config.keep)
        keep_idx, drop_idx = top_k_split(cls_attn[:, prefix:], kept, prefix)  # [B, p + k], [B, M - k]
        out = select_tokens(x, keep_idx)
        size = None if state.size is None else select_tokens(state.size, keep_idx)
        if self.config.fuse and drop_idx.shape[1] > 0:
            fused, fused_size = fuse_tokens(x, state.size, drop_idx, cls_attn)  # [B, 1, C], [B, 1, 1]
            out = torch.cat([out, fused], dim=1)
            if size is None:
                size = torch.ones(x.shape[0], out.shape[1] - 1, 1, device=x.device)
            size = torch.cat([size, fused_size], dim=1)
        state.size = size
        return out
