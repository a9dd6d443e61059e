"""``tokenbudget bench``: throughput, FLOPs and memory of patched vs unpatched, same process."""

from __future__ import annotations

import argparse
import json

from . import methods, options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench``."""
    bench = options.add_command(
        sub, "bench", cmd_bench, "throughput, FLOPs and memory: patched vs unpatched, same process"
    )
    options.add_model_options(bench, default="vit_small_patch16_224")
    bench.add_argument(
        "--batch-size", type=options.int_list, default=[1, 32], help="comma list (default: 1,32)"
    )
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    bench.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype (default: fp32)"
    )
    bench.add_argument("--samples", type=int, default=10, help="timed samples per model (median; default 10)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--no-ceiling", action="store_true", help="skip the free-reduction ceiling run")
    bench.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every model and compare compiled patched vs compiled unpatched",
    )
    options.add_run_options(bench, json="print JSON rows instead of a table")
    methods.add_budget_options(bench, default_r="16")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..bench import bench, format_table

    configs = methods.configs(args)
    model = options.load_model(args)
    bar = options.progress(len(args.batch_size) * args.samples, "bench", disable=args.json or args.quiet)
    rows = bench(
        model,
        configs,
        model_name=args.model,
        batch_sizes=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        samples=args.samples,
        warmup=args.warmup,
        measure_memory=not args.no_memory,
        ceiling=not args.no_ceiling,
        progress=bar.update,
        compile=args.compile,
    )
    bar.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    weights = (
        "embedded DINOv2 weights"
        if args.model == "dinov2_small"
        else ("pretrained" if args.pretrained else "random weights")
    )
    print(f"{args.model} ({weights}), device {args.device}, {args.dtype}, {torch.get_num_threads()} threads")
    print(format_table(rows))
    if args.compile:
        print(_compile_note(rows))
    print(
        "speedup: measured images/s over the unpatched model (IQR: quartiles of paired per-sample ratios); "
        "ideal: FLOPs-ideal speedup; eff = speedup/ideal;"
    )
    print(
        "ceiling: speedup of the same token counts with free reduction; c-eff = speedup/ceiling; "
        "MB: peak forward memory"
    )
    return 0


def _compile_note(rows: list) -> str:
    """One line per batch size: how long the first (compiling) call of each model took."""
    return "\n".join(
        f"compiled (torch.compile, inductor), batch {row.batch_size}: first call {row.baseline_compile_s:.1f} s "
        f"unpatched, {row.patched_compile_s:.1f} s patched (compile + one run)"
        for row in rows
    )
