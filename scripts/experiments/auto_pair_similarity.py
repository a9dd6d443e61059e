"""Distribution of the key cosine similarity of ToMe's matched pairs, per block, on validation images.

Guides Auto's threshold: the share of merged pairs whose keys' cosine similarity lies below each
candidate threshold, per block, on a few validation images of each set (the same validation sets
as ``auto_criteria.py``), at FLOPs-ideal ``--speedup``.

    nice -n 10 python scripts/experiments/auto_pair_similarity.py --n 16 > out.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import tokenbudget as tb
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.strategies import auto as auto_strategy

sys.path.insert(0, str(Path(__file__).parent))
from auto_criteria import load  # noqa: E402

THRESHOLDS = (0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--sets", default="textures-val,fashion-mnist-val,anomaly-val")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = tb.models.dinov2_small().eval()
    keep = keep_for_flops_speedup(model, args.speedup)
    record: list[tuple[int, torch.Tensor]] = []
    original = auto_strategy.pair_similarity

    def spy(keys: torch.Tensor, matching) -> torch.Tensor:
        sim = original(keys, matching)
        record.append((len(record) % 12, sim.detach()))
        return sim

    auto_strategy.pair_similarity = spy
    print(f"FLOPs-ideal {args.speedup}x (keep {keep:.4f}); share of merged pairs with key cosine below t")
    for name in args.sets.split(","):
        data = load(name, model, 40, args.n)
        record.clear()
        tb.apply(model, tb.Auto(keep=keep, rule="distinct", threshold=-1.0))  # drops every pair
        with torch.no_grad():
            model(data.test_images[: args.n])
        tb.remove(model)
        print(f"\n{data.name} ({args.n} validation images)")
        print("  block  pairs  mean   std/img " + " ".join(f"<{t:<5}" for t in THRESHOLDS))
        for layer, sim in record:
            if sim.numel() == 0:
                continue
            shares = " ".join(f"{float((sim < t).float().mean()):>6.2f}" for t in THRESHOLDS)
            print(
                f"  {layer:>5} {sim.shape[1]:>6} {float(sim.mean()):.3f} {float(sim.std(dim=1).mean()):>7.3f}  {shares}"
            )


if __name__ == "__main__":
    main()
