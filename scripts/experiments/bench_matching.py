"""Matching time alone: ToMe's greedy matching vs the optimal one-to-one assignment.

Times one matching step (scores, choice, index bookkeeping; no merge, no model) on random keys
shaped like a ViT's: [B, N, d]. Usage:

    PYTHONPATH=src python scripts/experiments/bench_matching.py --tokens 197 --dim 64 --r 8,16 --batch-size 1,32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenbudget.ops.assignment import optimal_bipartite_matching
from tokenbudget.ops.match import bipartite_soft_matching


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=197, help="tokens entering the block (prefix included)")
    parser.add_argument("--prefix", type=int, default=1)
    parser.add_argument("--dim", type=int, default=64, help="key dimension (head dim)")
    parser.add_argument("--r", default="8,16")
    parser.add_argument("--batch-size", default="1,32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'batch':>5} {'r':>3} {'greedy ms':>10} {'optimal ms':>11} {'ratio':>7}")
    for batch in (int(b) for b in args.batch_size.split(",")):
        keys = torch.randn(batch, args.tokens, args.dim, generator=torch.Generator().manual_seed(0))
        for r in (int(v) for v in args.r.split(",")):
            greedy = _time(lambda k=keys, r=r: bipartite_soft_matching(k, r, args.prefix), args.repeats)
            optimal = _time(lambda k=keys, r=r: optimal_bipartite_matching(k, r, args.prefix), args.repeats)
            print(f"{batch:>5} {r:>3} {greedy * 1e3:>10.3f} {optimal * 1e3:>11.3f} {optimal / greedy:>6.1f}x")


if __name__ == "__main__":
    main()
