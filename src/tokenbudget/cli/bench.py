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
    bench.add_argument(
        "--samples",
        type=int,
        default=10,
        help="timed samples per model (median and quartiles; default 10). For a quieter measurement: more "
        "samples, --threads set to the cores you have to yourself, and an otherwise idle machine; an interval "
        "that reaches the impossible (c-eff above 1, a negative ovh ms) is printed as noise",
    )
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
    options.add_data_options(
        bench,
        n_train=300,
        n_test=64,
        data_note="; read only with --methods per-image: its budgets are calibrated on the train images and "
        "every config is timed on the test images (per-image budgets depend on the content)",
    )


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..bench import bench, format_table
    from ..bench.run import TABLE_NOTES

    configs = methods.configs(args)
    inputs = None
    if any(cfg.method == "per-image" for cfg in configs):
        from ..evaluate.per_image_eval import calibrate_in_run

        model, data = options.model_and_data(args)
        configs = [calibrate_in_run(model, cfg, data.train_images, seed=args.seed) for cfg in configs]
        inputs = data.test_images
    else:
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
        inputs=inputs,
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
    if inputs is not None:
        print(
            f"timed on {args.data} test images (cycled to the batch size); per-image: mean FLOPs of the batch"
        )
    print(format_table(rows))
    if args.compile:
        print(_compile_note(rows))
    print(TABLE_NOTES)
    return 0


def _compile_note(rows: list) -> str:
    """One line per batch size: how long the first (compiling) call of each model took."""
    return "\n".join(
        f"compiled (torch.compile, inductor), batch {row.batch_size}: first call {row.baseline_compile_s:.1f} s "
        f"unpatched, {row.patched_compile_s:.1f} s patched (compile + one run)"
        for row in rows
    )
