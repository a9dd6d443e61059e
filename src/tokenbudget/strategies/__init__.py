"""One strategy per method; each turns a config into per-forward token reduction."""

from __future__ import annotations

from ..config import (
    Auto,
    DynamicViT,
    GridPool,
    PiToMe,
    Prune,
    RandomDrop,
    ReductionConfig,
    ToFu,
    ToMe,
    ToMeDetail,
    ToMeGuard,
    ToMeOptimal,
)
from .auto import AutoStrategy
from .base import ScheduledStrategy
from .baselines import GridPoolStrategy, RandomDropStrategy
from .dynamicvit import DynamicViTStrategy
from .pitome import PiToMeStrategy
from .prune import PruneStrategy
from .tofu import ToFuStrategy
from .tome import ToMeStrategy

_STRATEGIES: dict[type, type[ScheduledStrategy]] = {
    ToMe: ToMeStrategy,
    ToMeDetail: ToMeStrategy,
    RandomDrop: RandomDropStrategy,
    GridPool: GridPoolStrategy,
    Prune: PruneStrategy,
    DynamicViT: DynamicViTStrategy,
    ToMeOptimal: ToMeStrategy,
    ToFu: ToFuStrategy,
    ToMeGuard: ToMeStrategy,
    PiToMe: PiToMeStrategy,
    Auto: AutoStrategy,
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
    "AutoStrategy",
    "DynamicViTStrategy",
    "GridPoolStrategy",
    "PiToMeStrategy",
    "PruneStrategy",
    "RandomDropStrategy",
    "ScheduledStrategy",
    "ToFuStrategy",
    "ToMeStrategy",
    "make_strategy",
]
