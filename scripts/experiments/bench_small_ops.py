"""What ATen's thread pool costs on the small operations of a batch-1 merging block.

Each operation (shapes of ViT-S/16 at batch 1: 197 tokens of 384, 6 heads of 64) runs on one
thread and on two, after a pause that lets the pool's threads go idle, as between two merges of a
forward. Printed per call: CPU time of the calling thread, and CPU time the other threads spent
(their share of the work, or spinning while they wait). Usage:

    python scripts/experiments/bench_small_ops.py --threads 2 --calls 200
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="the pool size compared with one thread")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    n, c = 197, 384
    x = torch.randn(n, c)
    keys = torch.randn(1, n, 3, 6, 64).permute(2, 0, 3, 1, 4)[1]  # timm's strided key view
    rows = torch.randperm(n)[: n - 16]
    size = torch.rand(n - 16, 1)
    ops = {
        "keys.sum(1) (head sum)": lambda: keys.sum(1),
        "index_select 181 rows": lambda: x.index_select(0, rows),
        "mul 181 rows by size": lambda: x[: n - 16].mul(size),
        "index_add 16 rows": lambda: x.index_add(0, rows[:16], x[:16]),
        "layer_norm 197x384": lambda: torch.nn.functional.layer_norm(x, (c,)),
        "add 181x1 (tiny)": lambda: size + 1,
    }
    print(f"{'operation':<24} {'1 thread us':>11} {f'{args.threads} threads us':>13} {'others us':>10}")
    with torch.inference_mode():
        for name, op in ops.items():
            results = []
            for threads in (1, args.threads):
                torch.set_num_threads(threads)
                for _ in range(20):
                    op()
                time.sleep(0.3)
                p0, t0 = time.process_time(), time.thread_time()
                for _ in range(args.calls):
                    op()
                p1, t1 = time.process_time(), time.thread_time()
                results.append(((t1 - t0) / args.calls * 1e6, ((p1 - p0) - (t1 - t0)) / args.calls * 1e6))
            (one, _), (many, others) = results
            print(f"{name:<24} {one:>11.1f} {many:>13.1f} {others:>10.1f}")


if __name__ == "__main__":
    main()
