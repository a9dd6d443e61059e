"""What every strategy shares: per-layer counts for an input length, planned once per length."""

from __future__ import annotations

from typing import Any

from ..config import BudgetConfig, ReductionConfig
from ..schedule import clamp_schedule, resolve_schedule

#: config class -> the strategy class that runs it (filled by :func:`register`)
STRATEGIES: dict[type, type] = {}


def register(*config_classes: type[ReductionConfig]) -> Any:
    """Class decorator tying a strategy to the config classes it runs::

    @register(ToMe, ToMeDetail)
    class ToMeStrategy(ScheduledStrategy): ...
    """

    def decorate(strategy: type) -> type:
        for config_class in config_classes:
            STRATEGIES[config_class] = strategy
        return strategy

    return decorate


def make_strategy(config: ReductionConfig, num_layers: int) -> Any:
    """The strategy object for ``config`` on a model with ``num_layers`` blocks."""
    for cls in type(config).__mro__:
        strategy = STRATEGIES.get(cls)
        if strategy is not None:
            return strategy(config, num_layers)
    raise ValueError(
        f"no strategy runs {type(config).__name__}; registered configs: "
        f"{sorted(c.__name__ for c in STRATEGIES)}"
    )


class ScheduledStrategy:
    """Plans ``(requested, merged)`` counts per block from a :class:`BudgetConfig`.

    Subclasses implement ``reduce(x, keys, state, layer)`` and say what they need from the adapter
    (``needs_keys``) and from the state (``needs_positions``).
    """

    needs_keys = False
    needs_positions = False

    def __init__(self, config: ReductionConfig, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers
        # Plans depend only on the input length; cached so a forward does no schedule work.
        # Plain dict: concurrent forwards at worst compute the same plan twice.
        self._plans: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    @property
    def prop_attn(self) -> bool:
        return getattr(self.config, "prop_attn", False)

    @property
    def trace_source(self) -> bool:
        return getattr(self.config, "trace_source", False)

    def plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        """(requested, merged) counts per block for an input of ``num_tokens`` tokens (cached)."""
        key = (num_tokens, num_prefix)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.compute_plan(num_tokens, num_prefix)
        return plan

    def compute_plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        """The uncached plan: the config's budget (:class:`BudgetConfig`) as a per-layer schedule,
        clamped to what bipartite matching can remove per block."""
        c: BudgetConfig = self.config
        requested = resolve_schedule(
            r=c.r,
            keep=c.keep,
            tokens=c.tokens,
            num_tokens=num_tokens,
            num_prefix=num_prefix,
            num_layers=self.num_layers,
        )
        return requested, clamp_schedule(requested, num_tokens, num_prefix)

    def check_model(self, adapter: Any) -> None:
        """Raise ``ValueError`` when the patched model lacks what this strategy needs (none here)."""
