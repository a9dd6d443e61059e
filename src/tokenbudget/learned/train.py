"""Training DynamicViT predictors by distillation from the same model with all its tokens.

The backbone is frozen; only the predictors learn. Per batch:

* teacher: the unpatched model's token features (all tokens, no gradient);
* student: a patched copy whose predictors take hard Gumbel-softmax decisions (straight-through),
  masking pruned tokens out of attention (see :mod:`tokenbudget.strategies.dynamicvit`);
* loss = ``w_out * L_out + w_tok * L_tok + lam * sum_s L_budget_s`` with
  - ``L_out``: the output distillation. The embedded DINOv2 has no classifier, so there is no
    class distribution to take a KL of; the output is the feature the quality harness uses (class
    token joined with the mean of the kept non-prefix tokens), L2-normalised, and ``L_out`` is
    the squared distance of the normalised features, 2 (1 - cosine);
  - ``L_tok``: MSE between student and teacher output tokens over the tokens the student kept;
  - ``L_budget_s = mean_b (kept fraction of image b after stage s - keep**(s+1))**2``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import find_adapter
from ..config import DynamicViT
from ..context import PatchContext
from ..patch import install_strategy, last_state
from ..strategies.dynamicvit import DynamicViTStrategy
from ..strategies.keep_predictor import PredictorSet
from .report import loss_summary, tail_mean


@dataclass
class TrainReport:
    """What a training run did: losses per step (total and parts) and the kept fractions."""

    steps: int
    seconds: float
    loss: list[float] = field(default_factory=list)
    out_loss: list[float] = field(default_factory=list)
    token_loss: list[float] = field(default_factory=list)
    budget_loss: list[float] = field(default_factory=list)
    kept_fraction: list[list[float]] = field(default_factory=list)  # per step, per stage

    def summary(self) -> dict:
        return {
            **loss_summary(self.steps, self.seconds, self.loss),
            "out_loss_last_mean": tail_mean(self.out_loss),
            "token_loss_last_mean": tail_mean(self.token_loss),
            "budget_loss_last_mean": tail_mean(self.budget_loss),
            "kept_fraction_last": self.kept_fraction[-1],
        }


def harness_feature(tokens: Tensor, weights: Tensor, num_prefix: int) -> Tensor:
    """[B, 2C]: class token joined with the ``weights``-weighted mean of the non-prefix tokens.

    ``tokens`` [B, N, C]; ``weights`` [B, N - num_prefix, 1] (keep decisions, or ones)."""
    mean = (tokens[:, num_prefix:] * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-6)
    return torch.cat([tokens[:, 0], mean], dim=1)


def distillation_losses(
    student: Tensor, teacher: Tensor, decision: Tensor, num_prefix: int
) -> tuple[Tensor, Tensor]:
    """(L_out, L_tok) for output tokens ``student``/``teacher`` [B, N, C] and the final cumulative
    keep ``decision`` [B, N - num_prefix, 1] of the student."""
    ones = torch.ones_like(decision)
    f_s = F.normalize(harness_feature(student, decision, num_prefix), dim=-1)
    f_t = F.normalize(harness_feature(teacher, ones, num_prefix), dim=-1)
    out_loss = (f_s - f_t).pow(2).sum(dim=-1).mean()
    per_token = (student[:, num_prefix:] - teacher[:, num_prefix:]).pow(2).mean(dim=-1, keepdim=True)
    token_loss = (per_token * decision).sum() / decision.sum().clamp_min(1.0)
    return out_loss, token_loss


def budget_loss(stage_decisions: Sequence[Tensor], keep: float) -> tuple[Tensor, list[float]]:
    """sum_s mean_b (kept fraction after stage s - keep**(s+1))**2, and the batch's kept fractions."""
    total, kept = 0.0, []
    for s, decision in enumerate(stage_decisions):  # [B, M, 1]
        fraction = decision.mean(dim=(1, 2))  # [B]
        total = total + (fraction - keep ** (s + 1)).pow(2).mean()
        kept.append(float(fraction.detach().mean()))
    return total, kept


def train_predictors(
    model: nn.Module,
    images: Tensor,
    *,
    keep: float = 0.7,
    layers: Sequence[int] = (3, 6, 9),
    steps: int = 60,
    batch_size: int = 8,
    lr: float = 1e-3,
    out_weight: float = 1.0,
    token_weight: float = 1.0,
    budget_weight: float = 2.0,
    hidden: int | None = None,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: Callable[[int, dict], None] | None = None,
    info: dict | None = None,
) -> tuple[PredictorSet, TrainReport]:
    """Train DynamicViT predictors for ``model`` (a timm ViT with a class token, left unchanged) on
    ``images`` [N, 3, H, W] (normalised for the model; labels are not used).

    Runs ``steps`` optimizer steps on batches drawn in a seeded shuffled order (or stops early after
    ``max_seconds``); ``progress(step, losses)`` is called after each step. Returns the predictors
    (in eval mode) and a :class:`TrainReport`.
    """
    config = DynamicViT(keep=keep, layers=tuple(layers))  # validates keep and layers
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if len(images) == 0:
        raise ValueError("no training images")
    torch.manual_seed(seed)
    teacher = model.eval()
    student = copy.deepcopy(model).eval()
    student.requires_grad_(False)
    adapter = find_adapter(student)
    predictors = PredictorSet(
        adapter.embed_dim, adapter.num_layers, config.layers, keep, hidden, info=dict(info or {})
    )
    strategy = DynamicViTStrategy(config, adapter.num_layers, predictors)
    strategy.check_model(adapter)
    install_strategy(
        student, adapter, PatchContext(strategy, adapter.num_prefix, adapter.num_layers, adapter.grid)
    )
    prefix = adapter.num_prefix
    teacher_adapter, student_adapter = find_adapter(teacher), adapter
    optimizer = torch.optim.AdamW(predictors.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    report = TrainReport(steps=0, seconds=0.0)
    start = time.perf_counter()
    predictors.train()
    cursor = 0
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        batch = images[order[cursor : cursor + batch_size]]
        cursor += batch_size
        with torch.no_grad():
            target = teacher_adapter.features(batch)  # [B, N, C]
        strategy.stage_decisions = []
        tokens = student_adapter.features(batch)  # [B, N, C], pruned tokens masked, not removed
        decision = last_state(student).decision[:, prefix:]  # [B, M, 1]
        out_loss, token_loss = distillation_losses(tokens, target, decision, prefix)
        ratio_loss, kept = budget_loss(strategy.stage_decisions, keep)
        loss = out_weight * out_loss + token_weight * token_loss + budget_weight * ratio_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report.loss.append(float(loss.detach()))
        report.out_loss.append(float(out_loss.detach()))
        report.token_loss.append(float(token_loss.detach()))
        report.budget_loss.append(float(ratio_loss.detach()))
        report.kept_fraction.append(kept)
        report.steps = step + 1
        if progress is not None:
            progress(step + 1, {"loss": report.loss[-1], "kept": [round(k, 2) for k in kept]})
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    report.seconds = time.perf_counter() - start
    predictors.eval()
    predictors.info.update({"train": report.summary()})
    if math.isnan(report.loss[-1]):
        raise ValueError("predictor training diverged (NaN loss); lower lr")
    return predictors, report
