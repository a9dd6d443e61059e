"""apply / remove / last_state: the public way in and out of a patched model."""

from __future__ import annotations

from torch import nn

from .adapters import find_adapter
from .config import AdaptivePatch, PerImage, ReductionConfig
from .context import PatchContext
from .state import TokenState
from .strategies import make_strategy

_ATTR = "_tokenbudget"  # where a patched model keeps its (adapter, context); not in state_dict


def apply(model: nn.Module, config: ReductionConfig) -> nn.Module:
    """Patch ``model`` in place to reduce tokens as ``config`` says; returns the model.

    Applying again replaces the previous patch, so it is safe to repeat or to change the config;
    a config that fails validation leaves the model as it was. The module tree and ``state_dict``
    keys are unchanged while patched.
    """
    if isinstance(config, AdaptivePatch):
        # Not a per-block reduction: it sets each image's patch grid before the blocks (tb.adaptive).
        from .adapters.timm_adaptive import prepare

        install_strategy(model, *prepare(model, config))
        return model
    if isinstance(config, PerImage):
        # Not one per-block reduction: each image's budget level is chosen by a glance (tb.PerImage).
        from .adapters.timm_per_image import prepare as prepare_per_image

        install_strategy(model, *prepare_per_image(model, config))
        return model
    if not isinstance(config, ReductionConfig):
        raise ValueError(
            f"config must be a tokenbudget config such as tb.ToMe(r=16), got {type(config).__name__}"
        )
    adapter = find_adapter(model)
    strategy = make_strategy(config, adapter.num_layers)
    strategy.check_model(adapter)  # e.g. class-attention pruning on a model without a class token
    if adapter.default_num_tokens is not None:
        # Fail at apply time, not at the first forward, for budgets the default input cannot meet.
        strategy.plan(adapter.default_num_tokens, adapter.num_prefix)
    ctx = PatchContext(strategy, adapter.num_prefix, adapter.num_layers, adapter.grid)
    install_strategy(model, adapter, ctx)
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
    ``patch_sizes``, ``scores``, ``tokens``); under ``tb.PerImage``: a
    :class:`~tokenbudget.adaptive.per_image.PerImageState` (per-image ``speedups``, ``levels``, ``flops``)."""
    state = _context(model).last_state()
    if state is None:
        raise ValueError("the patched model has not run a forward yet; call it on a batch first")
    return state
