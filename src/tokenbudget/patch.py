"""apply / remove / last_state: the public way in and out of a patched model.

Thread safety: ``apply`` and ``remove`` wait until no other thread is running a forward through the
patch they replace (see :class:`~tokenbudget.context.ForwardGate`), up to ``timeout`` seconds, and
forwards that start meanwhile wait for the swap; calls on one model are serialised. Wrappers
(``nn.DataParallel``, ``DistributedDataParallel``, ``torch.compile``'s module) are looked through:
the model inside is patched, and every function here accepts either.
"""

from __future__ import annotations

import threading
import warnings
import weakref

from torch import nn

from .adapters import prepare
from .config import ReductionConfig
from .context import PatchContext
from .cost import CostModel, CostTable
from .schedule import clamp_message
from .state import TokenState

_ATTR = "_tokenbudget"  # where a patched model keeps its (adapter, context); not in state_dict

#: seconds ``apply`` / ``remove`` wait for forwards running in other threads before giving up
DEFAULT_TIMEOUT = 60.0

_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _model_lock(model: nn.Module) -> threading.RLock:
    """One lock per model: apply / remove on the same model from several threads run one at a time."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile``
    wrappers (any nesting); ``model`` itself otherwise."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, DataParallel):
            if len(model.device_ids) > 1:
                raise ValueError(
                    f"nn.DataParallel over {len(model.device_ids)} devices copies the model's modules on every "
                    "forward, and the copies do not carry the patch; use DistributedDataParallel (one "
                    "process per device, patch before wrapping) or a single device"
                )
            model = model.module
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        else:
            return model


def apply(model: nn.Module, config: ReductionConfig, *, timeout: float | None = DEFAULT_TIMEOUT) -> nn.Module:
    """Patch ``model`` in place to reduce tokens as ``config`` says; returns the model.

    Applying again replaces the previous patch, so it is safe to repeat or to change the config;
    a config that fails validation leaves the model as it was. The module tree and ``state_dict``
    keys are unchanged while patched; a patched model pickles (``torch.save``) and deep-copies
    into a model patched with the same config.

    ``model`` may be wrapped (``nn.DataParallel`` on one device, ``DistributedDataParallel``,
    ``torch.compile``): the model inside is patched (a compiled model recompiles on its next call).
    ``timeout``: seconds to wait for forwards that other threads are running through the current
    patch (``None``: no limit); ``RuntimeError`` after that, with the model unchanged. Compiled
    forwards are not counted: change the patch of a compiled model only while no thread runs it.
    """
    target = unwrap(model)
    if not isinstance(config, ReductionConfig):
        raise ValueError(
            f"config must be a tokenbudget config such as tb.ToMe(r=16), got {type(config).__name__}"
            + (
                "; build one with tb.config_from_json(...) or tb.config_from_dict(...)"
                if isinstance(config, (str, dict))
                else ""
            )
        )
    adapter, ctx = prepare(target, config)
    _warn_if_clamped(config, adapter, ctx)
    install_strategy(target, adapter, ctx, timeout=timeout)
    return model


def _warn_if_clamped(config: ReductionConfig, adapter: object, ctx: object) -> None:
    """Warn when the config asks some block, at the model's default input, to merge more tokens
    than one merge step can remove (the schedule is cut to the limit, as ToMe does)."""
    tokens = getattr(adapter, "default_num_tokens", None)
    plan = getattr(getattr(ctx, "strategy", None), "plan", None)
    if tokens is None or plan is None:
        return
    requested, merged = plan(tokens, adapter.num_prefix)
    message = clamp_message(requested, merged, tokens)
    if message is not None:
        budget = ", ".join(
            f"{k}={getattr(config, k)}"
            for k in ("r", "keep", "tokens")
            if getattr(config, k, None) is not None
        )
        warnings.warn(
            f"tb.{type(config).__name__}({budget}) at the model's {tokens} input tokens: {message}",
            stacklevel=3,
        )


def install_strategy(
    model: nn.Module, adapter: object, ctx: PatchContext, *, timeout: float | None = DEFAULT_TIMEOUT
) -> None:
    """Install a prepared context (its strategy) through ``adapter``; :func:`remove` undoes it.

    Waits for forwards through the current patch (see :func:`apply`); a failure leaves the model
    as it was, previous patch included.
    """
    with _model_lock(model):
        previous = model.__dict__.get(_ATTR)
        if previous is not None:
            previous[1].gate.close(timeout)  # RuntimeError after timeout: nothing changed
        ctx.gate.begin_install()
        if previous is not None:
            del model.__dict__[_ATTR]
            _uninstall(model, *previous)
        try:
            adapter.install(ctx)
            for module in _entry_modules(model, adapter):
                ctx.gate.attach(module)
        except BaseException:
            # A config the adapter refuses at install time (e.g. an attention implementation that
            # cannot take proportional attention) leaves the model as it was, previous patch included.
            _uninstall(model, adapter, ctx)
            ctx.gate.retire()
            if previous is not None:
                previous[0].install(previous[1])
                for module in _entry_modules(model, previous[0]):
                    previous[1].gate.attach(module)
                setattr(model, _ATTR, previous)
                previous[1].gate.open()
            raise
        setattr(model, _ATTR, (adapter, ctx))
        ctx.gate.open()
        if previous is not None:
            previous[1].gate.retire()


def _entry_modules(model: nn.Module, adapter: object) -> list[nn.Module]:
    """The modules whose calls a forward goes through: the model, and the part of it that runs the
    blocks and the pooling when users call that part directly (OpenCLIP's ``encode_image`` calls
    ``model.visual``; a transformers wrapper's backbone)."""
    modules = [model]
    for name in ("visual", "backbone"):
        part = getattr(adapter, name, None)
        if isinstance(part, nn.Module) and all(part is not m for m in modules):
            modules.append(part)
    return modules


def _uninstall(model: nn.Module, adapter: object, ctx: object) -> None:
    adapter.uninstall()
    ctx.gate.detach()


def remove(model: nn.Module, *, timeout: float | None = DEFAULT_TIMEOUT) -> nn.Module:
    """Undo :func:`apply` (a no-op on an unpatched model); returns the model.

    Waits for forwards that other threads are running through the patch (``timeout`` as in
    :func:`apply`).
    """
    target = unwrap(model)
    with _model_lock(target):
        patch = target.__dict__.get(_ATTR)
        if patch is not None:
            adapter, ctx = patch
            ctx.gate.close(timeout)
            del target.__dict__[_ATTR]
            _uninstall(target, adapter, ctx)
            ctx.gate.retire()
    return model


def is_patched(model: nn.Module) -> bool:
    return _ATTR in unwrap(model).__dict__


def installed(model: nn.Module) -> tuple[object, object] | None:
    """The (adapter, context) a patched model runs with, or ``None`` when it is not patched."""
    return unwrap(model).__dict__.get(_ATTR)


def _context(model: nn.Module) -> PatchContext:
    patch = unwrap(model).__dict__.get(_ATTR)
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
    ``patch_sizes``, ``scores``, ``tokens``); under ``tb.PerImage``: an
    :class:`~tokenbudget.adaptive.PerImageState` (each image's budget: ``speedups``, ``levels``,
    ``flops``, ``scores``)."""
    state = _context(model).last_state()
    if state is None:
        raise ValueError("the patched model has not run a forward yet; call it on a batch first")
    return state


def cost_model(model: nn.Module) -> CostModel:
    """The cost model of a model patched with ``cost_model="auto"``: its measured tables
    (``.tables``) and the schedules they gave (``.plans``)."""
    costs = _context(model).costs
    if costs is None:
        raise ValueError(
            "the model was patched without a cost model; use e.g. tb.ToMe(r=4, cost_model='auto')"
        )
    return costs


def set_cost_table(model: nn.Module, table: CostTable, num_tokens: int) -> None:
    """Use a fixed :class:`~tokenbudget.cost.CostTable` (instead of measuring) for inputs of
    ``num_tokens`` tokens at the table's batch size, device, dtype and thread count: the schedule
    is then a pure function of the table (reproducible, e.g. in tests)."""
    cost_model(model).set_table(table, num_tokens)
