"""apply / remove / last_state: the public way in and out of a patched model."""

from __future__ import annotations

from torch import nn

from .adapters import prepare
from .config import ReductionConfig
from .context import PatchContext
from .state import TokenState

_ATTR = "_tokenbudget"  # where a patched model keeps its (adapter, context); not in state_dict


def apply(model: nn.Module, config: ReductionConfig) -> nn.Module:
    """Patch ``model`` in place to reduce tokens as ``config`` says; returns the model.

    Applying again replaces the previous patch, so it is safe to repeat or to change the config;
    a config that fails validation leaves the model as it was. The module tree and ``state_dict``
    keys are unchanged while patched.
    """
    if not isinstance(config, ReductionConfig):
        raise ValueError(
            f"config must be a tokenbudget config such as tb.ToMe(r=16), got {type(config).__name__}"
        )
    install_strategy(model, *prepare(model, config))
    return model


def install_strategy(model: nn.Module, adapter: object, ctx: PatchContext) -> None:
    """Install a prepared context (its strategy) through ``adapter``; :func:`remove` undoes it."""
    previous = model.__dict__.get(_ATTR)
    remove(model)
    try:
        adapter.install(ctx)
    except Exception:
        # A config the adapter refuses at install time (e.g. an attention implementation that
        # cannot take proportional attention) leaves the model as it was, previous patch included.
        adapter.uninstall()
        if previous is not None:
            previous[0].install(previous[1])
            setattr(model, _ATTR, previous)
        raise
    setattr(model, _ATTR, (adapter, ctx))


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (a no-op on an unpatched model); returns the model."""
    patch = model.__dict__.pop(_ATTR, None)
    if patch is not None:
        adapter, _ = patch
        adapter.uninstall()
    return model


def is_patched(model: nn.Module) -> bool:
    return _ATTR in model.__dict__


def installed(model: nn.Module) -> tuple[object, object] | None:
    """The (adapter, context) a patched model runs with, or ``None`` when it is not patched."""
    return model.__dict__.get(_ATTR)


def _context(model: nn.Module) -> PatchContext:
    patch = model.__dict__.get(_ATTR)
    if patch is None:
        raise ValueError("model is not patched; call tb.apply(model, config) first")
    return patch[1]


def patched_config(model: nn.Module) -> ReductionConfig:
    """The config a patched model runs with."""
    return _context(model).strategy.config


def last_state(model: nn.Module) -> TokenState:
    """The :class:`TokenState` of the latest finished forward of a patched model (this thread's if
    it ran one): ``tokens_per_layer``, ``sizes``, ``source`` (with ``trace_source=True``), ...
    Under ``tb.AdaptivePatch``: an :class:`~tokenbudget.adaptive.AdaptivePatchState` (per-image
    ``patch_sizes``, ``scores``, ``tokens``)."""
    state = _context(model).last_state()
    if state is None:
        raise ValueError("the patched model has not run a forward yet; call it on a batch first")
    return state
