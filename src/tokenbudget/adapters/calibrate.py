"""Measuring what a patched model's blocks cost, for the cost model (``cost_model="auto"``).

Framework-free: the block is run through its :class:`~tokenbudget.adapters.blocks.ReducingBlockForward`
(``attention_branch``, ``mlp_branch``) and the reduction through the strategy, exactly as a forward
runs them. Every time is the minimum of a few interleaved repetitions (the minimum is what the
work costs; other processes only ever add to it).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from ..context import PatchContext
from ..cost import CostModel, CostTable
from ..ops.match import max_mergeable
from ..ops.serial import SmallWork
from ..state import TokenState

#: images a block is timed on at most; larger batches scale the times (compute-bound there)
TIMED_BATCH = 4
#: seconds the measurement aims at after its warm-up sweep (it sweeps at least 3 times)
BUDGET_S = 2.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _token_counts(num_tokens: int, num_prefix: int, points: int) -> list[int]:
    """Token counts from a few to ``num_tokens``: ``points`` spaced geometrically, plus three more
    in the top third, where small budgets run and where a single slow timing would otherwise
    set the slope alone."""
    low = min(num_tokens, max(num_prefix + 2, 4))
    counts = {round(low * (num_tokens / low) ** (i / (points - 1))) for i in range(points)}
    counts |= {max(low, round(num_tokens * f)) for f in (0.9, 0.8, 0.7)}
    return sorted(counts | {num_tokens})


def measure_costs(ctx: PatchContext, x: Tensor, *, repeats: int = 7, points: int = 6) -> CostTable:
    """A :class:`~tokenbudget.cost.CostTable` for tokens like ``x`` [B, N, C] entering the first block.

    Block 0 stands for every block (a ViT's blocks share one shape). At about ``points`` + 3 token
    counts from a few to N it times the attention branch (without and with
    a proportional-attention bias), the MLP branch, and the merge step: the key capture plus the
    strategy's ``reduce`` merging a quarter of what one step can merge there. Blocks are
    timed on at most :data:`TIMED_BATCH` images and scaled to the batch; the merge step on the
    whole batch. Up to ``repeats`` sweeps (at least 3), fewer when a sweep is long (the whole
    measurement aims at :data:`BUDGET_S` seconds after the warm-up sweep).
    """
    wrapper = ctx.block_forwards.get(0)
    if wrapper is None:
        raise RuntimeError("the cost model needs the patched blocks; apply a config first")
    strategy = ctx.strategy
    local = ctx.local
    device = x.device
    batch, num_tokens, _ = x.shape
    counts = _token_counts(num_tokens, ctx.num_prefix, points)
    prop_attn = bool(strategy.prop_attn)
    needs_keys = bool(getattr(strategy, "needs_keys", False))
    saved = (getattr(local, "want_keys", False), getattr(local, "keys", None))

    def with_keys(tokens: Tensor, attn_bias: Tensor | None) -> Tensor | None:
        """The attention branch with the key capture on; returns the captured metric."""
        local.want_keys = True
        try:
            wrapper.attention_branch(tokens, attn_bias)
            return local.keys
        finally:
            local.want_keys, local.keys = False, None

    def reduce_step(full: Tensor, keys: Tensor | None, r: int) -> Callable[[], object]:
        """The merge of ``r`` tokens of ``full`` [B, n, C] (sized tokens, as after a first merge)."""
        n = full.shape[1]
        state = TokenState(
            batch_size=batch,
            input_tokens=n,
            num_prefix=ctx.num_prefix,
            grid=None,
            requested_per_layer=[r] + [0] * (ctx.num_layers - 1),
            merged_per_layer=[r] + [0] * (ctx.num_layers - 1),
            device=device,
        )
        ones = torch.ones(batch, n, 1, device=device)
        trace = torch.arange(n, device=device).expand(batch, -1) if strategy.trace_source else None

        def run() -> None:
            state.size, state.token_map, state._bias = ones, trace, None
            with SmallWork(full):
                strategy.reduce(full, keys if needs_keys else None, state, 0)
            if prop_attn:
                state.attention_bias(full.dtype)

        return run

    names = ("attention", "masked", "keys", "mlp", "reduce")
    best = {(name, n): math.inf for name in names for n in counts}
    with torch.no_grad():
        x = x.detach()
        timed = x[: min(batch, TIMED_BATCH)]
        scale = batch / timed.shape[0]
        parts: dict[tuple[str, int], Callable[[], object]] = {}
        for n in counts:
            xs = timed[:, :n].contiguous()
            full = x[:, :n].contiguous()
            bias = torch.zeros(timed.shape[0], 1, 1, n, dtype=x.dtype, device=device) if prop_attn else None
            full_bias = None if bias is None else bias[:1].expand(batch, -1, -1, -1)
            r = max_mergeable(n, ctx.num_prefix) // 4 or max_mergeable(n, ctx.num_prefix)
            parts[("attention", n)] = partial(wrapper.attention_branch, xs, None)
            parts[("masked", n)] = partial(wrapper.attention_branch, xs, bias)
            parts[("keys", n)] = partial(with_keys, xs, bias)
            parts[("mlp", n)] = partial(wrapper.mlp_branch, xs)
            parts[("reduce", n)] = (
                reduce_step(full, with_keys(full, full_bias), r) if r > 0 else (lambda: None)
            )
        # Every repetition sweeps every part at every size, so a burst of load from other
        # processes slows one repetition of each, and the minimum discards it.
        sweeps, rep = repeats, 0
        while rep <= sweeps:
            sweep_start = time.perf_counter()
            for key, fn in parts.items():
                # The merge step is short and decides everything: three calls a sweep.
                for _ in range(3 if key[0] == "reduce" else 1):
                    _sync(device)
                    start = time.perf_counter()
                    fn()
                    _sync(device)
                    if rep:  # the first sweep warms up
                        best[key] = min(best[key], time.perf_counter() - start)
            if rep == 0:  # large batches: fewer sweeps, within about BUDGET_S
                sweeps = max(3, min(repeats, int(BUDGET_S / (time.perf_counter() - sweep_start))))
            rep += 1
    local.want_keys, local.keys = saved
    times = {name: [best[(name, n)] for n in counts] for name in names}
    attention = [t * scale for t in times["attention"]]
    masked = [t * scale for t in times["masked"]] if prop_attn else attention
    key_capture = [max(0.0, k - m) * scale for k, m in zip(times["keys"], times["masked"], strict=True)]
    return CostTable(
        token_counts=tuple(counts),
        attention_s=tuple(attention),
        masked_attention_s=tuple(masked),
        mlp_s=tuple(t * scale for t in times["mlp"]),
        reduce_s=tuple(red + key for red, key in zip(times["reduce"], key_capture, strict=True)),
        batch_size=batch,
        device=str(device),
        dtype=str(x.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
    )


def fingerprint(model: nn.Module) -> str:
    """The model's architecture (class and parameter shapes), which its costs depend on."""
    shapes = repr([(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()])
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}:{hashlib.sha1(shapes.encode()).hexdigest()[:16]}"


def cost_model_for(model: nn.Module, ctx: PatchContext) -> CostModel:
    """The cost model of a patched model: measures on its own blocks, caches by its architecture."""
    return CostModel(
        measure=partial(measure_costs, ctx), fingerprint=fingerprint(model), prop_attn=ctx.strategy.prop_attn
    )
