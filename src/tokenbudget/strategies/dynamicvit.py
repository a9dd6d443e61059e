"""Learned token pruning (DynamicViT): trained predictors choose the tokens to keep.

Two modes, switched by the predictors' ``training`` flag:

* inference (``predictors.eval()``): at each stage the ``ceil(keep * M)`` tokens with the highest
  keep probability are kept and the rest removed, so later blocks run on fewer tokens;
* training (``predictors.train()``): hard Gumbel-softmax decisions with a straight-through
  gradient; nothing is removed (the batch stays rectangular). The cumulative decision [B, N, 1]
  rides on the TokenState and masks pruned tokens out of every later attention as the additive bias
  log(decision + eps) (see :meth:`TokenState.attention_bias`), which is DynamicViT's masked softmax
  with a finite gradient at decision 0, and keeps timm's attention (fused kernel included) as is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import DynamicViT
from ..ops.prune import select_tokens, top_k_split
from ..state import TokenState
from .base import register
from .keep_predictor import PredictorSet, load_predictors
from .stages import StageStrategy, stage_keep_count


@register(DynamicViT)
class DynamicViTStrategy(StageStrategy):
    """Prunes with the predictors of ``config.predictor`` (or ``predictors`` given directly)."""

    def __init__(self, config: Any, num_layers: int, predictors: PredictorSet | None = None) -> None:
        super().__init__(config, num_layers)
        if predictors is None:
            if config.predictor is None:
                raise ValueError(
                    "DynamicViT needs trained predictors: tb.DynamicViT(keep=..., predictor=PATH); train "
                    "them with `tokenbudget train-predictor --out PATH` (eval/bench: --predictor PATH)"
                )
            predictors = load_predictors(config.predictor)
        predictors.check_compatible(depth=num_layers, layers=config.layers)
        self.predictors = predictors
        #: per-stage cumulative decisions [B, M, 1] of the latest training forward (for the budget loss)
        self.stage_decisions: list[Tensor] = []

    @property
    def training(self) -> bool:
        return self.predictors.training

    def check_model(self, adapter: Any) -> None:
        if getattr(adapter, "embed_dim", None) is None:
            raise ValueError(
                f"DynamicViT predictors are trained and run on timm models; the {adapter.name} adapter "
                "is not supported (use tb.ToMe on this model)"
            )
        self.predictors.check_compatible(embed_dim=adapter.embed_dim)

    def plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        if self.training:  # decisions mask tokens instead of removing them
            zeros = [0] * self.num_layers
            return zeros, list(zeros)
        return super().plan(num_tokens, num_prefix)

    def acts_at(self, layer: int, state: TokenState) -> bool:
        """Stage layers act while training too (masking, nothing removed)."""
        if self.training:
            return layer in self.config.layers
        return state.merged_per_layer[layer] > 0

    def reduce(self, x: Tensor, metric: Tensor | None, state: TokenState, layer: int) -> Tensor:
        """Tokens ``x`` [B, N, C] after the attention of stage ``layer``: removes the dropped tokens
        (inference) or updates ``state.decision`` (training)."""
        prefix = state.num_prefix
        predictor = self.predictors.for_layer(layer)
        tokens = x[:, prefix:]  # [B, M, C]
        if self.training:
            return self._mask(x, tokens, predictor, state)
        param = next(predictor.parameters())
        if param.device != x.device or param.dtype != x.dtype:
            self.predictors.to(device=x.device, dtype=x.dtype)
        keep_logp = predictor(tokens)[..., 1]  # [B, M]; every token entering is kept so far
        kept = stage_keep_count(tokens.shape[1], self.config.keep)
        keep_idx, _ = top_k_split(keep_logp, kept, prefix)
        return select_tokens(x, keep_idx)

    def _mask(self, x: Tensor, tokens: Tensor, predictor: torch.nn.Module, state: TokenState) -> Tensor:
        prefix = state.num_prefix
        if state.decision is None:
            previous = torch.ones_like(tokens[..., :1])  # [B, M, 1]
        else:
            previous = state.decision[:, prefix:]
        logp = predictor(tokens, previous)  # [B, M, 2]
        # Hard 0/1 in the forward, the softmax's gradient in the backward (straight-through).
        keep = F.gumbel_softmax(logp, hard=True)[..., 1:] * previous  # [B, M, 1], cumulative
        state.decision = torch.cat([torch.ones_like(x[:, :prefix, :1]), keep], dim=1)  # [B, N, 1]
        self.stage_decisions.append(keep)
        return x
