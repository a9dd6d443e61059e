"""Running a ``tb.PerImage`` model: budget levels, the glance, one sub-batch per level.

Framework-independent: an adapter (``tokenbudget.adapters.timm_per_image``) gives the model's own
entry points and its patch embeddings; this module decides the levels and the groups:

* **levels**: each level is a FLOPs-ideal speedup of the blocks; it runs as ToMe whose blocks each
  merge the same share ``rate`` of their mergeable tokens (a geometric schedule:
  :func:`rate_schedule`), ``rate`` solved so the level's FLOPs meet its speedup
  (:func:`resolve_levels`). A geometric schedule reaches far beyond the ~2x that ToMe's even
  ``keep`` schedule can on a 12-block model, so cheap images can run much cheaper than the mean;
* **glance**: the policy scores each image's need from its patch embeddings (:func:`need_scores`),
  which the grouped forward then reuses (the patch embedding runs once);
* **grouped forward**: images of one level run as one sub-batch through the model's own entry
  point (never padded), outputs return in input order (:func:`run_per_image`); token outputs of
  different lengths are padded with size-0 tokens so the batch stacks (``last_state(model).sizes``
  is 0 there, so size-weighted pooling ignores them).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import PerImage, ToMe
from ..context import PatchContext
from ..flops import BlockDims, model_flops
from ..ops.complexity import detail_score
from ..ops.entropy import token_entropy
from ..ops.glance import level_index, redundancy_need, spread_need
from ..state import PerImageState, TokenState
from .adaptive_patch import gather_rows, run_groups
from .base import ScheduledStrategy
from .per_image_levels import MAX_RATE, level_strategy, rate_schedule

#: weight of the tie-breaking second score of the ``redundancy`` glance (small: it only orders ties)
TIE_BREAK = 1e-3


def schedule_flops(num_tokens: int, merged: Sequence[int], dims: Sequence[BlockDims]) -> float:
    """Block FLOPs of one image under per-block merge counts ``merged``, over the unreduced blocks'."""
    per_layer, n = [], num_tokens
    for r in merged:
        n -= r
        per_layer.append(n)
    return model_flops(num_tokens, per_layer, dims) / model_flops(num_tokens, [num_tokens] * len(dims), dims)


def fastest_rate_speedup(num_tokens: int, num_prefix: int, dims: Sequence[BlockDims]) -> float:
    """The FLOPs-ideal speedup of the fastest geometric schedule: every block merges half of its
    mergeable tokens (:data:`MAX_RATE`), the far end of the per-image levels and of
    :func:`tokenbudget.evaluate.budget_for_flops_speedup`."""
    return 1.0 / schedule_flops(num_tokens, rate_schedule(num_tokens, num_prefix, len(dims), MAX_RATE), dims)


def rate_for_speedup(num_tokens: int, num_prefix: int, dims: Sequence[BlockDims], speedup: float) -> float:
    """The smallest merge rate whose :func:`rate_schedule` reaches a FLOPs-ideal ``speedup``
    (bisection; the counts are integers, so the speedup reached can overshoot slightly)."""
    layers = len(dims)

    def reached(rate: float) -> float:
        return 1.0 / schedule_flops(num_tokens, rate_schedule(num_tokens, num_prefix, layers, rate), dims)

    if speedup <= 1.0:
        return 0.0
    fastest = fastest_rate_speedup(num_tokens, num_prefix, dims)
    if speedup > fastest + 1e-9:
        raise ValueError(
            f"a FLOPs-ideal speedup of {speedup} is out of reach: merging half of the tokens in every "
            f"block gives {fastest:.2f}; choose levels up to that"
        )
    lo, hi = 0.0, MAX_RATE
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reached(mid) < speedup else (lo, mid)
    return hi


