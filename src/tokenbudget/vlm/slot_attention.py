"""Learned slots: Slot Attention (Locatello et al., 2020) on frozen backbone tokens.

The module groups patch tokens [B, N, C] into S slots by iterative competitive attention: the
attention is a softmax over *slots* (slots compete for each token), normalised over tokens into a
weighted mean per slot, which updates each slot through a GRU cell and a residual MLP. Initial slots
are drawn from a learned Gaussian, so the slot count is free at inference.

Training (:func:`train_slot_attention`) is by reconstruction, as in DINOSAUR (Seitzer et al.,
ICLR 2023), with a light decoder that fits a CPU. What the slots see and reconstruct are the points
the training-free slots cluster: ``[L2-normalised token, position_weight * (y, x)]``
(:func:`~tokenbudget.vlm.slots.slot_points`). An MLP broadcasts each slot over the patch grid (slot +
learned position embedding) to an alpha logit per patch; alphas are a softmax over slots; each slot
has one point (a linear map of the slot), and patch n is reconstructed as sum_s alpha[s, n] *
point_s (squared error summed over channels). One point per slot means a single slot cannot explain
a varied image, and the position part makes slots spatially compact: with a decoder that varies the
feature with position, or with features alone, short CPU training collapsed to one or two slots
(foreground / background). The slot masks are the decoder alphas;
:func:`learned_slots` turns their argmax into a :class:`~tokenbudget.vlm.slots.Slots`.

Files: ``STEM.safetensors`` (weights) and ``STEM.json`` (config and training record), like the
DynamicViT predictors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..learned.report import loss_summary
from ..parts import load_weights, read_part, save_part
from .base import check_tokens, infer_grid
from .slots import Slots, slot_points

FORMAT = "tokenbudget-slot-attention"
VERSION = 1


class SlotAttention(nn.Module):
    """Slot Attention encoder and MLP broadcast decoder over tokens of width ``dim`` on ``grid``."""

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int] = (16, 16),
        slot_dim: int = 64,
        hidden: int = 128,
        iters: int = 3,
        num_slots: int = 6,
        position_weight: float = 2.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.grid, self.slot_dim, self.hidden = int(dim), tuple(grid), int(slot_dim), int(hidden)
        self.iters, self.num_slots, self.position_weight = int(iters), int(num_slots), float(position_weight)
        self.info = dict(info or {})
        points = dim + 2  # L2-normalised token joined with weighted (y, x): see slot_points
        self.input_norm = nn.LayerNorm(points)
        self.input_mlp = nn.Sequential(nn.Linear(points, hidden), nn.ReLU(), nn.Linear(hidden, slot_dim))
        self.to_k = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_v = nn.Linear(slot_dim, slot_dim, bias=False)
        self.to_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.slot_norm = nn.LayerNorm(slot_dim)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp_norm = nn.LayerNorm(slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, slot_dim))
        self.slot_mu = nn.Parameter(torch.randn(1, 1, slot_dim) * 0.02)
        self.slot_log_sigma = nn.Parameter(torch.zeros(1, 1, slot_dim))
        h, w = self.grid
        self.position = nn.Parameter(torch.randn(1, h * w, slot_dim) * 0.02)  # decoder's [1, N, D]
        self.decoder = nn.Sequential(
            nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        self.to_features = nn.Linear(slot_dim, points)  # each slot's one point (its prototype)

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "dim": self.dim,
            "grid": list(self.grid),
            "slot_dim": self.slot_dim,
            "hidden": self.hidden,
            "iters": self.iters,
            "num_slots": self.num_slots,
            "position_weight": self.position_weight,
            "info": self.info,
        }

    def points(self, patches: Tensor) -> Tensor:
        """[B, N, C + 2] what the slots see and reconstruct: normalised tokens and weighted positions."""
        return slot_points(patches, self.grid, self.position_weight)

    def encode(self, patches: Tensor, num_slots: int | None = None, generator: torch.Generator | None = None):
        """Slots [B, S, D] and the last iteration's attention [B, S, N] (softmax over slots)."""
        num_slots = num_slots or self.num_slots
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if patches.shape[-1] != self.dim:
            raise ValueError(
                f"tokens have width {patches.shape[-1]}, this Slot Attention was trained for {self.dim}"
            )
        inputs = self.input_mlp(self.input_norm(self.points(patches)))  # [B, N, D]
        k, v = self.to_k(inputs), self.to_v(inputs)
        noise = torch.randn(
            patches.shape[0], num_slots, self.slot_dim, generator=generator, device=patches.device
        )
        slots = self.slot_mu + self.slot_log_sigma.exp() * noise  # [B, S, D]
        scale = self.slot_dim**-0.5
        for _ in range(self.iters):
            q = self.to_q(self.slot_norm(slots))
            attn = (q @ k.transpose(1, 2) * scale).softmax(dim=1)  # [B, S, N], slots compete per token
            weights = attn / attn.sum(-1, keepdim=True).clamp_min(1e-8)
            updates = weights @ v  # [B, S, D]
            slots = self.gru(updates.reshape(-1, self.slot_dim), slots.reshape(-1, self.slot_dim)).view_as(
                slots
            )
            slots = slots + self.mlp(self.mlp_norm(slots))
        return slots, attn

    def decode(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction [B, N, C + 2] of :meth:`points`, alpha masks [B, S, N] softmaxed over slots)."""
        position = self.position
        if position.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError("position embedding does not match the grid")
        alpha = self.decoder(slots[:, :, None, :] + position[:, None])[..., 0].softmax(dim=1)  # [B, S, N]
        # One feature per slot, mixed by the masks: a single slot cannot explain a varied image, so
        # the slots must split it (a decoder that also varies the feature with position lets one
        # slot reconstruct everything, and short CPU training collapses to it).
        return alpha.transpose(1, 2) @ self.to_features(slots), alpha  # [B, N, C + 2]

    def forward(self, patches: Tensor, num_slots: int | None = None, generator=None):  # noqa: ANN001, ANN201
        slots, _ = self.encode(patches, num_slots, generator)
        reconstruction, alpha = self.decode(slots)
        return reconstruction, alpha, slots


def learned_slots(
    model: SlotAttention,
    tokens: Tensor,
    num_slots: int | None = None,
    *,
    num_prefix: int = 0,
    seed: int = 0,
) -> Slots:
    """Slots of ``tokens`` [B, N, C] from a trained :class:`SlotAttention`: each patch goes to the slot
    with the largest decoder alpha. ``num_slots`` may differ from the count it was trained with."""
    batch, n, _ = check_tokens(tokens, num_prefix)
    if n - num_prefix != math.prod(model.grid):
        raise ValueError(
            f"this Slot Attention was trained on a {model.grid} grid ({math.prod(model.grid)} patch tokens), "
            f"the tokens have {n - num_prefix} patch tokens (N - num_prefix)"
        )
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    with torch.no_grad():
        _, alpha, _ = model(tokens[:, num_prefix:].float(), num_slots, generator)
    return Slots.from_assignment(alpha.argmax(1), model.grid)


@dataclass
class SlotTrainReport:
    steps: int
    seconds: float
    loss: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return loss_summary(self.steps, self.seconds, self.loss)


def train_slot_attention(
    tokens: Tensor,
    *,
    num_prefix: int = 1,
    num_slots: int = 6,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 4e-4,
    slot_dim: int = 64,
    hidden: int = 128,
    iters: int = 3,
    position_weight: float = 2.0,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: Callable[[int, float], None] | None = None,
    info: dict | None = None,
) -> tuple[SlotAttention, SlotTrainReport]:
    """Train Slot Attention to reconstruct frozen tokens [M, num_prefix + N, C] (prefix dropped).

    Adam with a linear warm-up over the first tenth of the steps; batches drawn in a seeded
    shuffled order; stops after ``steps`` or ``max_seconds``. ``progress(step, loss)`` after each step.
    """
    _, n, dim = check_tokens(tokens, num_prefix)
    grid = infer_grid(n - num_prefix, None)
    patches = tokens[:, num_prefix:].float()
    torch.manual_seed(seed)
    model = SlotAttention(dim, grid, slot_dim, hidden, iters, num_slots, position_weight, info)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, steps // 10)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(patches), generator=generator)
    report, start, cursor = SlotTrainReport(0, 0.0), time.perf_counter(), 0
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(patches), generator=generator), 0
        batch = patches[order[cursor : cursor + batch_size]]
        cursor += batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        reconstruction, _, _ = model(batch, generator=generator)
        loss = (reconstruction - model.points(batch)).square().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        report.loss.append(float(loss.detach()))
        report.steps = step + 1
        if progress is not None:
            progress(step + 1, report.loss[-1])
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    report.seconds = time.perf_counter() - start
    model.info = {**model.info, **report.summary()}
    return model.eval(), report


def save_slot_attention(model: SlotAttention, path: str | Path) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` and ``STEM.json``; returns both paths."""
    return save_part(model, model.config(), path, "Slot Attention")


def load_slot_attention(path: str | Path) -> SlotAttention:
    """Load a model written by :func:`save_slot_attention` (STEM, STEM.safetensors or STEM.json)."""
    hint = "train one with: tokenbudget train-slots --out PATH"
    meta, state, weights = read_part(path, FORMAT, VERSION, "Slot Attention model", hint)
    model = SlotAttention(
        meta["dim"],
        tuple(meta["grid"]),
        meta["slot_dim"],
        meta["hidden"],
        meta["iters"],
        meta["num_slots"],
        meta["position_weight"],
        meta.get("info"),
    )
    load_weights(model, state, weights, "Slot Attention model")
    return model.eval()
