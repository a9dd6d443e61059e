"""Batch-1 targets of ToMe on CPU (or GPU), in one table: efficiency, fixed cost per merging block,
small budgets with and without the cost model, and the throughput batch.

Every row comes from :func:`tokenbudget.bench.bench` (interleaved against the unpatched model in
the same process, paired per-sample ratios, the free-reduction ceiling beside them). Run on a
quiet machine; on a shared one, give more samples and compare only rows of one run. Usage:

    PYTHONPATH=src python scripts/experiments/bench_batch1.py --threads 2 --samples 20            # everything
    PYTHONPATH=src python scripts/experiments/bench_batch1.py --only small-r --models vit_small_patch16_224
    PYTHONPATH=src python scripts/experiments/bench_batch1.py --device cuda --dtype bf16 --big-batch 256
    PYTHONPATH=src python scripts/experiments/bench_batch1.py --smoke       # a minute or two: does it all run?

Sections (``--only``, comma list): ``r16`` (ViT-S and ViT-B r=16 at batch 1, cost model off and
auto), ``small-r`` (r = 1..16 at batch 1 on ViT-S and the embedded DINOv2, cost model off and
auto), ``big`` (r=16 at the throughput batch), ``compiled`` (ViT-S r=16 compiled vs compiled).

``~SE`` is the standard error of the median ratio estimated from its spread (IQR / 1.349 as the
standard deviation, times 1.2533 / sqrt(samples)); ``--smoke`` rows are not measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import tokenbudget as tb
from tokenbudget.bench import bench
from tokenbudget.models import load_model

TARGETS = {
    ("r16", "vit_small_patch16_224"): ("efficiency", 0.80),
    ("r16", "vit_base_patch16_224"): ("efficiency", 0.90),
    ("compiled", "vit_small_patch16_224"): ("efficiency", 0.85),
    ("small-r", "*"): ("speedup", 0.99),
    ("big", "*"): ("efficiency", 0.97),
}


def _rows(
    model_name: str, configs: list, batch: int, args: argparse.Namespace, compile: bool = False
) -> list:
    model = load_model(model_name)
    start = time.perf_counter()
    rows = bench(
        model,
        configs,
        model_name=model_name,
        batch_sizes=(batch,),
        device=args.device,
        dtype=args.dtype,
        samples=args.samples,
        warmup=args.warmup,
        measure_memory=False,
        ceiling=not compile,  # a compiled ceiling would need its own graphs; eager rows have it
        compile=compile,
    )
    print(f"  ({model_name}, batch {batch}: {time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def _target(section: str, model: str) -> tuple[str, float] | None:
    return TARGETS.get((section, model)) or TARGETS.get((section, "*"))


def _se(row, samples: int) -> float:  # noqa: ANN001 - a BenchRow
    """Standard error of the median speedup, from the quartiles of the paired ratios."""
    return 1.2533 * (row.speedup_q3 - row.speedup_q1) / 1.349 / math.sqrt(samples)


def _verdict(section: str, row) -> tuple[str, bool | None]:  # noqa: ANN001 - a BenchRow
    """The target's verdict for ``row`` and whether it is met (``None``: no target for the row)."""
    target = _target(section, row.model)
    if target is None or (section == "small-r" and row.config.get("cost_model") != "auto"):
        return "", None
    kind, bound = target
    value = row.efficiency if kind == "efficiency" else row.speedup
    met = value >= bound
    return f"{kind} {value:.3f} {'>=' if met else '<'} {bound:.2f}", met


