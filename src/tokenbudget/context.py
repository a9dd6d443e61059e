"""PatchContext: what a patched model carries: its strategy, and per-thread, per-forward state.

Also the :class:`ForwardGate` of a patch (which threads are running a forward through it), and
the pickling rules of both: thread-local slots, locks and the threads inside belong to one process,
so a copied, pickled or ``torch.save``-d model starts with fresh ones and otherwise the same patch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .state import TokenState


class PatchContext:
    """Shared by the wrapped blocks of one patched model.

    Nothing here changes during a forward except thread-local slots, so concurrent forwards on
    one patched model (one per thread) never see each other's state.
    """

    def __init__(self, strategy: Any, num_prefix: int, num_layers: int, grid: tuple[int, int] | None) -> None:
        self.strategy = strategy
        self.num_prefix = num_prefix
        self.num_layers = num_layers
        self.grid = grid  # the model's default patch grid
        self._local = threading.local()
        self.latest: TokenState | None = None  # latest finished forward, any thread
        #: callbacks ``observe(layer, tokens [B, N', C], state)`` each block calls after its reduction
        #: and before its MLP (measurements such as the entropy profile; empty by default)
        self.observers: list[Callable[[int, Tensor, TokenState], None]] = []
        self.gate = ForwardGate()

    # -- per-thread slots -------------------------------------------------------------------
    @property
    def local(self) -> threading.local:
        return self._local

    def new_state(self, x: Tensor) -> TokenState:
        """A fresh state for tokens ``x`` [B, N, C] entering the first block."""
        batch, num_tokens = x.shape[0], x.shape[1]
        requested, merged = self.strategy.plan(num_tokens, self.num_prefix)
        state = TokenState(
            batch_size=batch,
            input_tokens=num_tokens,
            num_prefix=self.num_prefix,
            grid=self._grid_for(num_tokens),
            requested_per_layer=requested,
            merged_per_layer=merged,
            device=x.device,
        )
        if self.strategy.trace_source:
            state.token_map = torch.arange(num_tokens, device=x.device).expand(batch, -1).clone()
        if getattr(self.strategy, "needs_positions", False):
            state.positions = _grid_positions(state, x.device)
        self._local.state = state
        return state

    def state_for_block(self, layer: int, x: Tensor) -> TokenState | None:
        """The state of the forward that ``x`` belongs to; a new one at block 0.

        ``None`` for a block reached without its predecessors in this thread (a forward that began
        before the patch was installed, or blocks called one by one from the middle): nothing is
        known about what those tokens went through, so the block runs unreduced.
        """
        if layer == 0:
            # Never read the previous forward's slot here: under torch.compile that read would be
            # guarded on, and the first forward (no slot yet) would force a recompile.
            return self.new_state(x)
        state = getattr(self._local, "state", None)
        if (
            state is None
            or len(state.tokens_per_layer) != layer
            or state.num_tokens != x.shape[1]
            or state.batch_size != x.shape[0]
        ):
            return None
        return state

    def abandon(self) -> None:
        """This thread's forward stopped in a block (it raised): forget its state."""
        self._local.state = None

    def finish(self, state: TokenState) -> None:
        """Publish the state of a finished forward (for ``last_state`` and the pooling head)."""
        self._local.last = state
        self.latest = state

    def last_state(self) -> TokenState | None:
        """This thread's latest finished forward, else the latest of any thread."""
        return getattr(self._local, "last", None) or self.latest

    def __getstate__(self) -> dict:
        # threading.local cannot be copied or pickled: a copied or loaded model starts with fresh
        # slots and no finished forward; strategy, counts and gate (its hook handles) go along.
        return {key: value for key, value in self.__dict__.items() if key not in ("_local", "latest")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self.latest = None

    def _grid_for(self, num_tokens: int) -> tuple[int, int] | None:
        patches = num_tokens - self.num_prefix
        if self.grid is not None and self.grid[0] * self.grid[1] == patches:
            return self.grid
        side = int(round(patches**0.5))
        return (side, side) if side * side == patches else None


def compiling() -> bool:
    """True while torch.compile traces: the gate's bookkeeping (locks, thread ids) stays out of graphs."""
    return torch.compiler.is_compiling()


class ForwardGate:
    """Which threads are running a forward through one installed patch, so that replacing or
    removing the patch never cuts through one.

    A forward enters the gate when the model is called (a pre-hook on the model; nested calls
    count) or, for a bare run of the blocks (``forward_features``), at the first block; it leaves
    when the call returns or, for blocks, after the last block, also when either raises.
    ``tb.apply`` / ``tb.remove`` :meth:`close` the gate of the patch they replace: it waits until no
    other thread is inside, then the patch is swapped and the old gate retired. A forward that
    arrives at a gate that is closing or still being installed waits until the swap is over and
    then runs through whatever is installed by then, so every forward runs under one config from
    start to end. Under torch.compile the gate is skipped (a compiled graph holds its own copy of
    the patch). Pickling keeps only the model hooks' handles; a loaded model starts with an open
    gate and nobody inside.
    """

    _OPEN, _INSTALLING, _CLOSING, _RETIRED = "open", "installing", "closing", "retired"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._status = self._OPEN
        self._writer: int | None = None  # the thread installing or closing the patch
        self._inside: dict[int, _Visit] = {}  # thread id -> what that thread is running
        self._handles: list[Any] = []  # the model hooks of attach()

    # -- the forward side ----------------------------------------------------------------------
    def enter(self, blocks: bool = False) -> bool:
        """Register this thread's forward (a model call, or with ``blocks=True`` a run of the
        blocks); ``False`` when the patch was replaced or removed while waiting: the caller then
        runs whatever the model has installed now and must not :meth:`leave`."""
        me = threading.get_ident()
        with self._cond:
            visit = self._inside.get(me)
            inside = visit is not None and visit.calls > 0  # already counted: a writer waits for it
            if self._status != self._OPEN and self._writer != me and not inside:
                self._cond.wait_for(lambda: self._status in (self._OPEN, self._RETIRED))
            if self._status == self._RETIRED:
                return False
            if visit is None:
                visit = self._inside[me] = _Visit(threading.current_thread())
            if blocks:
                visit.in_blocks = True
            else:
                visit.calls += 1
            return True

    def leave(self, blocks: bool = False) -> None:
        """This thread's forward (model call, or run of the blocks) is over."""
        me = threading.get_ident()
        with self._cond:
            visit = self._inside.get(me)
            if visit is None:
                return
            if blocks:
                visit.in_blocks = False
            else:
                visit.calls = max(visit.calls - 1, 0)
                visit.in_blocks = visit.in_blocks and visit.calls > 0  # a model call ends its blocks too
            if not visit.calls and not visit.in_blocks:
                del self._inside[me]
            self._cond.notify_all()

    # -- the apply / remove side ---------------------------------------------------------------
    def close(self, timeout: float | None) -> None:
        """Wait until no other thread runs a forward through this patch and keep new ones out;
        ``RuntimeError`` (and the gate open again) after ``timeout`` seconds."""
        me = threading.get_ident()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            own = self._inside.get(me)
            if own is not None and own.calls:
                raise RuntimeError(
                    "tb.apply / tb.remove was called from inside a forward of the same model (e.g. from "
                    "a forward hook); change the patch between forwards"
                )
            self._cond.wait_for(lambda: self._status != self._CLOSING)  # another writer first
            self._status, self._writer = self._CLOSING, me
            while True:
                busy = self._busy(me)
                if not busy:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._status, self._writer = self._OPEN, None
                    self._cond.notify_all()
                    raise RuntimeError(
                        f"a forward of this model is still running in thread(s) {busy} after {timeout} s; "
                        "tb.apply / tb.remove wait for the forwards of other threads to finish: call them "
                        "when the model is idle, or give a longer timeout="
                    )
                # Wake up now and then: a thread that died inside a forward never leaves.
                self._cond.wait(0.05 if left is None else min(left, 0.05))

    def begin_install(self) -> None:
        """The patch is being installed by this thread: forwards arriving meanwhile wait."""
        with self._cond:
            self._status, self._writer = self._INSTALLING, threading.get_ident()

    def open(self) -> None:
        """The patch is installed (or, after a failed :meth:`close`, kept): forwards may run."""
        with self._cond:
            self._status, self._writer = self._OPEN, None
            self._cond.notify_all()

    def retire(self) -> None:
        """The patch is gone: forwards waiting here run whatever is installed now."""
        with self._cond:
            self._status, self._writer = self._RETIRED, None
            self._inside.clear()
            self._cond.notify_all()

    def _busy(self, me: int) -> list[str]:
        return [
            visit.thread.name
            for ident, visit in self._inside.items()
            if ident != me and visit.thread.is_alive() and (visit.calls or visit.in_blocks)
        ]

    # -- model hooks ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Count calls of ``model`` (its ``__call__``: forward hooks, also on errors)."""
        self._handles.append(model.register_forward_pre_hook(_EnterCall(self)))
        self._handles.append(model.register_forward_hook(_LeaveCall(self), always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __getstate__(self) -> dict:
        # Locks and the threads inside are this process's; a copied or loaded model starts idle.
        return {"_handles": self._handles}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self._handles = state["_handles"]


@dataclass
class _Visit:
    thread: threading.Thread
    calls: int = 0  # nested model calls in progress
    in_blocks: bool = False  # inside a run of the blocks


class _EnterCall:
    """Forward pre-hook: a call of the patched model enters its gate."""

    def __init__(self, gate: ForwardGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not compiling():
            # A call that waited out a swap of the patch is not counted here: it runs through the
            # new patch, whose blocks count it.
            self.gate.enter()


class _LeaveCall:
    """Forward hook (``always_call``): a call of the patched model leaves its gate, also on errors."""

    def __init__(self, gate: ForwardGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not compiling():
            self.gate.leave()


def _grid_positions(state: TokenState, device: torch.device) -> torch.Tensor:
    """[B, N, 2] (row, col) of every input token on the patch grid; prefix tokens at (0, 0)."""
    if state.grid is None:
        raise ValueError(
            f"{state.input_tokens - state.num_prefix} patch tokens do not form a known grid; "
            "position-based reduction needs the patch grid"
        )
    rows, cols = state.grid
    r = torch.arange(rows, device=device, dtype=torch.float32).repeat_interleave(cols)
    c = torch.arange(cols, device=device, dtype=torch.float32).repeat(rows)
    patches = torch.stack([r, c], dim=1)  # [rows * cols, 2], row-major like the patch tokens
    prefix = torch.zeros(state.num_prefix, 2, device=device)
    return torch.cat([prefix, patches]).expand(state.batch_size, -1, -1)
