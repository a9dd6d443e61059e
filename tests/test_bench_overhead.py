"""The bench's fixed cost per merging block (no timing assertions: its arithmetic and its column),
and the command line's ``--cost-model`` option and ``ovh ms`` column."""

from __future__ import annotations

import json
import math

import pytest

import tokenbudget as tb
from conftest import make_tiny
from tokenbudget.bench import bench, format_table
from tokenbudget.bench.ceiling import merge_overhead_ms
from tokenbudget.cli import build_parser, main
from tokenbudget.cli.methods import configs


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


def test_cost_model_option_reaches_the_configs_that_take_it() -> None:
    args = build_parser().parse_args(
        ["bench", "--methods", "tome,tome-detail,tofu,random", "--r", "4", "--cost-model", "auto"]
    )
    by_method = {type(c).method: c for c in configs(args)}
    assert by_method["tome"].cost_model == "auto" and by_method["tome-detail"].cost_model == "auto"
    assert not hasattr(by_method["tofu"], "cost_model") and not hasattr(by_method["random"], "cost_model")
    default = configs(build_parser().parse_args(["bench", "--r", "4"]))
    assert [c.cost_model for c in default] == ["off"]  # not given: the config's default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--cost-model", "fast"])


def test_bench_command_with_the_cost_model_prints_the_overhead_column(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("TOKENBUDGET_COST_CACHE", str(tmp_path))  # the measured table goes here
    argv = ["bench", "--model", "vit_tiny_patch16_224", "--r", "2", "--cost-model", "auto", "--batch-size", "1",
            "--samples", "1", "--warmup", "0", "--no-memory", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("config"))
    assert "ovh ms" in header and "tome(r=2,cost_model=auto)" in out
    assert "ovh ms: fixed cost of one merging block" in out
    assert list(tmp_path.rglob("*.json")), "the measured cost table is cached on disk"
    assert main([*argv, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["config"]["cost_model"] == "auto" and row["overhead_ms"] is not None


def test_derived_columns_show_their_interval_or_noise() -> None:
    from dataclasses import replace

    from tokenbudget.bench.ceiling import merge_overhead_quartiles

    q1, median, q3 = merge_overhead_quartiles(
        [0.010, 0.012, 0.011, 0.013], [0.010, 0.009, 0.010, 0.009], [2, 2]
    )
    assert q1 <= median <= q3 and math.isclose(median, 1.0)  # excess 0, 3, 1, 4 ms over 2 blocks
    (row,) = bench(
        make_tiny("vit"), [tb.ToMe(r=8)], batch_sizes=(2,), samples=3, warmup=1, measure_memory=False
    )
    assert row.ceiling_q1 <= row.ceiling_speedup <= row.ceiling_q3
    assert row.ceiling_efficiency_q1 <= row.ceiling_efficiency <= row.ceiling_efficiency_q3
    clean = replace(row, ceiling_efficiency=0.9, ceiling_efficiency_q1=0.85, ceiling_efficiency_q3=0.95,
                    overhead_ms=0.5, overhead_q1=0.4, overhead_q3=0.6)  # fmt: skip
    line = format_table([clean]).splitlines()[2]
    assert "0.90 0.85-0.95" in line and "0.50 0.40-0.60" in line and "noise" not in line
    # A patched model above its own ceiling, or a negative cost, is timing noise: said so, no number.
    noisy = replace(clean, ceiling_efficiency_q3=1.3, overhead_q1=-0.2)
    line = format_table([noisy]).splitlines()[2]
    assert "~1 noise" in line and "~0 noise" in line and "0.85-1.30" not in line and "-0.20-0.60" not in line
