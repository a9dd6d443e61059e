"""One ToMe reduce step alone, per merging block of a ViT: the two-step eager path (matching, then
merge), the fused eager step, and the fused step through torch.compile, with compile time.

Shapes follow a ViT-S/16 at 224 px with a constant ``r`` (197 tokens, 6 heads of 64, width 384):
each block's keys [B, H, N, d] (a strided view, as timm's attention hands them), tokens
[B, N, C] and sizes. Times are per block, summed over the blocks; ``--threads 1`` uses the
thread's CPU time (robust on a busy machine), more threads wall time. Usage:

    PYTHONPATH=src python scripts/experiments/bench_reduce_step.py --threads 1 --r 16 --batch-size 1
    PYTHONPATH=src python scripts/experiments/bench_reduce_step.py --compile dynamic   # + torch.compile
    PYTHONPATH=src python scripts/experiments/bench_reduce_step.py --other /tmp/old/src/tokenbudget  # + another version
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tokenbudget.ops.match import bipartite_soft_matching, max_mergeable
from tokenbudget.ops.merge import merge_weighted
from tokenbudget.ops.merge_step import greedy_merge_step
from tokenbudget.ops.serial import SmallWork


def two_step(keys: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int) -> torch.Tensor:
    """What ToMe ran before the fused step: head sum, matching, then the merge."""
    metric = keys.sum(dim=1)
    return merge_weighted(x, size, bipartite_soft_matching(metric, r, 1))[0]


def fused(keys: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int) -> torch.Tensor:
    return greedy_merge_step(x, size, keys.sum(dim=1), r, 1)[0]


def fused_serial(keys: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int) -> torch.Tensor:
    with SmallWork(x):
        return fused(keys, x, size, r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=200, help="calls per timed sample")
    parser.add_argument("--samples", type=int, default=9)
    parser.add_argument("--compile", choices=["off", "static", "dynamic"], default="off")
    parser.add_argument(
        "--other", type=Path, default=None, help="another version's src/tokenbudget: its matching + merge too"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    g = torch.Generator().manual_seed(0)
    shapes, n = [], args.tokens
    for _ in range(args.blocks):
        r = min(args.r, max_mergeable(n, 1))
        keys = torch.randn(args.batch_size, n, 3, 6, 64, generator=g).permute(2, 0, 3, 1, 4)[1]
        x = torch.randn(args.batch_size, n, 384, generator=g)
        size = torch.randint(1, 4, (args.batch_size, n, 1), generator=g).float()
        shapes.append((keys, x, size, r))
        n -= r
    fns = {"two-step": two_step, "fused": fused, "fused+serial": fused_serial}
    if args.other is not None:
        from bench_ab import import_other  # its folder is on the path when this file runs

        other = import_other(args.other)
        other_match = other.ops.match.bipartite_soft_matching
        other_merge = other.ops.merge.merge_weighted

        def other_two_step(keys: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int) -> torch.Tensor:
            return other_merge(x, size, other_match(keys.sum(dim=1), r, 1))[0]

        fns = {"other": other_two_step, **fns}
    notes = []
    if args.compile != "off":
        compiled = torch.compile(fused, dynamic=args.compile == "dynamic")
        start = time.perf_counter()
        with torch.inference_mode():
            for keys, x, size, r in shapes:
                compiled(keys, x, size, r)
        notes.append(
            f"torch.compile ({args.compile}): first call of every block shape {time.perf_counter() - start:.1f} s"
        )
        fns["compiled"] = compiled
    totals = {name: [0.0] * args.samples for name in fns}
    with torch.inference_mode():
        for keys, x, size, r in shapes:
            expected = two_step(keys, x, size, r)
            for fn in fns.values():
                torch.testing.assert_close(fn(keys, x, size, r), expected, atol=1e-5, rtol=1e-5)
                for _ in range(5):
                    fn(keys, x, size, r)
            for sample in range(args.samples):
                for name, fn in fns.items():  # interleaved
                    start = clock()
                    for _ in range(args.repeats):
                        fn(keys, x, size, r)
                    totals[name][sample] += (clock() - start) / args.repeats
    print(
        f"{args.blocks} blocks from {args.tokens} tokens, r={args.r}, batch {args.batch_size}, "
        f"{args.threads} thread(s), {args.samples} samples of {args.repeats} calls"
    )
    reference = next(iter(fns))
    print(f"{'path':<14} {'us/block min':>12} {'median':>8} {'vs ' + reference:>11}")
    base = statistics.median(totals[reference])
    for name, series in totals.items():
        per_block = [t / args.blocks * 1e6 for t in series]
        print(
            f"{name:<14} {min(per_block):>12.1f} {statistics.median(per_block):>8.1f} "
            f"{statistics.median(series) / base:>10.2f}x"
        )
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
