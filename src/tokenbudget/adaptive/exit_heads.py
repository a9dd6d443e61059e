"""Light exit classifiers on the class token of a frozen ViT, their training and their files.

An exit after block ``l`` (0-based) is ``LayerNorm(C) -> Linear(C, K)`` on the class token that
block ``l`` outputs, the residual stream *before* the model's final norm. Each head has its own
LayerNorm rather than borrowing the model's final ``norm``: the statistics of the residual
stream change with depth, and a fresh (trainable) LayerNorm fits each depth. Heads train on
class tokens captured once per dataset (:func:`tokenbudget.adaptive.blockwise.layer_class_tokens`,
cached), so training takes seconds and never runs the backbone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..parts import load_weights, read_part, save_part

FORMAT = "tokenbudget-exit-heads"
VERSION = 1
_WHAT = "exit heads"
_HINT = "train them with: tokenbudget train-exits --out PATH"


class ExitHeads(nn.Module):
    """One ``LayerNorm -> Linear`` classifier per exit layer.

    Attributes:
        embed_dim, depth: width and block count of the model the heads belong to.
        layers: the blocks (0-based, sorted) whose class token each head reads.
        num_classes: classes the heads predict.
        info: free-form training record (model, data, accuracy), saved in the JSON.
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        layers: Sequence[int],
        num_classes: int,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        layers = tuple(sorted(int(i) for i in layers))
        if not layers or len(set(layers)) != len(layers) or layers[0] < 0 or layers[-1] >= depth:
            raise ValueError(
                f"exit layers must be distinct block indices in [0, {depth - 1}], got {list(layers)}"
            )
        if num_classes < 2:
            raise ValueError(f"exit heads need at least 2 classes, got {num_classes}")
        self.embed_dim, self.depth, self.num_classes = int(embed_dim), int(depth), int(num_classes)
        self.layers = layers
        self.info = dict(info or {})
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(self.embed_dim), nn.Linear(self.embed_dim, self.num_classes))
            for _ in layers
        )

    def head(self, layer: int) -> nn.Module:
        """The head reading the class token after block ``layer``."""
        if layer not in self.layers:
            raise ValueError(f"no exit head after block {layer}; the heads are at {list(self.layers)}")
        return self.heads[self.layers.index(layer)]

    def forward(self, class_tokens: Tensor) -> Tensor:
        """Logits [B, E, K] of every head from class tokens [B, E, C] (one per exit, in ``layers`` order)."""
        if class_tokens.ndim != 3 or class_tokens.shape[1:] != (len(self.layers), self.embed_dim):
            raise ValueError(
                f"expected class tokens [B, {len(self.layers)}, {self.embed_dim}], "
                f"got {tuple(class_tokens.shape)}"
            )
        return torch.stack([h(class_tokens[:, i]) for i, h in enumerate(self.heads)], dim=1)

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "layers": list(self.layers),
            "num_classes": self.num_classes,
            "info": self.info,
        }

    def check_model(self, model: nn.Module) -> None:
        """``ValueError`` when these heads were trained for a model of another width or depth."""
        from ..adapters import find_adapter

        adapter = find_adapter(model)
        depth, width = adapter.num_layers, adapter.embed_dim
        if (depth, width) != (self.depth, self.embed_dim):
            raise ValueError(
                f"exit heads were trained for a model with {self.depth} blocks of width {self.embed_dim}, "
                f"this one has {depth} blocks of width {width}; train heads for it with tokenbudget train-exits"
            )


def save_exit_heads(heads: ExitHeads, path: str | Path) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` and ``STEM.json``; returns both paths."""
    return save_part(heads, heads.config(), path, _WHAT)


def load_exit_heads(path: str | Path) -> ExitHeads:
    """Heads written by :func:`save_exit_heads` (``path``: STEM, STEM.safetensors or STEM.json)."""
    meta, state, weights = read_part(path, FORMAT, VERSION, _WHAT, _HINT)
    heads = ExitHeads(meta["embed_dim"], meta["depth"], meta["layers"], meta["num_classes"], meta.get("info"))
    load_weights(heads, state, weights, _WHAT)
    return heads.eval()


def train_exit_heads(
    layer_tokens: Tensor,
    labels: Tensor,
    layers: Sequence[int],
    *,
    depth: int | None = None,
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    info: dict[str, Any] | None = None,
) -> ExitHeads:
    """Train one head per exit layer on cached class tokens, every head on its own cross entropy.

    ``layer_tokens`` [N, D', C] holds the class token after each block in rows ``0..depth-1``;
    rows after them (:func:`~tokenbudget.adaptive.blockwise.layer_class_tokens` appends the final
    feature) are ignored. ``depth`` (the model's block count) defaults to ``D'``. ``labels`` [N] are
    class indices. ``progress(epoch, loss)`` is called after each epoch.
    """
    if layer_tokens.ndim != 3:
        raise ValueError(f"expected layer tokens [N, depth, C], got shape {tuple(layer_tokens.shape)}")
    if labels.shape != layer_tokens.shape[:1]:
        raise ValueError(f"{len(layer_tokens)} samples but labels of shape {tuple(labels.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    info = dict(info or {})
    depth = int(depth if depth is not None else layer_tokens.shape[1])
    if depth > layer_tokens.shape[1]:
        raise ValueError(f"depth {depth} but class tokens of only {layer_tokens.shape[1]} blocks")
    torch.manual_seed(seed)  # the heads' initialisation
    heads = ExitHeads(layer_tokens.shape[2], depth, layers, max(int(labels.max()) + 1, 2), info=info)
    inputs = layer_tokens[:, list(heads.layers)].float()  # [N, E, C]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    start = time.perf_counter()
    heads.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            logits = heads(inputs[idx])  # [b, E, K]
            # Sum over exits: every head learns its own depth, none is traded against another.
            loss = F.cross_entropy(logits.flatten(0, 1), labels[idx].repeat_interleave(len(heads.layers)))
            loss = loss * len(heads.layers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        schedule.step()
        if progress is not None:
            progress(epoch + 1, total / len(inputs))
    heads.eval()
    with torch.no_grad():
        accuracy = (heads(inputs).argmax(-1) == labels[:, None]).float().mean(0)
    heads.info.update(
        {
            "train_seconds": round(time.perf_counter() - start, 1),
            "train_accuracy": [round(float(a), 4) for a in accuracy],
            "epochs": epochs,
        }
    )
    return heads
