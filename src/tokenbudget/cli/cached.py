"""Backbone outputs that the early-exit and budget-predictor commands share: class tokens after every
block and harness features at ToMe budgets, cached per dataset for the embedded DINOv2
(:mod:`tokenbudget.evaluate.caches`), so training and evaluating again costs seconds; other models
are recomputed each time. Not a command group."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import options

if TYPE_CHECKING:
    import torch


def cache_key(args: argparse.Namespace, data_name: str, split: str, count: int) -> str | None:
    """Cache key of backbone outputs, or None (not cached) for models whose weights vary by run."""
    if args.model in ("dinov2_small", "embedded") and args.img_size in (None, 224):
        return f"dinov2_small-imgfocus-{data_name}-{split}-{count}-{args.seed}"
    return None


def layer_tokens(model, images, args, data_name: str, split: str):  # noqa: ANN001, ANN201
    """[N, depth + 2, C] class tokens after every block (:func:`cached_layer_tokens`)."""
    from ..evaluate.caches import cached_layer_tokens

    key = cache_key(args, data_name, split, len(images))
    bar = options.progress(len(images), f"class tokens ({split})", disable=args.quiet)
    tokens = cached_layer_tokens(model, images, key or "", cache=key is not None, progress=bar.update)
    bar.close()
    return tokens


def budget_features(model, images, budgets, args, data_name: str, split: str, full):  # noqa: ANN001, ANN201
    """[N, K, 2C] harness features at each budget; ``full`` [N, 2C] (the class-token pass's full-token
    feature) is the column of budget 1.0."""
    import torch

    from ..evaluate.caches import cached_budget_features

    reduced = [b for b in budgets if b < 1.0]
    key = cache_key(args, data_name, split, len(images))
    bar = options.progress(
        -(-len(images) // 32) * len(reduced), f"ToMe features ({split})", disable=args.quiet
    )
    feats = cached_budget_features(
        model, images, reduced, key or "", cache=key is not None, progress=bar.update
    )
    bar.close()
    columns = list(feats.unbind(1)) + ([full] if 1.0 in budgets else [])
    return torch.stack(columns, dim=1)


def full_features(model, images, args, data_name: str, split: str):  # noqa: ANN001, ANN201
    """[N, 2C]: the harness feature with all tokens (from the cached class-token pass)."""
    from ..adapters import find_adapter

    depth = find_adapter(model).num_layers
    return layer_tokens(model, images, args, data_name, split)[:, depth : depth + 2].flatten(1)


def fit_calibration_split(n: int, calib_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, calibration) indices of n training images, a seeded split."""
    import torch

    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"--calib-fraction must be in (0, 1), got {calib_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_calib = max(1, round(n * calib_fraction))
    if n_calib >= n:
        raise ValueError(f"{n} training images leave none to train the heads on; give more --n-train")
    return order[n_calib:].sort().values, order[:n_calib].sort().values
