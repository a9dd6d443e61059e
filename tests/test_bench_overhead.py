"""The bench's fixed cost per merging block (no timing assertions: its arithmetic and its column)."""

from __future__ import annotations

import math

import tokenbudget as tb
from conftest import make_tiny
from tokenbudget.bench import bench, format_table
from tokenbudget.bench.ceiling import merge_overhead_ms


def test_overhead_is_the_median_paired_excess_per_merging_block() -> None:
    patched = [0.010, 0.012, 0.011]
    free = [0.008, 0.009, 0.010]  # paired excess 2, 3, 1 ms: median 2 ms
    assert math.isclose(merge_overhead_ms(patched, free, [4, 0, 4, 4]), 2.0 / 3)
    assert math.isnan(merge_overhead_ms(patched, free, [0, 0]))


def test_bench_rows_report_the_overhead() -> None:
    (row,) = bench(
        make_tiny("vit"), [tb.ToMe(r=8)], batch_sizes=(2,), samples=2, warmup=1, measure_memory=False
    )
    assert row.overhead_ms is not None and math.isfinite(row.overhead_ms)
    assert "ovh ms" in format_table([row]).splitlines()[0]
    (no_ceiling,) = bench(
        make_tiny("vit"),
        [tb.ToMe(r=8)],
        batch_sizes=(2,),
        samples=2,
        warmup=1,
        measure_memory=False,
        ceiling=False,
    )
    assert no_ceiling.overhead_ms is None