@dataclass(frozen=True)
class LevelPlan:
    """The budget levels resolved for one model and input length.

    Attributes:
        speedups: the config's levels (FLOPs-ideal speedups), increasing.
        rates: merge rate of each level (0: all tokens).
        merged: per level, the tokens each block merges.
        flops: per level, block FLOPs over the unreduced model's (what the level really costs).
        final_tokens: per level, tokens after the last block (prefix included).
        anchor: the level that runs the fixed budget itself (``ToMe(keep=anchor_keep)``), if any.
        anchor_keep: that fixed budget's ``keep``.
    """

    speedups: tuple[float, ...]
    rates: tuple[float, ...]
    merged: tuple[tuple[int, ...], ...]
    flops: tuple[float, ...]
    final_tokens: tuple[int, ...]
    anchor: int | None = None
    anchor_keep: float | None = None


def keep_schedule(num_tokens: int, num_prefix: int, num_layers: int, keep: float) -> list[int]:
    """Tokens merged by each block under ``tb.ToMe(keep=keep)`` (its even schedule)."""
    return ScheduledStrategy(ToMe(keep=keep), num_layers).compute_plan(num_tokens, num_prefix)[1]


def keep_for_flops(
    num_tokens: int, num_prefix: int, dims: Sequence[BlockDims], target: float
) -> float | None:
    """The ``keep`` whose ToMe schedule costs at most ``target`` (a FLOPs fraction) and the closest
    to it (bisection to 1e-4); ``None`` when no schedule gets that cheap."""

    def cost(keep: float) -> float | None:
        try:
            return schedule_flops(num_tokens, keep_schedule(num_tokens, num_prefix, len(dims), keep), dims)
        except ValueError:  # fewer tokens than the blocks can reach
            return None

    lo, hi = 1.0 / max(num_tokens - num_prefix, 1), 1.0
    if (cost(lo) or float("inf")) > target:
        return None
    for _ in range(20):
        mid = (lo + hi) / 2
        c = cost(mid)
        lo, hi = (mid, hi) if c is not None and c <= target else (lo, mid)
    return lo


def resolve_levels(
    speedups: Sequence[float],
    num_tokens: int,
    num_prefix: int,
    dims: Sequence[BlockDims],
    anchor_keep: float | None = None,
) -> LevelPlan:
    """A :class:`LevelPlan` for ``num_tokens`` input tokens (prefix included) through blocks ``dims``.

    ``anchor_keep``: the level (not the first) whose FLOPs are nearest those of
    ``tb.ToMe(keep=anchor_keep)`` runs that schedule instead, when it falls between its neighbours;
    then images that all get that level are exactly the fixed budget."""
    rates, merged, flops, final = [], [], [], []
    for speedup in speedups:
        rate = rate_for_speedup(num_tokens, num_prefix, dims, speedup)
        counts = rate_schedule(num_tokens, num_prefix, len(dims), rate)
        rates.append(rate)
        merged.append(tuple(counts))
        flops.append(schedule_flops(num_tokens, counts, dims))
        final.append(num_tokens - sum(counts))
    speedups, anchor = list(speedups), None
    if anchor_keep is not None and anchor_keep < 1.0:
        counts = keep_schedule(num_tokens, num_prefix, len(dims), anchor_keep)
        cost = schedule_flops(num_tokens, counts, dims)
        j = min(range(1, len(flops)), key=lambda i: abs(flops[i] - cost))
        if flops[j - 1] > cost and (j + 1 == len(flops) or cost > flops[j + 1]):
            anchor = j
            merged[j], flops[j], final[j] = tuple(counts), cost, num_tokens - sum(counts)
            speedups[j], rates[j] = round(1.0 / cost, 4), float("nan")
    return LevelPlan(
        tuple(speedups),
        tuple(rates),
        tuple(merged),
        tuple(flops),
        tuple(final),
        anchor,
        None if anchor is None else anchor_keep,
    )


