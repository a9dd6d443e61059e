"""What every strategy shares: turning a budget config into per-layer counts for an input length."""

from __future__ import annotations

from ..config import BudgetConfig
from ..schedule import clamp_schedule, resolve_schedule


class ScheduledStrategy:
    """Plans ``(requested, merged)`` counts per block from a :class:`BudgetConfig`.

    Subclasses implement ``reduce(x, keys, state, layer)`` and say what they need from the adapter
    (``needs_keys``) and from the state (``needs_positions``).
    """

    needs_keys = False
    needs_positions = False

    def __init__(self, config: BudgetConfig, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers
        # Plans depend only on the input length; cached so a forward does no schedule work.
        # Plain dict: concurrent forwards at worst compute the same plan twice.
        self._plans: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    @property
    def prop_attn(self) -> bool:
        return getattr(self.config, "prop_attn", False)

    @property
    def trace_source(self) -> bool:
        return getattr(self.config, "trace_source", False)

    def plan(self, num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
        """(requested, merged) counts per block for an input of ``num_tokens`` tokens."""
        key = (num_tokens, num_prefix)
        plan = self._plans.get(key)
        if plan is None:
            c = self.config
            requested = resolve_schedule(
                r=c.r,
                keep=c.keep,
                tokens=c.tokens,
                num_tokens=num_tokens,
                num_prefix=num_prefix,
                num_layers=self.num_layers,
            )
            plan = (requested, clamp_schedule(requested, num_tokens, num_prefix))
            self._plans[key] = plan
        return plan
