"""Framework adapters: the only place that knows how a framework's models are built.

:class:`~tokenbudget.adapters.base.Adapter` states what the library needs from a model; each
framework module registers its adapter with :func:`register_adapter`, and :func:`find_adapter`
tries them in turn. Models are recognised by class path, so optional frameworks are never imported
to check. :func:`prepare` turns a config into the (adapter, context) pair that
:func:`tokenbudget.apply` installs, through the installers registered per config class.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import ReductionConfig
from ..context import PatchContext
from ..strategies import make_strategy
from . import (  # noqa: F401 - importing registers the adapters
    hf,
    openclip,
    timm,
    timm_adaptive,  # noqa: F401 - registers the AdaptivePatch installer
)
from .base import ADAPTERS, INSTALLERS, Adapter, register_adapter, register_installer


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; ``ValueError`` naming what is supported when there is none."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"tokenbudget expects a torch.nn.Module, got {type(model).__name__}")
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    supported = "; ".join(cls.supported for cls in ADAPTERS)
    raise ValueError(
        f"tokenbudget cannot patch {type(model).__module__}.{type(model).__name__}: it supports {supported}"
    )


@register_installer(ReductionConfig)
def prepare_blocks(model: nn.Module, config: ReductionConfig) -> tuple[Adapter, PatchContext]:
    """(adapter, context) of a per-block reduction: every block reduces tokens between its attention
    and its MLP as ``config``'s strategy says."""
    adapter = find_adapter(model)
    strategy = make_strategy(config, adapter.num_layers)
    strategy.check_model(adapter)  # e.g. class-attention pruning on a model without a class token
    if adapter.default_num_tokens is not None:
        # Fail at apply time, not at the first forward, for budgets the default input cannot meet.
        strategy.plan(adapter.default_num_tokens, adapter.num_prefix)
    return adapter, PatchContext(strategy, adapter.num_prefix, adapter.num_layers, adapter.grid)


def prepare(model: nn.Module, config: ReductionConfig) -> tuple[Any, Any]:
    """The (adapter, context) that patches ``model`` for ``config`` (not installed yet)."""
    for cls in type(config).__mro__:
        installer = INSTALLERS.get(cls)
        if installer is not None:
            return installer(model, config)
    raise ValueError(f"no installer for {type(config).__name__}")  # unreachable for ReductionConfigs


__all__ = ["Adapter", "find_adapter", "prepare", "register_adapter", "register_installer"]