def anchor_keep_of(
    config: PerImage, num_tokens: int, num_prefix: int, dims: Sequence[BlockDims]
) -> float | None:
    """The fixed budget ``config`` anchors a level at: its ``keep``, or the keep whose ToMe schedule
    meets its ``flops_speedup``; ``None`` without ``anchor``."""
    if not config.anchor:
        return None
    if config.keep is not None:
        return config.keep
    return keep_for_flops(num_tokens, num_prefix, dims, 1.0 / config.flops_speedup)


def config_levels(config: PerImage, num_tokens: int, num_prefix: int, dims: Sequence[BlockDims]) -> LevelPlan:
    """The :class:`LevelPlan` ``config`` runs at ``num_tokens`` input tokens (anchored as it says)."""
    anchor = anchor_keep_of(config, num_tokens, num_prefix, dims)
    return resolve_levels(config.levels, num_tokens, num_prefix, dims, anchor)


def mean_flops_target(config: PerImage, num_tokens: int, num_prefix: int, dims: Sequence[BlockDims]) -> float:
    """The mean FLOPs fraction ``config`` asks for: ``1 / flops_speedup``, or the FLOPs of
    ``tb.ToMe(keep=keep)`` at ``num_tokens`` input tokens through blocks ``dims``."""
    if config.flops_speedup is not None:
        return 1.0 / config.flops_speedup
    _, merged = ScheduledStrategy(ToMe(keep=config.keep), len(dims)).compute_plan(num_tokens, num_prefix)
    return schedule_flops(num_tokens, merged, dims)


# -- glance ------------------------------------------------------------------------------------
def need_scores(
    policy: str, patch_tokens: Tensor, images: Tensor, patch_size: int, predictor: Any = None
) -> Tensor:
    """[B] need scores (higher: more tokens) of ``policy`` from the patch embeddings [B, N, C]
    (no prefix) and the model-ready ``images`` [B, 3, H, W]."""
    if policy == "redundancy":
        # Images whose best-matched half are all exact duplicates (a digit on black) score the same;
        # the mean over every token breaks those ties, so thresholds can split them.
        return redundancy_need(patch_tokens, 0) + TIE_BREAK * redundancy_need(patch_tokens, 0, fraction=1.0)
    if policy == "spread":
        return spread_need(patch_tokens, 0)
    if policy == "entropy":
        return token_entropy(patch_tokens)
    if policy == "detail":
        return detail_score(images, patch_size)
    if policy == "predictor":
        if predictor is None:
            raise ValueError("policy 'predictor' needs a trained budget predictor")
        return predictor.need(patch_tokens)
    raise ValueError(f"unknown policy {policy!r}")


# -- the patched model -------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelGroup:
    """One sub-batch of a grouped forward: its level and its members' patch embeddings (reused)."""

    level: int
    patch_embed_out: Tensor


class PerImageStrategy:
    """The per-block strategy of a ``tb.PerImage`` model: the reducer of the level the current
    sub-batch runs at (``ctx.group``); outside a grouped forward (blocks called directly), all tokens."""

    needs_keys = True
    needs_positions = False
    trace_source = False

    def __init__(self, config: PerImage, num_layers: int, local: threading.local, plan: LevelPlan) -> None:
        self.config = config
        self.num_layers = num_layers
        self._local = local
        self.level_plan = plan
        self.levels = [
            level_strategy(config.reducer, config.prop_attn, num_layers, keep=plan.anchor_keep)
            if j == plan.anchor
            else level_strategy(config.reducer, config.prop_attn, num_layers, rate=rate)
            for j, rate in enumerate(plan.rates)
        ]

    @property
    def prop_attn(self) -> bool:
        return self.config.prop_attn

    def current(self) -> ScheduledStrategy:
        group = getattr(self._local, "group", None)
        return self.levels[0 if group is None else group.level]

    def plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        if getattr(self._local, "group", None) is None:
            return [0] * self.num_layers, [0] * self.num_layers
        return self.current().plan(num_tokens, num_prefix)

    def reduce(self, x: Tensor, keys: Tensor, state: TokenState, layer: int) -> Tensor:
        return self.current().reduce(x, keys, state, layer)

    def check_model(self, adapter: Any) -> None:
        """Nothing beyond ToMe's needs."""

    def __deepcopy__(self, memo: dict) -> PerImageStrategy:
        # threading.local cannot be copied; PerImageContext's copy links its own fresh slot.
        return PerImageStrategy(self.config, self.num_layers, threading.local(), self.level_plan)


