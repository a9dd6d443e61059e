"""Interleaved throughput measurement: every model timed in turn, repeated, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds for ``repeats`` calls of ``run``."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    return time.perf_counter() - start


def measure_interleaved(
    runs: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 3,
    samples: int = 10,
    min_sample_seconds: float = 0.2,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each run in every sample, measured interleaved (take medians).

    Each model warms up, then every sample times each model in turn (order rotating), so drifts
    in clock speed or background load hit all models alike. A sample repeats a call enough times
    to last ``min_sample_seconds`` (fast batch-1 calls are otherwise timer noise).
    """
    names = list(runs)
    repeats = {}
    for name in names:
        for _ in range(warmup):
            time_once(runs[name], device, 1)
        once = time_once(runs[name], device, 1)
        repeats[name] = max(1, int(min_sample_seconds / max(once, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(samples):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            times[name].append(time_once(runs[name], device, repeats[name]) / repeats[name])
        if progress is not None:
            progress(1)
    return times


def paired_ratio_quartiles(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """Quartiles (25 %, 50 %, 75 %) of the per-sample ratios of two interleaved series.

    Samples taken side by side share the machine's state at that moment, so their ratio is far
    less noisy than the ratio of two independent medians.
    """
    ratios = sorted(a / b for a, b in zip(numerator, denominator, strict=True))
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return q[0], q[1], q[2]
