"""`tokenbudget bench`: patched vs unpatched model, same process, interleaved, medians."""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..adapters import find_adapter
from ..config import ReductionConfig, config_class
from ..flops import model_flops
from ..patch import apply, last_state
from .ceiling import free_reduction_copy, merge_overhead_quartiles
from .memory import peak_forward_memory
from .throughput import measure_interleaved, paired_ratio_quartiles, time_once

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchRow:
    """One (config, batch size) measurement against the unpatched model."""

    model: str
    config: dict
    batch_size: int
    device: str
    dtype: str
    threads: int
    baseline_img_s: float
    patched_img_s: float
    speedup: float
    speedup_q1: float
    speedup_q3: float
    ideal_speedup: float
    efficiency: float
    ceiling_speedup: float | None
    ceiling_efficiency: float | None
    flops_ratio: float
    baseline_peak_mb: float | None
    patched_peak_mb: float | None
    input_tokens: int
    final_tokens: int
    tokens_per_layer: list[int]
    compiled: bool = False  # both models run through torch.compile
    baseline_compile_s: float | None = None  # first call (compile + run) of the compiled baseline
    patched_compile_s: float | None = None
    #: fixed cost of one merging block in ms: patched minus ceiling time over the merging blocks
    overhead_ms: float | None = None
    #: quartiles of the paired per-sample values behind ``efficiency``, ``ceiling_speedup``,
    #: ``ceiling_efficiency`` and ``overhead_ms`` (``None`` where the column is)
    efficiency_q1: float | None = None
    efficiency_q3: float | None = None
    ceiling_q1: float | None = None
    ceiling_q3: float | None = None
    ceiling_efficiency_q1: float | None = None
    ceiling_efficiency_q3: float | None = None
    overhead_q1: float | None = None
    overhead_q3: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def bench(
    model: nn.Module,
    configs: Sequence[ReductionConfig],
    *,
    model_name: str = "model",
    batch_sizes: Sequence[int] = (1, 32),
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    samples: int = 10,
    warmup: int = 3,
    measure_memory: bool = True,
    ceiling: bool = True,
    progress: Callable[[int], None] | None = None,
    compile: bool = False,
    seed: int = 0,
    inputs: torch.Tensor | None = None,
) -> list[BenchRow]:
    """Measure each config against the unpatched ``model`` at each batch size.

    The unpatched model and one patched copy per config are timed interleaved in one process on
    random input at the model's default image size (standard normal noise drawn from a generator
    seeded with ``seed`` + the batch size, so runs repeat exactly). Throughput is images per second from the
    median time per batch; speedups are the median (and quartiles) of the per-sample ratios of the
    interleaved runs. With ``ceiling``, each config's token schedule is also run with free
    reduction (a slice, see :mod:`.ceiling`): the speedup this machine allows for those token
    counts, so the method's own cost shows as ``ceiling_efficiency`` = speedup / ceiling speedup.

    ``inputs`` [N, 3, H, W] (model-ready real images): time on the first ``batch_size`` of them
    (cycled when fewer) instead of noise, as per-image budgets need (``tb.PerImage`` picks each image's level from its
    content; its FLOPs are the batch's mean per-image FLOPs, and it has no ceiling run).
    """
    if any(getattr(cfg, "method", None) == "adaptive-patch" for cfg in configs):
        # Random input has no complexity to adapt to, and token counts differ per image.
        raise ValueError(
            "bench times per-layer reductions on random input; time tb.AdaptivePatch on real images with "
            "`tokenbudget adaptive-eval`"
        )
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be ints >= 1, got {list(batch_sizes)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(
            f"samples must be an int >= 1 (timed runs per model; the median is reported), got {samples!r}"
        )
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    device = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    model = model.eval().to(device=device, dtype=torch_dtype)
    per_image = [getattr(cfg, "method", None) == "per-image" for cfg in configs]
    if any(per_image) and inputs is None:
        raise ValueError(
            "tb.PerImage picks each image's budget from its content, so noise would time a mix of levels "
            "no real set has: pass real images as inputs= (the CLI: --data)"
        )
    patched = [apply(copy.deepcopy(model), cfg) for cfg in configs]
    # Free reduction replays one token schedule per batch; per-image budgets have one per level.
    ceiling = ceiling and not any(per_image)
    free = [free_reduction_copy(model, m) for m in patched] if ceiling else []
    adapter = find_adapter(model)
    dims = adapter.block_dims()
    if adapter.image_size is None:
        raise ValueError("the model has no default input size to bench at; build it with a fixed img_size")
    height, width = adapter.image_size
    if compile:
        # One compiled wrapper per model, static shapes: each batch size compiles its own graph.
        # All models share their forward's code object, and dynamo keeps at most recompile_limit
        # graphs per code object before silently running eagerly: raise it to what we need.
        models = [model, *patched, *free]
        needed = len(models) * len(batch_sizes) + 1
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
        compiled = {"baseline": torch.compile(model, dynamic=False)}
        compiled |= {f"config{i}": torch.compile(m, dynamic=False) for i, m in enumerate(patched)}
        compiled |= {f"free{i}": torch.compile(m, dynamic=False) for i, m in enumerate(free)}
    rows = []
    for batch_size in batch_sizes:
        # Seeded noise: runs are reproducible (data-dependent methods such as the entropy guard take
        # the same path every time).
        if inputs is not None:
            if len(inputs) == 0:
                raise ValueError("inputs holds no images to time on")
            index = torch.arange(batch_size) % len(inputs)  # cycles through fewer inputs than the batch
            x = inputs[index].to(device=device, dtype=torch_dtype)
        else:
            noise = torch.Generator().manual_seed(seed + batch_size)
            x = torch.randn(batch_size, 3, height, width, generator=noise).to(
                device=device, dtype=torch_dtype
            )

        runs = {"baseline": _forward(model, x)} | {
            f"config{i}": _forward(m, x) for i, m in enumerate(patched)
        }
        runs |= {f"free{i}": _forward(m, x) for i, m in enumerate(free)}
        compile_s: dict[str, float] = {}
        if compile:
            runs = {name: _forward(compiled[name], x) for name in runs}
            for name, run in runs.items():  # compiles for this batch size (shapes are static)
                compile_s[name] = time_once(run, device, 1)
        times = measure_interleaved(runs, device, warmup=warmup, samples=samples, progress=progress)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        base_mem = peak_forward_memory(runs["baseline"], device) if measure_memory else None
        for i, (cfg, m) in enumerate(zip(configs, patched, strict=True)):
            runs[f"config{i}"]()
            state = last_state(m)
            full = model_flops(state.input_tokens, [state.input_tokens] * len(dims), dims)
            per_image_flops = getattr(state, "flops", None)  # PerImageState: each image's FLOPs fraction
            if per_image_flops is not None:
                flops_ratio = float(per_image_flops.double().mean())
                tokens = [round(t) for t in state.image_tokens_per_layer.double().mean(0).tolist()]
            else:
                flops_ratio = model_flops(state.input_tokens, state.tokens_per_layer, dims) / full
                tokens = list(state.tokens_per_layer)
            ideal = 1.0 / flops_ratio
            mem = peak_forward_memory(runs[f"config{i}"], device) if measure_memory else None
            # Speedups are medians of paired per-sample ratios: samples taken side by side share
            # the machine's momentary speed, which drifts on shared hosts.
            q1, speedup, q3 = paired_ratio_quartiles(times["baseline"], times[f"config{i}"])
            none3 = (None, None, None)
            ceiling_q = paired_ratio_quartiles(times["baseline"], times[f"free{i}"]) if ceiling else none3
            # patched speedup over ceiling speedup, per sample: free time over patched time
            c_eff_q = paired_ratio_quartiles(times[f"free{i}"], times[f"config{i}"]) if ceiling else none3
            overhead_q = (
                merge_overhead_quartiles(times[f"config{i}"], times[f"free{i}"], state.merged_per_layer)
                if ceiling
                else none3
            )
            ceiling_speedup = ceiling_q[1]
            rows.append(
                BenchRow(
                    model=model_name,
                    config=cfg.to_dict(),
                    batch_size=batch_size,
                    device=str(device),
                    dtype=dtype,
                    threads=torch.get_num_threads(),
                    baseline_img_s=batch_size / seconds["baseline"],
                    patched_img_s=batch_size / seconds[f"config{i}"],
                    speedup=speedup,
                    speedup_q1=q1,
                    speedup_q3=q3,
                    ideal_speedup=ideal,
                    efficiency=speedup / ideal,
                    ceiling_speedup=ceiling_speedup,
                    # the paired per-sample median, so that it lies inside its own quartiles
                    ceiling_efficiency=c_eff_q[1],
                    flops_ratio=flops_ratio,
                    baseline_peak_mb=None if base_mem is None else base_mem / 2**20,
                    patched_peak_mb=None if mem is None else mem / 2**20,
                    input_tokens=state.input_tokens,
                    final_tokens=tokens[-1],
                    tokens_per_layer=tokens,
                    compiled=compile,
                    baseline_compile_s=compile_s.get("baseline"),
                    patched_compile_s=compile_s.get(f"config{i}"),
                    overhead_ms=overhead_q[1],
                    efficiency_q1=q1 / ideal,
                    efficiency_q3=q3 / ideal,
                    ceiling_q1=ceiling_q[0],
                    ceiling_q3=ceiling_q[2],
                    ceiling_efficiency_q1=c_eff_q[0],
                    ceiling_efficiency_q3=c_eff_q[2],
                    overhead_q1=overhead_q[0],
                    overhead_q3=overhead_q[2],
                )
            )
    return rows


def _interval(value: float | None, q1: float | None, q3: float | None, fmt: str, width: int) -> str:
    """``value q1-q3`` right-aligned in ``width``; ``-`` when not measured."""
    if value is None or q1 is None or q3 is None or math.isnan(value):
        return f"{'-':>{width}}"
    return f"{format(value, fmt)} {format(q1, fmt)}-{format(q3, fmt)}".rjust(width)


def _noise_or_interval(row: BenchRow, column: str, width: int) -> str:
    """``c-eff`` and ``ovh ms`` with their interval, or ``noise`` when the interval reaches what
    cannot be: a patched model above its own ceiling (c-eff > 1), a negative fixed cost."""
    if column == "c-eff":
        value, q1, q3, impossible = (
            row.ceiling_efficiency,
            row.ceiling_efficiency_q1,
            row.ceiling_efficiency_q3,
            row.ceiling_efficiency_q3 is not None and row.ceiling_efficiency_q3 > 1.0,
        )
        fmt = ".2f"
    else:
        value, q1, q3, impossible = (
            row.overhead_ms,
            row.overhead_q1,
            row.overhead_q3,
            row.overhead_q1 is not None and row.overhead_q1 <= 0.0,
        )
        fmt = ".2f"
    if value is not None and not math.isnan(value) and impossible:
        return f"{'~1 noise' if column == 'c-eff' else '~0 noise'}".rjust(width)
    return _interval(value, q1, q3, fmt, width)


def format_table(rows: Sequence[BenchRow]) -> str:
    """Plain-text table of bench rows: each derived column with the quartiles of its paired
    per-sample values, or ``noise`` where that interval includes the impossible."""
    header = (
        f"{'config':<22} {'batch':>5} {'base img/s':>10} {'tb img/s':>8} {'speedup (IQR)':>16} "
        f"{'ideal':>6} {'eff (IQR)':>14} {'ceiling (IQR)':>16} {'c-eff (IQR)':>14} {'ovh ms (IQR)':>16} "
        f"{'tokens':>9} {'base MB':>7} {'tb MB':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        # Options at their default (e.g. matching="greedy") are left out of the label.
        # Compare in to_dict's form: tuples there are lists.
        defaults = {
            f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in fields(config_class(row.config["method"]))
        }
        cfg = {
            k: v
            for k, v in row.config.items()
            if v is not None and k not in ("prop_attn", "trace_source") and v != defaults.get(k, None)
        }
        label = ",".join(f"{k}={v}" for k, v in cfg.items() if k != "method")
        label = f"{row.config['method']}({label})"
        mem = (
            f"{row.baseline_peak_mb:>7.1f} {row.patched_peak_mb:>6.1f}"
            if row.baseline_peak_mb is not None and row.patched_peak_mb is not None
            else f"{'-':>7} {'-':>6}"
        )
        lines.append(
            f"{label:<22} {row.batch_size:>5} {row.baseline_img_s:>10.1f} {row.patched_img_s:>8.1f} "
            f"{_interval(row.speedup, row.speedup_q1, row.speedup_q3, '.2f', 16)} {row.ideal_speedup:>5.2f}x "
            f"{_interval(row.efficiency, row.efficiency_q1, row.efficiency_q3, '.2f', 14)} "
            f"{_interval(row.ceiling_speedup, row.ceiling_q1, row.ceiling_q3, '.2f', 16)} "
            f"{_noise_or_interval(row, 'c-eff', 14)} {_noise_or_interval(row, 'ovh', 16)} "
            f"{row.input_tokens:>4}->{row.final_tokens:<4} {mem}"
        )
    return "\n".join(lines)


#: what the columns of :func:`format_table` mean (the command line prints it under the table)
TABLE_NOTES = (
    "speedup: measured images/s over the unpatched model; every derived column shows its median and, after it, "
    "the quartiles of the paired per-sample values (IQR)\n"
    "ideal: FLOPs-ideal speedup; eff = speedup/ideal; ceiling: speedup of the same token counts with free "
    "reduction (a slice), the most any implementation of them reaches here\n"
    "c-eff = speedup/ceiling; ovh ms: fixed cost of one merging block (patched minus ceiling time, per merging "
    "block); 'noise' where the IQR reaches c-eff > 1 or a cost < 0: the difference is within the timing noise\n"
    "MB: peak forward memory. Quieter numbers: more --samples, --threads 1 or the cores you have to yourself, "
    "an otherwise idle machine"
)
