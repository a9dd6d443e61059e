"""Training a resampler or an autoencoder on a frozen backbone's cached output tokens.

Per step, a batch of patch tokens [B, P, C] is encoded once with all ``k_max`` queries; because the
query attention is causal, the first k outputs of that pass are exactly budget k's outputs, so the
losses are taken at several budgets from one encoder pass: always ``k_max`` and ``budgets_per_step
- 1`` budgets drawn log-uniformly from [1, k_max] (small budgets are sampled as often per octave as
large ones). The loss at budget k:

* resampler: ``feature_weight * L_feat + recon_weight * L_rec`` with
  - ``L_feat = 2 (1 - cos(mean of the k outputs, mean of the P patch tokens))``: the pooled
    feature (what a k-NN or an average-pooling head reads) of the outputs should be the full one's;
  - ``L_rec``: mean squared error of the decoder's P rebuilt tokens, per channel standardised;
* autoencoder: ``L_rec`` only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..learned.report import loss_summary, tail_mean
from .compressor_io import build_compressor
from .latent import KINDS, LatentCompressor


@dataclass
class CompressorTrainReport:
    """Losses per step (total and parts, averaged over the step's budgets) and the wall time."""

    steps: int
    seconds: float
    loss: list[float] = field(default_factory=list)
    feature_loss: list[float] = field(default_factory=list)
    recon_loss: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            **loss_summary(self.steps, self.seconds, self.loss),
            "feature_loss_last_mean": tail_mean(self.feature_loss),
            "recon_loss_last_mean": tail_mean(self.recon_loss),
        }


def pooled_feature_loss(outputs: Tensor, patches: Tensor) -> Tensor:
    """2 (1 - cos) between the mean of ``outputs`` [B, k, C] and the mean of ``patches`` [B, P, C]."""
    return 2.0 * (1.0 - F.cosine_similarity(outputs.mean(1), patches.mean(1), dim=-1)).mean()


def sample_budgets(k_max: int, count: int, generator: torch.Generator) -> list[int]:
    """``k_max`` and ``count - 1`` budgets log-uniform in [1, k_max] (rounded)."""
    drawn = torch.rand(max(0, count - 1), generator=generator) * math.log(k_max)
    return [k_max] + [max(1, min(k_max, round(math.exp(float(u))))) for u in drawn]


def compressor_losses(
    model: LatentCompressor,
    patches: Tensor,
    budgets: list[int],
    *,
    feature_weight: float,
    recon_weight: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, L_feat, L_rec) averaged over ``budgets`` for ``patches`` [B, P, C] (token space)."""
    outputs, _ = model.encode(patches, max(budgets))  # [B, k, C] standardised
    target = model.standardize(patches)  # [B, P, C]
    feature, recon = patches.new_zeros(()), patches.new_zeros(())
    for k in budgets:
        kept = outputs[:, :k]
        if model.kind == "resampler":
            feature = feature + pooled_feature_loss(model.destandardize(kept), patches)
        recon = recon + F.mse_loss(model.decode(kept), target)
    feature, recon = feature / len(budgets), recon / len(budgets)
    weight_feat = feature_weight if model.kind == "resampler" else 0.0
    return weight_feat * feature + recon_weight * recon, feature, recon


def train_compressor(
    kind: str,
    tokens: Tensor,
    *,
    num_prefix: int = 1,
    grid: tuple[int, int] | None = None,
    k_max: int = 144,
    width: int = 256,
    depth: int = 2,
    heads: int = 4,
    decoder_depth: int | None = None,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    budgets_per_step: int = 2,
    feature_weight: float = 1.0,
    recon_weight: float = 1.0,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: Callable[[int, dict], None] | None = None,
    info: dict | None = None,
) -> tuple[LatentCompressor, CompressorTrainReport]:
    """Train a ``kind`` ("resampler" or "autoencoder") compressor on backbone ``tokens`` [S, N, C]
    (``num_prefix`` prefix tokens first; they are not compressed, so not trained on).

    ``steps`` AdamW steps (cosine learning-rate decay after a short warm-up, over the steps or over
    ``max_seconds``, whichever ends first) on batches drawn in a seeded shuffled order; ``progress(step, losses)`` after
    each. Returns the compressor in eval mode and a :class:`CompressorTrainReport`.
    """
    from .base import check_tokens, infer_grid

    if kind not in KINDS:
        raise ValueError(f"unknown compressor kind {kind!r}; use one of {KINDS}")
    if steps < 1 or batch_size < 1 or budgets_per_step < 1:
        raise ValueError(
            f"steps, batch_size and budgets_per_step must be >= 1, got {steps}, {batch_size}, {budgets_per_step}"
        )
    _, n, channels = check_tokens(tokens, num_prefix)
    grid = infer_grid(n - num_prefix, grid)
    torch.manual_seed(seed)
    model = build_compressor(
        {
            "kind": kind,
            "dim": channels,
            "grid": grid,
            "k_max": k_max,
            "width": width,
            "depth": depth,
            "heads": heads,
            "decoder_depth": decoder_depth or (1 if kind == "resampler" else 2),
            "num_prefix": num_prefix,
            "info": dict(info or {}),
        }
    )
    patches = tokens[:, num_prefix:]
    model.set_token_statistics(patches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(patches), generator=generator), 0
    report = CompressorTrainReport(steps=0, seconds=0.0)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(patches), generator=generator), 0
        batch = patches[order[cursor : cursor + batch_size]].float()
        cursor += batch_size
        # Cosine decay over the run; a time limit counts as the end of the run, so a run cut short by
        # max_seconds still anneals instead of stopping at the peak learning rate.
        done = step / steps
        if max_seconds is not None:
            done = max(done, (time.perf_counter() - start) / max_seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        budgets = sample_budgets(model.k_max, budgets_per_step, generator)
        loss, feature, recon = compressor_losses(
            model, batch, budgets, feature_weight=feature_weight, recon_weight=recon_weight
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        report.loss.append(float(loss.detach()))
        report.feature_loss.append(float(feature.detach()))
        report.recon_loss.append(float(recon.detach()))
        report.steps = step + 1
        if math.isnan(report.loss[-1]):
            raise ValueError(f"{kind} training diverged (NaN loss at step {step + 1}); lower lr")
        if progress is not None:
            progress(
                step + 1,
                {"loss": report.loss[-1], "feat": report.feature_loss[-1], "rec": report.recon_loss[-1]},
            )
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    report.seconds = time.perf_counter() - start
    model.eval()
    model.info.update({"train": report.summary()})
    return model, report