class PerImageContext(PatchContext):
    """A :class:`PatchContext` whose strategy follows the level of the sub-batch being run.

    ``predictor``: the trained budget predictor of ``policy="predictor"`` (``None`` otherwise)."""

    def __init__(
        self,
        config: PerImage,
        plan: LevelPlan,
        num_prefix: int,
        num_layers: int,
        grid: tuple[int, int] | None,
        dims: Sequence[BlockDims],
        predictor: Any = None,
    ) -> None:
        local = threading.local()
        super().__init__(PerImageStrategy(config, num_layers, local, plan), num_prefix, num_layers, grid)
        self._local = local
        self.plan = plan
        self.dims = list(dims)
        self.thresholds = torch.tensor(config.thresholds, dtype=torch.float64)
        self.predictor = predictor

    @property
    def group(self) -> LevelGroup | None:
        return getattr(self._local, "group", None)

    # threading.local cannot be copied or pickled, and the strategy holds this context's slot: a
    # copied or loaded model gets a fresh slot and a strategy linked to it, the rest goes along.
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_local", "latest", "strategy")}
        return state | {"_config": self.strategy.config}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        config = state.pop("_config")
        self.__dict__.update(state)
        self._local = threading.local()
        self.latest = None
        self.strategy = PerImageStrategy(config, self.num_layers, self._local, self.plan)

    def __deepcopy__(self, memo: dict) -> PerImageContext:
        new = PerImageContext.__new__(PerImageContext)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new


def assign_levels(
    ctx: PerImageContext, patch_tokens: Tensor, images: Tensor, patch_size: int
) -> tuple[Tensor, Tensor]:
    """(need scores [B], level index [B]) of model-ready ``images`` from their patch embeddings
    ``patch_tokens`` [B, P, C]."""
    with torch.no_grad():
        scores = need_scores(
            ctx.strategy.config.policy, patch_tokens.detach(), images, patch_size, ctx.predictor
        ).double()
    scores = scores.cpu()
    return scores, level_index(scores, ctx.thresholds, len(ctx.plan.rates))


def level_groups(levels: Tensor, raw: Tensor, num_levels: int) -> list[tuple[LevelGroup, Tensor]]:
    """[(group, member indices)] per level that has images, cheapest level first; ``raw`` [B, ...]
    are the images' patch embeddings, handed to each group's forward."""
    groups = []
    for level in reversed(range(num_levels)):
        members = (levels == level).nonzero().flatten()
        if len(members):
            rows = raw if len(members) == len(levels) else raw[members.to(raw.device)]
            groups.append((LevelGroup(level, rows), members))
    return groups


def run_per_image(
    ctx: PerImageContext,
    upstream: Callable[..., Any],
    images: Tensor,
    raw: Tensor,
    patch_tokens: Tensor,
    patch_size: int,
    *,
    tokens_out: bool,
    args: tuple = (),
    kwargs: dict | None = None,
) -> Any:
    """Run ``upstream`` once per level on the ``images`` [B, 3, H, W] of that level; ``raw`` is the
    patch embedding's output (reused by the adapter inside each group), ``patch_tokens`` [B, P, C]
    the same as tokens for the glance. Returns the outputs in input order: token sequences
    (``tokens_out``) zero-padded to the longest, other outputs stacked."""
    scores, levels = assign_levels(ctx, patch_tokens, images, patch_size)
    groups = level_groups(levels, raw, len(ctx.plan.rates))
    states: list[tuple[Tensor, TokenState]] = []

    def prepare(group: LevelGroup, batch: Tensor) -> Tensor:
        ctx.local.embed_pending = True
        return batch

    def after(group: LevelGroup, members: Tensor) -> None:
        ctx.local.embed_pending = False
        states.append((members, ctx.last_state()))

    outputs = run_groups(
        upstream, images, groups, ctx.local, args=args, kwargs=kwargs or {}, prepare=prepare, after=after
    )
    ctx.finish(combined_state(ctx, states, levels, scores, len(images), states[0][1].input_tokens))
    if tokens_out:
        return pad_tokens(outputs, len(images))
    return gather_rows(
        outputs,
        len(images),
        "images at different budget levels gave outputs of different shapes, which cannot be put "
        "back in one batch; call model.forward_features(images) for padded tokens",
    )


