"""Greedy ToMe, optimal-matching ToMe and ToFu timed interleaved in one process (same baseline).

PYTHONPATH=src python scripts/bench_issue4.py --model vit_small_patch16_224 --r 8,16 --batch-size 1,32
"""

from __future__ import annotations

import argparse

import torch

import tokenbudget as tb
from tokenbudget.bench import load_model
from tokenbudget.bench.run import bench, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--r", default="8,16")
    parser.add_argument("--batch-size", default="1,32")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = []
    for r in (int(v) for v in args.r.split(",")):
        configs += [tb.ToMe(r=r), tb.ToMe(r=r, matching="optimal"), tb.ToFu(r=r)]
    batch_sizes = tuple(int(b) for b in args.batch_size.split(","))
    rows = bench(
        load_model(args.model),
        configs,
        model_name=args.model,
        batch_sizes=batch_sizes,
        samples=args.samples,
        warmup=1,
        ceiling=False,
        measure_memory=False,
    )
    print(f"{args.model}, fp32, {args.threads} thread(s), {args.samples} interleaved samples")
    print(format_table(rows))


if __name__ == "__main__":
    main()
