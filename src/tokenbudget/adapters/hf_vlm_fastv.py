"""What a VLM patch carries (:class:`VLMContext`), and the installer of FastV (a cut inside the
language model) through ``tokenbudget.adapters.hf_vlm_llm`` when that module is present."""

from __future__ import annotations

import threading
import types
from typing import Any

from torch import nn

from ..config.vlm import VisualTokens
from ..context import ForwardGate


class VLMContext:
    """What a VLM patch carries: the config (as ``strategy.config``), its gate and the latest state."""

    def __init__(self, config: VisualTokens) -> None:
        self.strategy = types.SimpleNamespace(config=config)
        self.gate = ForwardGate()
        self.costs = None
        self.latest: Any = None
        self._local = threading.local()

    def finish(self, state: Any) -> None:
        self._local.last = state
        self.latest = state

    def last_state(self) -> Any:
        return getattr(self._local, "last", None) or self.latest

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "latest")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local, self.latest = threading.local(), None


class FastVAdapter:
    """Installs FastV (a cut inside the language model) through ``tokenbudget.adapters.hf_vlm_llm``."""

    name = "hf-vlm-llm"

    def __init__(self, model: nn.Module, config: VisualTokens) -> None:
        try:
            from .hf_vlm_llm import install_fastv
        except ImportError:
            raise NotImplementedError(
                "FastV's LLM-side patch (tokenbudget.adapters.hf_vlm_llm) is not in this build"
            ) from None
        self.model, self.config, self._install, self.handle = model, config, install_fastv, None

    def install(self, ctx: VLMContext) -> None:
        self.handle = self._install(self.model, self.config)
        ctx.last_state = _HandleState(self.handle)  # the handle records what FastV did

    def uninstall(self) -> None:
        if self.handle is not None:
            self.handle.uninstall()
            self.handle = None


class _HandleState:
    """``last_state()`` of a FastV patch: its handle's ``last_state()`` or ``state``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __call__(self) -> Any:
        last = getattr(self.handle, "last_state", None)
        return last() if callable(last) else getattr(self.handle, "state", None)