def _line(section: str, row, samples: int) -> str:  # noqa: ANN001 - a BenchRow
    cfg = row.config
    label = f"r={cfg['r']}" + (" cost=auto" if cfg.get("cost_model") == "auto" else "")
    ceiling = "-" if row.ceiling_speedup is None else f"{row.ceiling_speedup:.2f}x"
    overhead = "-" if row.overhead_ms is None or math.isnan(row.overhead_ms) else f"{row.overhead_ms:.3f}"
    entering = [row.input_tokens, *row.tokens_per_layer[:-1]]
    merging = sum(1 for n_in, n_out in zip(entering, row.tokens_per_layer, strict=True) if n_out < n_in)
    verdict, _ = _verdict(section, row)
    return (
        f"{section:<8} {row.model:<22} {row.batch_size:>5} {label:<15} {row.speedup:>6.2f}x {_se(row, samples):>5.3f} "
        f"{f'{row.speedup_q1:.2f}-{row.speedup_q3:.2f}':>11} {row.ideal_speedup:>5.2f}x {row.efficiency:>5.2f} "
        f"{ceiling:>7} {overhead:>7} {merging:>5} {row.final_tokens:>6}  {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--big-batch", type=int, default=32, help="the throughput batch size")
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224,dinov2_small")
    parser.add_argument("--r", default="1,2,3,4,6,8,12,16", help="budgets of the small-r section")
    parser.add_argument("--only", default="r16,small-r,big,compiled", help="sections to run")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument(
        "--reuse-costs",
        action="store_true",
        help="use cost tables measured by earlier runs (default: measure afresh, in a temporary directory)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check that every section runs (2 samples, r=1,16, ViT-S and DINOv2, batch 4 as the big batch, "
        "no compiled section unless --only names it); its numbers are not measurements",
    )
    args = parser.parse_args()
    if args.smoke:
        given = {a.split("=")[0] for a in sys.argv[1:]}
        smoke = {
            "--samples": ("samples", 2),
            "--warmup": ("warmup", 1),
            "--r": ("r", "1,16"),
            "--big-batch": ("big_batch", 4),
            "--models": ("models", "vit_small_patch16_224,dinov2_small"),
            "--only": ("only", "r16,small-r,big"),
        }
        for flag, (name, value) in smoke.items():
            if flag not in given:
                setattr(args, name, value)
    if not args.reuse_costs:
        os.environ["TOKENBUDGET_COST_CACHE"] = tempfile.mkdtemp(prefix="tokenbudget-costs-")
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    budgets = [int(r) for r in args.r.split(",")]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device} {args.dtype}, "
        f"{args.samples} samples",
        flush=True,
    )
    started = time.perf_counter()
    jobs: list[tuple[str, str, list, int, bool]] = []  # (section, model, configs, batch, compiled)
    if "r16" in sections:
        for name in [m for m in models if m != "dinov2_small"]:
            jobs.append(("r16", name, [tb.ToMe(r=16), tb.ToMe(r=16, cost_model="auto")], 1, False))
    if "small-r" in sections:
        for name in [m for m in models if m in ("vit_small_patch16_224", "dinov2_small")]:
            configs = [tb.ToMe(r=r, cost_model=c) for r in budgets for c in ("off", "auto")]
            jobs.append(("small-r", name, configs, 1, False))
    if "big" in sections:
        configs = [tb.ToMe(r=16), tb.ToMe(r=16, cost_model="auto")]
        jobs.append(("big", "vit_small_patch16_224", configs, args.big_batch, False))
    if "compiled" in sections:
        jobs.append(("compiled", "vit_small_patch16_224", [tb.ToMe(r=16)], 1, True))
    results: list[tuple[str, object]] = []
    failed: list[str] = []
    for section, name, configs, batch, compiled in jobs:
        try:  # one failing section (e.g. torch.compile on this machine) leaves the others' rows
            rows = _rows(name, configs, batch, args, compile=compiled)
        except Exception as error:  # noqa: BLE001 - reported and counted, the run goes on
            failed.append(f"{section} {name}: {type(error).__name__}: {error}")
            print(f"  FAILED {failed[-1]}", flush=True)
            continue
        results += [(section, row) for row in rows]
        for row in rows if compiled else []:
            print(
                f"  compile + first call: {row.baseline_compile_s:.1f} s unpatched, {row.patched_compile_s:.1f} s patched"
            )
    header = (
        f"{'section':<8} {'model':<22} {'batch':>5} {'config':<15} {'speedup':>7} {'~SE':>5} {'(IQR)':>11} {'ideal':>6} "
        f"{'eff':>5} {'ceiling':>7} {'ovh ms':>7} {'merge':>5} {'tokens':>6}  target"
    )
    print(header)
    print("-" * len(header))
    for section, row in results:
        print(_line(section, row, args.samples))
    print(
        "speedup: median of paired per-sample ratios to the unpatched model (~SE: its standard error from the "
        "IQR, the quartiles); eff = speedup / FLOPs-ideal; ceiling: the same token counts reduced by a free "
        "slice; ovh ms: (patched - ceiling) time per merging block; merge: blocks that merge; cost=auto: "
        "tb.ToMe(..., cost_model='auto'); target: the row's goal (small-r: cost=auto rows, speedup >= 0.99)"
    )
    verdicts = [met for section, row in results if (met := _verdict(section, row)[1]) is not None]
    print(
        f"targets met: {sum(verdicts)} of {len(verdicts)}; {time.perf_counter() - started:.0f} s in all, "
        f"load {os.getloadavg()[0]:.1f} at the end" + (" (smoke run: not measurements)" if args.smoke else "")
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([{"section": s, **r.to_dict()} for s, r in results], indent=1))
    if failed:
        print("failed sections:\n  " + "\n  ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
