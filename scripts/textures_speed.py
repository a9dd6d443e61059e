"""Speed of Auto against ToMe (and PiToMe): interleaved in one process, batch 1 and 32, DINOv2-S.

Every config is timed by :func:`tokenbudget.bench.bench` in one call, so the unpatched model and
each patched copy run interleaved, sample after sample, on the same random input; the row
``auto / tome`` is the ratio of their median images per second. Repeat with ``--repeats`` on a
loaded machine and read the spread.

    PYTHONPATH=src python scripts/textures_speed.py --speedups 1.5,2 --samples 10 --repeats 2
"""

from __future__ import annotations

import argparse

import torch
from textures_lib import keeps

import tokenbudget as tb
from tokenbudget.bench import bench


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--speedups", default="1.5,2")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--methods", default="tome,auto,pitome")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tb.models.dinov2_small().eval()
    methods = args.methods.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"DINOv2-S, 224 px, {args.threads} thread(s), {args.samples} interleaved samples per repeat")
    print(f"{'speedup':>7} {'batch':>5} {'repeat':>6} " + " ".join(f"{m + ' img/s':>13}" for m in methods)
          + " " + " ".join(f"{m + '/tome':>12}" for m in methods if m != "tome"))  # fmt: skip
    for speedup, keep in keeps(model, [float(s) for s in args.speedups.split(",")]).items():
        configs = [tb.config_from_dict({"method": m, "keep": keep}) for m in methods]
        for batch in batch_sizes:
            for repeat in range(args.repeats):
                rows = bench(model, configs, batch_sizes=(batch,), samples=args.samples, warmup=args.warmup,
                             measure_memory=False, ceiling=False)  # fmt: skip
                speed = {m: row.patched_img_s for m, row in zip(methods, rows, strict=True)}
                ratios = [speed[m] / speed["tome"] for m in methods if m != "tome"]
                print(f"{speedup:>7} {batch:>5} {repeat:>6} " + " ".join(f"{speed[m]:>13.2f}" for m in methods)
                      + " " + " ".join(f"{r:>12.3f}" for r in ratios), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
