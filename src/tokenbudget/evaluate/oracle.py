"""The oracle headroom of a per-image budget: the accuracy an allocator could reach if it knew, for
every test image, at which of the per-image levels its classifier still gets it right.

The oracle picks one level per image, as ``tb.PerImage`` does, within the same mean FLOPs. It is not
deployable (it reads the labels); it bounds what any glance policy over these levels can gain over
one fixed budget. When the oracle itself barely beats the fixed budget, no policy can, and the
per-image row's gap says so rather than the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..adapters import find_adapter
from ..config import PerImage, ReductionConfig
from .features import extract_features


@dataclass
class OracleHeadroom:
    """The oracle's accuracy at a per-image config's mean FLOPs, for each classifier.

    ``knn_acc`` / ``linear_acc``: accuracy when every image runs at the level the oracle picked for
    that classifier; ``knn_flops`` / ``linear_flops``: the mean FLOPs fraction those picks cost
    (at most ``target_flops``); ``level_speedups``: the levels it chose among.
    """

    target_flops: float
    knn_acc: float
    knn_flops: float
    linear_acc: float
    linear_flops: float
    level_speedups: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def oracle_allocation(ok: Tensor, level_flops: Sequence[float], target: float) -> Tensor:
    """[N] level index per image from ``ok`` [N, K] (True where image n is right at level k) and each
    level's FLOPs fraction, with a mean FLOPs of at most ``target``.

    Every image starts at the cheapest level; images then move to their cheapest ``ok`` level in
    order of what the move costs, while the mean stays within ``target``. Each moved image counts
    one, so taking the cheapest moves first moves the most images (the optimum, up to the last
    image that no longer fits). Images with no ``ok`` level stay at the cheapest.
    """
    flops = torch.as_tensor(level_flops, dtype=torch.float64)
    if ok.dim() != 2 or ok.shape[1] != len(flops):
        raise ValueError(f"ok must be [N, {len(flops)}] (one column per level), got {list(ok.shape)}")
    cheapest = int(flops.argmin())
    spare = (target - float(flops[cheapest])) * ok.shape[0]  # FLOPs (in images) above the cheapest
    if spare < -1e-9:
        raise ValueError(
            f"a mean FLOPs target of {target:.4f} is below the cheapest level's {float(flops[cheapest]):.4f}"
        )
    cost = torch.where(ok, flops[None, :], torch.full_like(flops[None, :], float("inf")))
    best_cost, best = cost.min(dim=1)
    extra = best_cost - flops[cheapest]  # [N] FLOPs a move costs (inf: no ok level)
    order = extra.argsort()
    fits = extra[order].cumsum(0) <= spare + 1e-9
    levels = torch.full((ok.shape[0],), cheapest, dtype=torch.long)
    moved = order[fits]
    levels[moved] = best[moved]
    return levels


def level_features(
    model: nn.Module,
    config: PerImage,
    images: Tensor,
    full_features: Tensor,
    batch_size: int = 64,
    cache: dict | None = None,
    progress: Callable[[int], None] | None = None,
    embed: Callable[[ReductionConfig], Tensor] | None = None,
) -> tuple[Tensor, tuple[float, ...], tuple[float, ...]]:
    """(features [N, K, F] of ``images`` under each level of ``config``, each level's FLOPs fraction,
    each level's speedup). Level ``k`` runs ``config.reducer`` at that level's per-block counts, as
    ``tb.PerImage`` runs it (each image is reduced on its own, so a level's features do not depend on
    the batch); a level with no merging is ``full_features`` [N, F]. ``cache`` (a dict) keeps levels
    by their counts across calls on the same images. ``embed(level config)``, if given, returns the
    level's features [N, F] instead of running the model (e.g. from a feature cache on disk)."""
    from ..adaptive.per_image import config_level_plan, input_tokens
    from ..patch import apply, remove
    from ..strategies.per_image_levels import level_config

    def run_level(level: ReductionConfig) -> Tensor:
        apply(model, level)
        try:
            return extract_features(model, images, batch_size, progress)
        finally:
            remove(model)

    plan = config_level_plan(model, config, input_tokens(find_adapter(model), images))
    cache = {} if cache is None else cache
    feats = []
    for counts in plan.merged:
        if sum(counts) == 0:
            feats.append(full_features)
            continue
        key = (config.reducer, config.prop_attn, counts)
        if key not in cache:
            level = level_config(config.reducer, config.prop_attn, r=list(counts))
            cache[key] = embed(level) if embed is not None else run_level(level)
        feats.append(cache[key])
    return torch.stack(feats, dim=1), plan.flops, plan.speedups


def oracle_headroom(
    level_feats: Tensor,
    level_flops: Sequence[float],
    level_speedups: Sequence[float],
    target: float,
    predict: Callable[[Tensor], tuple[Tensor, Tensor]],
    labels: Tensor,
) -> OracleHeadroom:
    """The oracle at mean FLOPs ``target`` over levels ``level_feats`` [N, K, F]: ``predict(feats
    [N, F])`` gives the (k-NN, linear probe) predictions [N] that ``labels`` [N] score."""
    num_levels = level_feats.shape[1]
    preds = [predict(level_feats[:, k]) for k in range(num_levels)]
    flops = torch.as_tensor(level_flops, dtype=torch.float64)
    scores = {}
    for judge in (0, 1):
        right = torch.stack([p[judge] == labels for p in preds], dim=1)  # [N, K]
        levels = oracle_allocation(right, level_flops, target)
        picked = right[torch.arange(len(labels)), levels]
        scores[judge] = (float(picked.double().mean()), float(flops[levels].mean()))
    return OracleHeadroom(
        target,
        scores[0][0],
        scores[0][1],
        scores[1][0],
        scores[1][1],
        tuple(float(s) for s in level_speedups),
    )


__all__ = ["OracleHeadroom", "level_features", "oracle_allocation", "oracle_headroom"]
