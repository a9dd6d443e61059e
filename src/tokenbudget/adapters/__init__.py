"""Framework adapters: the only place that knows how a framework's models are built.

Each adapter is looked up by class path, so optional frameworks are never imported to check.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import hf as hf_adapter
from . import openclip as openclip_adapter
from . import timm as timm_adapter


def find_adapter(model: nn.Module) -> Any:
    """The adapter for ``model``; ``ValueError`` naming what is supported when there is none."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"tb.apply expects a torch.nn.Module, got {type(model).__name__}")
    if timm_adapter.matches(model):
        return timm_adapter.TimmAdapter(model)
    if hf_adapter.matches(model):
        return hf_adapter.HFAdapter(model)
    if openclip_adapter.matches(model):
        return openclip_adapter.OpenCLIPAdapter(model)
    inside = _patchable_inside(model)
    if inside:
        paths = " or ".join(f"tb.apply(model.{path}, config)" for path in inside[:3])
        raise ValueError(
            f"tokenbudget cannot patch {type(model).__module__}.{type(model).__name__} itself, but it holds "
            f"a model it can patch: call {paths} (the outer model then runs the patched one)"
        )
    raise ValueError(
        f"tokenbudget cannot patch {type(model).__module__}.{type(model).__name__}: it supports "
        f"{timm_adapter.SUPPORTED}; {hf_adapter.SUPPORTED}; and {openclip_adapter.SUPPORTED}"
    )


def _patchable_inside(model: nn.Module) -> list[str]:
    """Attribute paths of the outermost submodules of ``model`` that an adapter can patch."""
    found: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{p}.") for p in found):
            continue
        try:
            adapter = None
            if timm_adapter.matches(module):
                adapter = timm_adapter.TimmAdapter(module)
            elif hf_adapter.matches(module):
                adapter = hf_adapter.HFAdapter(module)
            elif openclip_adapter.matches(module):
                adapter = openclip_adapter.OpenCLIPAdapter(module)
        except ValueError:
            continue
        if adapter is not None:
            found.append(path)
    return found


__all__ = ["find_adapter"]