def combined_state(
    ctx: PerImageContext,
    states: Sequence[tuple[Tensor, TokenState]],
    levels: Tensor,
    scores: Tensor,
    batch_size: int,
    input_tokens: int,
) -> PerImageState:
    """One :class:`~tokenbudget.state.PerImageState` for the whole batch from each group's (members, state)."""
    width = max(s.num_tokens for _, s in states)
    layers = ctx.num_layers
    device = states[0][1].device
    size = torch.zeros(batch_size, width, 1, device=device)
    image_tokens = torch.zeros(batch_size, layers, dtype=torch.long)
    flops = torch.zeros(batch_size, dtype=torch.float64)
    full = model_flops(input_tokens, [input_tokens] * layers, ctx.dims)
    for members, state in states:
        rows = members.to(device)
        size[rows, : state.num_tokens] = state.sizes[..., None].to(size.dtype)
        image_tokens[members] = torch.tensor(state.tokens_per_layer, dtype=torch.long)
        flops[members] = model_flops(state.input_tokens, state.tokens_per_layer, ctx.dims) / full
    widths = image_tokens.amax(dim=0).tolist()
    padding = size[..., 0] <= 0
    speedups = torch.tensor(ctx.plan.speedups, dtype=torch.float64)[levels]
    groups = {ctx.plan.speedups[int(lv)]: int((levels == lv).sum()) for lv in levels.unique().tolist()}
    merged = [a - b for a, b in zip([input_tokens, *widths], widths, strict=False)]
    return PerImageState(
        batch_size=batch_size,
        input_tokens=input_tokens,
        num_prefix=ctx.num_prefix,
        grid=ctx._grid_for(input_tokens),
        requested_per_layer=merged,
        merged_per_layer=list(merged),
        tokens_per_layer=widths,
        size=size,
        device=device,
        padding=padding if bool(padding.any()) else None,
        levels=levels,
        level_speedups=ctx.plan.speedups,
        scores=scores,
        speedups=speedups,
        flops=flops,
        image_tokens_per_layer=image_tokens,
        group_sizes=dict(sorted(groups.items())),
    )


def pad_tokens(outputs: Sequence[tuple[Tensor, Tensor]], batch_size: int) -> Tensor:
    """Per-group tokens [(members, [b_g, N_g, C])] -> [B, max N_g, C] in input order, zero-padded."""
    width = max(out.shape[1] for _, out in outputs)
    first = outputs[0][1]
    result = first.new_zeros((batch_size, width, *first.shape[2:]))
    for members, out in outputs:
        result[members.to(result.device), : out.shape[1]] = out
    return result


__all__ = [
    "MAX_RATE",
    "fastest_rate_speedup",
    "LevelGroup",
    "LevelPlan",
    "PerImageContext",
    "PerImageStrategy",
    "anchor_keep_of",
    "assign_levels",
    "config_levels",
    "keep_for_flops",
    "keep_schedule",
    "combined_state",
    "level_groups",
    "mean_flops_target",
    "need_scores",
    "pad_tokens",
    "rate_for_speedup",
    "rate_schedule",
    "resolve_levels",
    "run_per_image",
    "schedule_flops",
]
