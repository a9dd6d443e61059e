"""One strategy per method; each turns a config into per-forward token reduction."""

from __future__ import annotations

from ..config import ReductionConfig, ToMe
from .tome import ToMeStrategy


def make_strategy(config: ReductionConfig, num_layers: int) -> ToMeStrategy:
    """The strategy object for ``config`` on a model with ``num_layers`` blocks."""
    if isinstance(config, ToMe):
        return ToMeStrategy(config, num_layers)
    raise ValueError(f"no strategy for config {config!r}; known configs: ToMe")


__all__ = ["ToMeStrategy", "make_strategy"]
