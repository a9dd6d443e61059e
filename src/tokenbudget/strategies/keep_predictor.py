"""DynamicViT's keep/drop predictors and their files (safetensors weights + a JSON config).

A predictor scores each non-prefix token from its own feature joined with a global feature, the
mean over the tokens still kept, so a token is judged against the image it is part of.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..parts import load_weights, read_part, save_part

FORMAT = "tokenbudget-dynamicvit-predictor"
VERSION = 1


class TokenKeepPredictor(nn.Module):
    """Keep/drop log-probabilities [B, M, 2] (index 1 = keep) for tokens [B, M, C].

    ``LayerNorm -> Linear(C, h) -> GELU`` embeds each token; the first half of the embedding is the
    local feature, the mean of the second half over the kept tokens (``keep`` [B, M, 1], soft or
    hard) the global one; an MLP over both gives the two logits.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        if hidden % 4:
            raise ValueError(f"predictor hidden width must be a multiple of 4, got {hidden}")
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        self.score = nn.Sequential(
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
            nn.Linear(hidden // 2, hidden // 4),
            nn.GELU(),
            nn.Linear(hidden // 4, 2),
        )

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        h = self.embed(x)  # [B, M, h]
        local, glob = h.chunk(2, dim=-1)  # [B, M, h/2] each
        if keep is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            glob = (glob * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.score(torch.cat([local, glob.expand_as(local)], dim=-1)).log_softmax(dim=-1)


class PredictorSet(nn.Module):
    """One :class:`TokenKeepPredictor` per pruning layer, with what they were trained for.

    Attributes:
        embed_dim, depth: width and block count of the model the predictors belong to.
        layers: the blocks they prune after (sorted).
        keep: the per-stage keep ratio they were trained for (informational: any keep may be used).
        hidden: predictor width.
        info: free-form training record (model name, steps, losses), saved in the JSON.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        layers: Sequence[int],
        keep: float,
        hidden: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim, self.depth = int(embed_dim), int(depth)
        self.layers = tuple(sorted(int(i) for i in layers))
        self.keep = float(keep)
        self.hidden = int(hidden or embed_dim)
        self.info = dict(info or {})
        self.stages = nn.ModuleList(TokenKeepPredictor(self.embed_dim, self.hidden) for _ in self.layers)

    def for_layer(self, layer: int) -> TokenKeepPredictor:
        return self.stages[self.layers.index(layer)]

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "layers": list(self.layers),
            "keep": self.keep,
            "hidden": self.hidden,
            "info": self.info,
        }

    def check_compatible(
        self, *, embed_dim: int | None = None, depth: int | None = None, layers=None
    ) -> None:
        """``ValueError`` when these predictors were trained for another model or layer set."""
        if depth is not None and depth != self.depth:
            raise ValueError(
                f"predictor was trained for a model with {self.depth} blocks, this one has {depth}; "
                "train one for it with tokenbudget train-predictor"
            )
        if embed_dim is not None and embed_dim != self.embed_dim:
            raise ValueError(
                f"predictor was trained for embed dim {self.embed_dim}, this model has {embed_dim}; "
                "train one for it with tokenbudget train-predictor"
            )
        if layers is not None and tuple(sorted(layers)) != self.layers:
            raise ValueError(
                f"predictor was trained for layers {list(self.layers)}, the config asks for "
                f"{sorted(layers)}; use layers={tuple(self.layers)} or train predictors for those layers"
            )


def save_predictors(predictors: PredictorSet, path: str | Path) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` (weights) and ``STEM.json`` (config); returns both paths."""
    return save_part(predictors, predictors.config(), path, "DynamicViT predictors")


def load_predictors(path: str | Path) -> PredictorSet:
    """Load predictors written by :func:`save_predictors` (path: STEM, STEM.safetensors or STEM.json)."""
    hint = "train one with: tokenbudget train-predictor --out PATH"
    meta, state, weights = read_part(path, FORMAT, VERSION, "DynamicViT predictor", hint)
    predictors = PredictorSet(
        meta["embed_dim"], meta["depth"], meta["layers"], meta["keep"], meta["hidden"], meta.get("info")
    )
    load_weights(predictors, state, weights, "DynamicViT predictor")
    return predictors.eval()
