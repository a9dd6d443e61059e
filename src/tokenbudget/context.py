"""PatchContext: what a patched model carries: its strategy, and per-thread, per-forward state."""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch import Tensor

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
        self.blocks: dict[int, Any] = {}  # layer -> the block's reducing forward (set at install)
        self.costs: Any = None  # a tokenbudget.cost.CostModel with cost_model="auto"

    # -- per-thread slots -------------------------------------------------------------------
    @property
    def local(self) -> threading.local:
        return self._local

    def new_state(self, x: Tensor) -> TokenState:
        """A fresh state for tokens ``x`` [B, N, C] entering the first block."""
        batch, num_tokens = x.shape[0], x.shape[1]
        requested, merged = self.strategy.plan(num_tokens, self.num_prefix)
        skipped: list[int] = []
        if self.costs is not None and not torch.compiler.is_compiling():
            # Merge only where it pays (measured once per shape; a compiled graph keeps the plan).
            plan = self.costs.plan(x, merged, self.num_prefix)
            if plan is not None:
                merged, skipped = plan.merged, plan.skipped
        state = TokenState(
            batch_size=batch,
            input_tokens=num_tokens,
            num_prefix=self.num_prefix,
            grid=self._grid_for(num_tokens),
            requested_per_layer=requested,
            merged_per_layer=merged,
            device=x.device,
            skipped_layers=skipped,
        )
        if self.strategy.trace_source:
            state.token_map = torch.arange(num_tokens, device=x.device).expand(batch, -1).clone()
        if getattr(self.strategy, "needs_positions", False):
            state.positions = _grid_positions(state, x.device)
        self._local.state = state
        return state

    def state_for_block(self, layer: int, x: Tensor) -> TokenState:
        """The state of the forward that ``x`` belongs to; a new one at block 0.

        A block reached without its predecessors (a user calling blocks one by one from the
        middle) also starts a fresh state, so a stale state is never applied to other tokens.
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
            state = self.new_state(x)
        return state

    def finish(self, state: TokenState) -> None:
        """Publish the state of a finished forward (for ``last_state`` and the pooling head)."""
        self._local.last = state
        self.latest = state

    def last_state(self) -> TokenState | None:
        """This thread's latest finished forward, else the latest of any thread."""
        return getattr(self._local, "last", None) or self.latest

    def __deepcopy__(self, memo: dict) -> PatchContext:
        # threading.local cannot be copied: a copied model starts with fresh slots.
        new = PatchContext.__new__(PatchContext)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key not in ("_local", "latest"):
                setattr(new, key, copy.deepcopy(value, memo))
        new._local = threading.local()
        new.latest = None
        return new

    def _grid_for(self, num_tokens: int) -> tuple[int, int] | None:
        patches = num_tokens - self.num_prefix
        if self.grid is not None and self.grid[0] * self.grid[1] == patches:
            return self.grid
        side = int(round(patches**0.5))
        return (side, side) if side * side == patches else None


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
