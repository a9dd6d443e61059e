"""One strategy per method; each turns a config into per-forward token reduction."""

from __future__ import annotations

from ..config import GridPool, RandomDrop, ReductionConfig, ToFu, ToMe, ToMeOptimal
from .base import ScheduledStrategy
from .baselines import GridPoolStrategy, RandomDropStrategy
from .tofu import ToFuStrategy
from .tome import ToMeStrategy

_STRATEGIES: dict[type, type[ScheduledStrategy]] = {
    ToMe: ToMeStrategy,
    RandomDrop: RandomDropStrategy,
    GridPool: GridPoolStrategy,
    ToMeOptimal: ToMeStrategy,
    ToFu: ToFuStrategy,
}


def make_strategy(config: ReductionConfig, num_layers: int) -> ScheduledStrategy:
    """The strategy object for ``config`` on a model with ``num_layers`` blocks."""
    cls = _STRATEGIES.get(type(config))
    if cls is None:
        raise ValueError(
            f"no strategy for config {config!r}; known configs: {[c.__name__ for c in _STRATEGIES]}"
        )
    return cls(config, num_layers)


__all__ = [
    "GridPoolStrategy",
    "RandomDropStrategy",
    "ScheduledStrategy",
    "ToFuStrategy",
    "ToMeStrategy",
    "make_strategy",
]
