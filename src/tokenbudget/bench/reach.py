"""What a budget can reach, known before anything runs: a model's geometry (tokens, prefix tokens,
blocks, block widths) and the FLOPs-ideal speedup of a config from its token schedule alone.

``tokenbudget plan`` uses it to refuse, at once, a speed or FLOPs target that no candidate can
reach; the budget sliders use :func:`fastest_keep` for their far end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..config import BudgetConfig, PerImage, ReductionConfig, config_class
from ..flops import BlockDims, ideal_speedup
from ..schedule import clamp_schedule, resolve_schedule, tokens_after_each_layer

if TYPE_CHECKING:
    from torch import nn

# Nothing here imports torch at module level (the adapters and strategies load inside the functions
# that need them): ``plan`` refuses an unreachable target from a recorded geometry in a second.

#: fractions of tokens left after the last block that ``plan`` tries by default
DEFAULT_KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1)


@dataclass(frozen=True)
class Geometry:
    """What the FLOPs of a token schedule depend on: ``tokens`` at the model's default input,
    ``prefix`` tokens (never reduced), ``layers`` blocks and each block's widths."""

    tokens: int
    prefix: int
    layers: int
    dims: tuple[BlockDims, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(
            data["tokens"], data["prefix"], data["layers"], tuple(BlockDims(**d) for d in data["dims"])
        )


def geometry_of(model: nn.Module) -> Geometry:
    """The geometry of ``model`` at its default input; ``ValueError`` when it has no default patch grid."""
    from ..adapters import find_adapter

    adapter = find_adapter(model)
    if adapter.default_num_tokens is None:
        raise ValueError("the model has no default patch grid; give --img-size or --keep values")
    return Geometry(
        adapter.default_num_tokens, adapter.num_prefix, adapter.num_layers, tuple(adapter.block_dims())
    )


def config_speedup(geometry: Geometry, config: ReductionConfig) -> float:
    """The FLOPs-ideal speedup of ``config``'s token schedule (``ValueError`` when the schedule
    cannot be met). Per-image budgets spend ToMe's FLOPs at their keep on average: ToMe's schedule."""
    if isinstance(config, PerImage):
        config = BudgetConfig(keep=config.keep)
    g = geometry
    if isinstance(config, BudgetConfig):
        # every method with a per-layer budget plans these counts (ScheduledStrategy.compute_plan)
        requested = resolve_schedule(
            r=config.r,
            keep=config.keep,
            tokens=config.tokens,
            num_tokens=g.tokens,
            num_prefix=g.prefix,
            num_layers=g.layers,
        )
        merged = clamp_schedule(requested, g.tokens, g.prefix)
    else:
        from ..strategies import make_strategy

        _, merged = make_strategy(config, g.layers).compute_plan(g.tokens, g.prefix)
    return ideal_speedup(g.tokens, tokens_after_each_layer(merged, g.tokens), g.dims)


def keep_speedup(geometry: Geometry, keep: float) -> float:
    """The FLOPs-ideal speedup of the per-layer schedule that leaves ``keep`` of the tokens."""
    return config_speedup(geometry, BudgetConfig(keep=keep))


def _feasible(geometry: Geometry, keep: float) -> bool:
    try:
        keep_speedup(geometry, keep)
    except ValueError:  # fewer tokens than the blocks can reach
        return False
    return True


def fastest_keep(geometry: Geometry) -> tuple[float, float]:
    """(the smallest ``keep`` a per-layer schedule reaches, its FLOPs-ideal speedup), to 1e-4."""
    lo, hi = 1.0 / (geometry.tokens - geometry.prefix), 1.0
    if not _feasible(geometry, lo):  # bisection on feasibility
        while hi - lo > 1e-4:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if _feasible(geometry, mid) else (mid, hi)
        lo = hi
    return lo, keep_speedup(geometry, lo)


def keep_for_speedup(geometry: Geometry, speedup: float) -> float:
    """The largest ``keep`` (to 1e-4, rounded down) whose schedule reaches a FLOPs-ideal ``speedup``;
    ``ValueError`` for a speedup no schedule reaches."""
    lo, fastest = fastest_keep(geometry)
    if speedup < 1.0 or speedup > fastest:
        raise ValueError(
            f"a FLOPs-ideal speedup of {speedup} is out of reach for this model: choose one in [1, {fastest:.2f}]"
        )
    if speedup <= 1.0 + 1e-9:
        return 1.0
    hi = 1.0
    while hi - lo > 1e-4:  # the speedup falls as keep grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if keep_speedup(geometry, mid) >= speedup else (lo, mid)
    # Four decimals, rounded down: a smaller keep never merges less, while rounding to nearest can
    # cross the point where keep * tokens rounds up to one more token and miss the target.
    rounded = math.floor(lo * 1e4) / 1e4
    return rounded if _feasible(geometry, rounded) else lo


@dataclass
class Candidate:
    """One (method, keep) a plan measures, with its FLOPs-ideal speedup (``None``: not known before
    a forward, e.g. a config that needs a file not given)."""

    method: str
    keep: float
    ideal_speedup: float | None


def candidates(
    geometry: Geometry,
    methods: Sequence[str],
    keeps: Sequence[float],
    method_options: dict[str, dict] | None = None,
) -> list[Candidate]:
    """Every (method, keep) of a plan with its FLOPs-ideal speedup, from the schedule alone."""
    out = []
    for method in methods:
        for keep in keeps:
            try:
                config = config_class(method)(keep=keep, **(method_options or {}).get(method, {}))
                ideal = config_speedup(geometry, config)
            except (ValueError, TypeError):
                ideal = None
            out.append(Candidate(method, keep, ideal))
    return out


def check_reachable(
    geometry: Geometry,
    found: Sequence[Candidate],
    *,
    target_speedup: float | None = None,
    target_flops: float | None = None,
) -> None:
    """``ValueError`` naming the reachable range when a speed or FLOPs target lies beyond the
    FLOPs-ideal speedup of every candidate (a measured speedup stays near or below the FLOPs-ideal
    one, so measuring could only confirm it). Nothing is checked while a candidate's FLOPs are unknown."""
    known = [c for c in found if c.ideal_speedup is not None]
    if not known or len(known) < len(found):
        return
    best = max(known, key=lambda c: c.ideal_speedup)
    least = min(known, key=lambda c: c.ideal_speedup)
    if target_speedup is not None and target_speedup > best.ideal_speedup:
        wanted, ideal = f"--target-speedup {target_speedup}", target_speedup
    elif target_flops is not None and target_flops < 1.0 / best.ideal_speedup:
        wanted, ideal = f"--target-flops {target_flops}", 1.0 / target_flops
    else:
        return
    message = (
        f"{wanted} is out of reach of the candidates: their FLOPs-ideal speedups run from "
        f"{least.ideal_speedup:.2f}x ({least.method} keep={least.keep:g}) to {best.ideal_speedup:.2f}x "
        f"({best.method} keep={best.keep:g}, {1.0 / best.ideal_speedup:.2f} of the FLOPs), and a measured "
        f"speedup stays near or below the FLOPs-ideal one. Reachable: --target-speedup up to "
        f"{best.ideal_speedup:.2f}, --target-flops from {1.0 / best.ideal_speedup:.2f}"
    )
    _, fastest = fastest_keep(geometry)
    if ideal <= fastest:
        keep = keep_for_speedup(geometry, ideal)
        message += (
            f"; or add smaller keeps: keep={keep:g} reaches {ideal:g}x FLOPs-ideal on this model (e.g. "
            f"--keep {best.keep:g},{keep:g})"
        )
    else:
        message += f"; no per-layer schedule of this model goes beyond {fastest:.2f}x FLOPs-ideal"
    raise ValueError(message)


def check_targets(target_speedup: float | None, target_flops: float | None, max_drop: float | None) -> None:
    """Fail before any measurement on a missing or impossible target."""
    if target_speedup is None and target_flops is None and max_drop is None:
        raise ValueError("give a target: --target-speedup, --target-flops or --max-drop")
    if target_speedup is not None and target_speedup <= 1.0:
        raise ValueError(
            f"--target-speedup must be above 1.0 (e.g. 2.0 for twice as fast), got {target_speedup}"
        )
    if target_flops is not None and not 0.0 < target_flops < 1.0:
        raise ValueError(f"--target-flops is a fraction of the full FLOPs in (0, 1), got {target_flops}")
    if max_drop is not None and max_drop < 0:
        raise ValueError(f"--max-drop is in accuracy points and must be >= 0, got {max_drop}")
