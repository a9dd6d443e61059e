"""The reducer a per-image level runs: Auto (default) or ToMe, at a fixed budget or at the geometric
schedule of a merge rate (each block merges the same share of its mergeable tokens)."""

from __future__ import annotations

from typing import Any

from ..config import Auto, BudgetConfig, ToMe
from ..ops.match import max_mergeable
from .auto import AutoStrategy
from .base import ScheduledStrategy
from .tome import ToMeStrategy

#: merge rate of the fastest schedule: every block merges half of its mergeable tokens
MAX_RATE = 0.5


# -- levels ------------------------------------------------------------------------------------
def rate_schedule(num_tokens: int, num_prefix: int, num_layers: int, rate: float) -> list[int]:
    """Tokens merged by each block when each merges ``rate`` of its mergeable (non-prefix) tokens,
    rounded, at most half of them (the bipartite limit): a geometric decay of the token count."""
    if not 0.0 <= rate <= MAX_RATE:
        raise ValueError(f"rate must be in [0, {MAX_RATE}], got {rate}")
    counts, n = [], num_tokens
    for _ in range(num_layers):
        r = min(round(rate * (n - num_prefix)), max_mergeable(n, num_prefix))
        counts.append(r)
        n -= r
    return counts


def level_config(reducer: str, prop_attn: bool, **budget: Any) -> BudgetConfig:
    """The fixed reducer a per-image level runs (``"auto"``: :class:`~tokenbudget.Auto`, ``"tome"``:
    :class:`~tokenbudget.ToMe`) at ``budget`` (``r=`` or ``keep=``)."""
    if reducer == "auto":
        return Auto(prop_attn=prop_attn, **budget)
    if reducer == "tome":
        return ToMe(prop_attn=prop_attn, **budget)
    raise ValueError(f"reducer must be 'auto' or 'tome', got {reducer!r}")


class _RateSchedule:
    """Mixin: blocks each merge ``rate`` of their mergeable tokens (:func:`rate_schedule`)."""

    rate: float
    num_layers: int

    def compute_plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        counts = rate_schedule(num_tokens, num_prefix, self.num_layers, self.rate)
        return counts, list(counts)


class _RateToMe(_RateSchedule, ToMeStrategy):
    """ToMe whose blocks each merge ``rate`` of their mergeable tokens."""


class _RateAuto(_RateSchedule, AutoStrategy):
    """Auto whose blocks each merge ``rate`` of their mergeable tokens."""


def level_strategy(
    reducer: str, prop_attn: bool, num_layers: int, rate: float | None = None, keep: float | None = None
) -> ScheduledStrategy:
    """The strategy of one level: ``reducer`` at ``tb.<Reducer>(keep=keep)`` (the anchored fixed
    budget) or, with ``rate``, at the geometric schedule of that merge rate."""
    if keep is not None:
        config = level_config(reducer, prop_attn, keep=keep)
        return (AutoStrategy if reducer == "auto" else ToMeStrategy)(config, num_layers)
    strategy = (_RateAuto if reducer == "auto" else _RateToMe)(
        level_config(reducer, prop_attn, r=0), num_layers
    )
    strategy.rate = rate
    return strategy


__all__ = ["MAX_RATE", "level_config", "level_strategy", "rate_schedule"]
