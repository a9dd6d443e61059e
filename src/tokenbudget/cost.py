"""The cost model: merge only in blocks where merging saves more time than it costs.

A merging block pays a fixed cost for its reduction step (capturing the keys, matching, merging:
about a dozen small tensor operations) and saves the work of the merged tokens in the rest of the
model. On a GPU or a CPU at a large batch the saving always wins; at batch 1 it does not for a few
tokens merged late (ViT-S at batch 1 on a CPU: ``r=1`` or ``r=2`` ran slower than the unpatched
model). A :class:`CostTable` holds what the blocks of one model cost at one batch size on one
device (measured, see :func:`tokenbudget.adapters.calibrate.measure_costs`, or given);
:func:`plan_with_costs` turns a planned schedule into one that merges only where it pays:

1. every block whose merges cost more than they save (with the rest of the schedule as it is)
   is a candidate to skip; the worst one is skipped;
2. its merges go to the blocks that still merge, in proportion to what they merge already (the
   schedule keeps its shape), with merges moved earlier where a block cannot take its share
   (a bipartite step removes at most half of its mergeable tokens), so the final token count
   stays the plan's;
3. repeat until every merging block pays, and keep the fastest schedule seen; it replaces the
   plan only if it saves at least :data:`MIN_GAIN` (1 %) of the unreduced time, since smaller
   differences are within a measured table's noise. If no schedule with the planned total is
   faster than no reduction at all (by more than that margin), the losing merges are dropped
   instead (all of them if need be), and :attr:`CostPlan.met` says the budget was not met.

The whole decision is a pure function of the table: a fixed table gives a fixed schedule.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .ops.match import max_mergeable

#: ``cost_model`` values of a config: ``"off"`` (the plan as given) or ``"auto"`` (measure once per
#: input shape, batch size, device and dtype, then merge only where it pays)
COST_MODELS = ("off", "auto")


def _least_squares(points: Sequence[float], values: Sequence[float], degree: int) -> list[float]:
    """Coefficients ``(c0, c1, ...)`` of ``c0 + c1 n + ... + c_d n^d``, dropping the highest
    power while its coefficient comes out negative (times grow with the token count)."""
    degree = min(degree, len(points) - 1)
    n = torch.tensor(points, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64).unsqueeze(1)
    while True:
        basis = torch.stack([n**k for k in range(degree + 1)], dim=1)
        coef = torch.linalg.lstsq(basis, y).solution[:, 0].tolist()
        if degree == 0 or min(coef[1:]) >= 0:
            return coef
        degree -= 1


def _fit(points: Sequence[int], values: Sequence[float], degree: int) -> tuple[float, ...]:
    """A polynomial through timings, robust to the odd slow one. A time can only come out too
    slow (another process took the core), never too fast: a point more than 25 % above the curve
    through the other points is dropped (the worst first, up to a third of the points), then the
    curve is fitted by least squares."""
    kept = list(range(len(points)))

    def curve(subset: list[int]) -> list[float]:
        return _least_squares([points[i] for i in subset], [values[i] for i in subset], degree)

    while len(kept) > max(degree + 2, 2 * len(points) // 3):

        def through_others(i: int) -> float:
            coef = curve([j for j in kept if j != i])
            return sum(c * points[i] ** k for k, c in enumerate(coef))

        at = {i: through_others(i) for i in kept}
        worst = max(kept, key=lambda i: values[i] - at[i])  # in seconds: one spike stands out
        if values[worst] - at[worst] <= 0.25 * max(at[worst], 0.0):
            break
        kept.remove(worst)
    return tuple(curve(kept))


@dataclass(frozen=True)
class CostTable:
    """What one block of a model costs, by the number of tokens it runs on, at one batch size on
    one device and dtype (seconds per batch).

    Attributes:
        token_counts: ascending token counts where the costs were measured (at least one).
        attention_s: the attention branch of one block on that many tokens, no attention bias.
        masked_attention_s: the same with the proportional-attention bias (blocks after the first
            merge); equal to ``attention_s`` for a strategy without proportional attention.
        mlp_s: the MLP branch of one block on that many tokens.
        reduce_s: what a block that merges on that many tokens spends on top (capturing the keys,
            matching, merging, the next attention bias): the fixed cost of merging there.
        batch_size, device, dtype, threads: where it was measured (``threads``: torch CPU threads).
    """

    token_counts: tuple[int, ...]
    attention_s: tuple[float, ...]
    masked_attention_s: tuple[float, ...]
    mlp_s: tuple[float, ...]
    reduce_s: tuple[float, ...]
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1

    def __post_init__(self) -> None:
        counts = tuple(int(n) for n in self.token_counts)
        if not counts or any(b <= a for a, b in zip(counts, counts[1:], strict=False)) or counts[0] < 1:
            raise ValueError(f"token_counts must be ascending positive ints, got {self.token_counts!r}")
        object.__setattr__(self, "token_counts", counts)
        for name in ("attention_s", "masked_attention_s", "mlp_s", "reduce_s"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != len(counts) or any(not v >= 0.0 for v in values):
                raise ValueError(
                    f"{name} needs one non-negative time per token count ({len(counts)}), got {values!r}"
                )
            object.__setattr__(self, name, values)

    def _curve(self, name: str) -> tuple[float, ...]:
        # Attention has a quadratic term (the N x N scores); the rest is affine in the tokens.
        cache = self.__dict__.setdefault("_fits", {})
        if name not in cache:
            degree = 2 if name.endswith("attention_s") else 1
            cache[name] = _fit(self.token_counts, getattr(self, name), degree)
        return cache[name]

    def _eval(self, name: str, num_tokens: float) -> float:
        return max(0.0, sum(c * num_tokens**k for k, c in enumerate(self._curve(name))))

    def attention(self, num_tokens: float, masked: bool = False) -> float:
        """Seconds of one block's attention branch on ``num_tokens`` tokens (a least-squares curve
        through the measurements, so that timing noise does not flip decisions)."""
        return self._eval("masked_attention_s" if masked else "attention_s", num_tokens)

    def mlp(self, num_tokens: float) -> float:
        """Seconds of one block's MLP branch on ``num_tokens`` tokens (fitted)."""
        return self._eval("mlp_s", num_tokens)

    def reduce(self, num_tokens: float) -> float:
        """Seconds a block that merges on ``num_tokens`` tokens spends on the merge (fitted)."""
        return self._eval("reduce_s", num_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostTable:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def schedule_time(table: CostTable, num_tokens: int, merged: Sequence[int], prop_attn: bool = True) -> float:
    """Seconds the blocks take with ``merged[l]`` tokens merged in block ``l``, by ``table``.

    Block ``l`` runs attention on the tokens entering it (with the proportional-attention bias once
    an earlier block merged, when ``prop_attn``), pays the reduction when it merges, and runs its
    MLP on what is left."""
    total, n, any_merge = 0.0, num_tokens, False
    for m in merged:
        total += table.attention(n, masked=prop_attn and any_merge)
        if m > 0:
            total += table.reduce(n)
            any_merge = True
        total += table.mlp(n - m)
        n -= m
    return total


@dataclass(frozen=True)
class CostPlan:
    """A schedule chosen by the cost model.

    Attributes:
        merged: tokens merged per block.
        skipped: blocks the plan merged in that merge nothing here (their merges moved elsewhere,
            or were dropped when ``met`` is False).
        met: True when the final token count is the plan's.
        seconds: the table's time for ``merged``; ``planned_seconds``, ``unreduced_seconds``: for
            the plan as given and for no reduction.
    """

    merged: list[int]
    skipped: list[int]
    met: bool
    seconds: float
    planned_seconds: float
    unreduced_seconds: float


def _feasible(merged: Sequence[int], num_tokens: int, num_prefix: int) -> int | None:
    """The first block that merges more than a bipartite step can (``None`` if none does)."""
    n = num_tokens
    for layer, m in enumerate(merged):
        if m > max_mergeable(n, num_prefix):
            return layer
        n -= m
    return None


def _spread(
    planned: Sequence[int], allowed: Sequence[int], num_tokens: int, num_prefix: int
) -> list[int] | None:
    """The planned total over the ``allowed`` blocks only: each keeps its planned count, the
    merges of the other blocks are shared out in proportion to those counts (largest remainder,
    earlier blocks first on ties), then merges a block cannot take move to the allowed blocks
    before it. ``None`` when the total does not fit."""
    total = sum(planned)
    base = [planned[layer] if layer in allowed else 0 for layer in range(len(planned))]
    extra = total - sum(base)
    weight = sum(base)
    if weight == 0:
        return None
    shares = [extra * base[layer] / weight for layer in range(len(base))]
    merged = [base[layer] + int(shares[layer]) for layer in range(len(base))]
    remainders = sorted(allowed, key=lambda layer: (-(shares[layer] - int(shares[layer])), layer))
    for layer in remainders[: total - sum(merged)]:
        merged[layer] += 1
    order = sorted(allowed)
    for _ in range(total * len(merged) + 1):  # each pass moves one merge one block earlier
        bad = _feasible(merged, num_tokens, num_prefix)
        if bad is None:
            return merged
        earlier = [layer for layer in order if layer < bad]
        if not earlier:
            return None
        # One merge at a time: each one moved earlier also lowers what `bad` can take.
        merged[bad] -= 1
        merged[earlier[-1]] += 1
    return None


#: a schedule other than the plan is taken only when the table says it saves at least this
#: fraction of the unreduced time (smaller differences are within the timing noise of a table)
MIN_GAIN = 0.01


def plan_with_costs(
    planned: Sequence[int],
    num_tokens: int,
    num_prefix: int,
    table: CostTable,
    prop_attn: bool = True,
    min_gain: float = MIN_GAIN,
) -> CostPlan:
    """The schedule that merges ``sum(planned)`` tokens only in blocks where merging pays.

    Args:
        planned: tokens each block merges in the plan (already within the bipartite limit).
        num_tokens: tokens entering the first block.
        num_prefix: leading tokens that are never merged.
        table: the measured costs (:class:`CostTable`).
        prop_attn: whether merged blocks run attention with the proportional-attention bias.
        min_gain: the fraction of the unreduced time another schedule must save over the plan
            (or merging less over merging the planned total) to be taken instead.

    Returns:
        A :class:`CostPlan`: ``planned`` itself when every merging block pays; otherwise the
        fastest schedule with the planned total found by skipping losing blocks (see the module
        docstring). When no schedule with the planned total is faster than no reduction, the
        plan without its losing merges (or no merging at all), with ``met=False``.
    """
    planned = list(planned)
    none = [0] * len(planned)
    t_plan = schedule_time(table, num_tokens, planned, prop_attn)
    t_none = schedule_time(table, num_tokens, none, prop_attn)

    def result(merged: list[int], met: bool) -> CostPlan:
        skipped = [
            layer for layer, (p, m) in enumerate(zip(planned, merged, strict=True)) if p > 0 and m == 0
        ]
        return CostPlan(
            merged, skipped, met, schedule_time(table, num_tokens, merged, prop_attn), t_plan, t_none
        )

    def gains(merged: list[int]) -> dict[int, float]:
        """Per merging block: seconds saved by its merges, net of its reduction cost."""
        base = schedule_time(table, num_tokens, merged, prop_attn)
        out = {}
        for layer, m in enumerate(merged):
            if m > 0:
                without = list(merged)
                without[layer] = 0
                out[layer] = schedule_time(table, num_tokens, without, prop_attn) - base
        return out

    if sum(planned) == 0:
        return result(planned, True)

    def losing(merged: list[int]) -> dict[int, float]:
        return {layer: g for layer, g in gains(merged).items() if g <= 0}

    # 1. Skip the worst losing block and share its merges out, until every merging block pays.
    best, best_seconds = planned, t_plan
    merged, allowed = planned, [layer for layer, m in enumerate(planned) if m > 0]
    while True:
        lose = losing(merged)
        if not lose:
            break
        worst = min(lose, key=lambda layer: (lose[layer], -layer))
        allowed = [layer for layer in allowed if layer != worst]
        spread = _spread(planned, allowed, num_tokens, num_prefix) if allowed else None
        if spread is None:
            break  # the budget does not fit in fewer blocks
        merged = spread
        seconds = schedule_time(table, num_tokens, merged, prop_attn)
        if seconds < best_seconds:
            best, best_seconds = merged, seconds
    margin = min_gain * t_none
    if t_plan - best_seconds < margin:
        best, best_seconds = planned, t_plan  # not worth leaving the plan
    if best_seconds < t_none:
        return result(best, True)
    # 2. No schedule with the planned total beats no reduction: drop the losing merges instead.
    dropped = planned
    while True:
        lose = losing(dropped)
        if not lose:
            break
        worst = min(lose, key=lambda layer: (lose[layer], -layer))
        dropped = [0 if layer == worst else m for layer, m in enumerate(dropped)]
    t_dropped = schedule_time(table, num_tokens, dropped, prop_attn)
    if sum(dropped) and t_dropped < t_none and t_dropped <= best_seconds - margin:
        return result(dropped, False)
    if best_seconds - t_none < margin:  # slower than no reduction only within the noise
        return result(best, True)
    return result(none, False)


# -- measured tables, cached ----------------------------------------------------------------


def _cache_root() -> Path:
    """``$TOKENBUDGET_COST_CACHE`` if set, else ``costs/`` under ``$TOKENBUDGET_CACHE`` (default
    ``~/.cache/tokenbudget``). Delete a file there to measure again (e.g. after timing on a busy
    machine)."""
    own = os.environ.get("TOKENBUDGET_COST_CACHE")
    if own:
        return Path(own).expanduser()
    env = os.environ.get("TOKENBUDGET_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "tokenbudget") / "costs"


def _machine() -> str:
    """What the table depends on besides the model: the CPU or GPU and the torch version."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{cpu}|torch {torch.__version__}"


@dataclass
class CostModel:
    """The cost tables of one patched model, one per (tokens, batch, device, dtype, threads), and
    the schedules they give.

    ``measure(x)`` measures a table for the tokens ``x`` [B, N, C] entering the first block
    (:func:`tokenbudget.adapters.calibrate.measure_costs`); tables go to memory and, with
    ``fingerprint`` (the model's architecture), to ``$TOKENBUDGET_CACHE/costs`` as JSON, so a
    later process on the same machine makes the same choices without measuring.
    """

    measure: Callable[[Tensor], CostTable] | None = None
    fingerprint: str | None = None
    prop_attn: bool = True
    tables: dict[tuple, CostTable] = field(default_factory=dict)
    plans: dict[tuple, CostPlan] = field(default_factory=dict, repr=False)

    @staticmethod
    def key(x: Tensor) -> tuple:
        """(tokens, batch, device, dtype, threads) of tokens ``x`` [B, N, C]."""
        return (
            x.shape[1],
            x.shape[0],
            str(x.device),
            str(x.dtype).removeprefix("torch."),
            torch.get_num_threads(),
        )

    def set_table(self, table: CostTable, num_tokens: int) -> None:
        """Use ``table`` for inputs of ``num_tokens`` tokens at its batch size, device, dtype, threads."""
        key = (num_tokens, table.batch_size, table.device, table.dtype, table.threads)
        self.tables[key] = table
        self.plans = {k: v for k, v in self.plans.items() if k[0] != key}

    def _path(self, key: tuple) -> Path | None:
        if self.fingerprint is None:
            return None
        digest = hashlib.sha1(repr((self.fingerprint, _machine(), key)).encode()).hexdigest()[:20]
        return _cache_root() / f"{digest}.json"

    def table_for(self, x: Tensor) -> CostTable | None:
        """The table for ``x``'s shape: from memory, from disk, else measured (``None`` when it
        cannot be measured here, e.g. while ``torch.compile`` traces)."""
        key = self.key(x)
        table = self.tables.get(key)
        if table is not None:
            return table
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                table = CostTable.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError, KeyError):
                table = None  # a damaged file is measured again
        if table is None:
            if self.measure is None or torch.compiler.is_compiling():
                return None
            table = self.measure(x)
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(table.to_dict()))
                except OSError:
                    pass  # the cache is optional
        self.tables[key] = table
        return table

    def plan(self, x: Tensor, planned: list[int], num_prefix: int) -> CostPlan | None:
        """The cost-model schedule for tokens ``x`` [B, N, C] entering the first block (cached);
        ``None`` when no table is available."""
        key = self.key(x)
        cached = self.plans.get((key, tuple(planned)))
        if cached is not None:
            return cached
        table = self.table_for(x)
        if table is None:
            return None
        plan = plan_with_costs(planned, x.shape[1], num_prefix, table, self.prop_attn)
        if not plan.met:
            warnings.warn(
                f"cost model: merging does not pay here (batch {x.shape[0]}, {x.shape[1]} tokens, "
                f"{x.device}): every schedule of the {sum(planned)} planned merges is slower than no "
                f"reduction, so forwards merge only {sum(plan.merged)} tokens, in the blocks where that "
                f"pays (cost_model='off' merges as planned)",
                stacklevel=2,
            )
        self.plans[(key, tuple(planned))] = plan
        return plan
