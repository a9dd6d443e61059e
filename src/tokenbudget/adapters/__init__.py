"""Framework adapters: the only place that knows how a framework's models are built.

:class:`~tokenbudget.adapters.base.Adapter` states what the library needs from a model; each
framework module registers its adapter with :func:`register_adapter`, and :func:`find_adapter`
tries them in turn. Models are recognised by class path, so optional frameworks are never imported
to check. :func:`prepare` turns a config into the (adapter, context) pair that
:func:`tokenbudget.apply` installs, through the installers registered per config class.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from ..config import ReductionConfig
from ..context import PatchContext
from ..strategies import make_strategy
from .base import ADAPTERS, INSTALLERS, Adapter, register_adapter, register_installer

# Importing every module of this package registers its adapters and installers, so a new framework
# is one new file here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _matching_adapter(model: nn.Module) -> type[Adapter] | None:
    return next((cls for cls in ADAPTERS if cls.matches(model)), None)


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; ``ValueError`` naming what is supported when there is none."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"tokenbudget expects a torch.nn.Module, got {type(model).__name__}")
    cls = _matching_adapter(model)
    if cls is not None:
        return cls(model)
    inside = _patchable_inside(model)
    if inside:
        paths = " or ".join(f"tb.apply(model.{path}, config)" for path in inside[:3])
        raise ValueError(
            f"tokenbudget cannot patch {type(model).__module__}.{type(model).__name__} itself, but it holds "
            f"a model it can patch: call {paths} (the outer model then runs the patched one)"
        )
    supported = "; ".join(cls.supported for cls in ADAPTERS)
    raise ValueError(
        f"tokenbudget cannot patch {type(model).__module__}.{type(model).__name__}: it supports {supported}"
    )


def _patchable_inside(model: nn.Module) -> list[str]:
    """Attribute paths of the outermost submodules of ``model`` that an adapter can patch."""
    found: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{p}.") for p in found):
            continue
        cls = _matching_adapter(module)
        if cls is None:
            continue
        try:
            cls(module)
        except ValueError:
            continue
        found.append(path)
    return found


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
