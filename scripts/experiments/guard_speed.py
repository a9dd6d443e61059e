"""Speed cost of the entropy guard on real images (the bench's random input makes the guard fire).

Times unpatched DINOv2, ToMe and ToMe + guard at the same keep, interleaved, on Fashion-MNIST test
images (batch ``--batch-size``), and prints medians of paired ratios to the unpatched model:

    PYTHONPATH=src python scripts/experiments/guard_speed.py --keep 0.05 --batch-size 16 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tokenbudget as tb
from tokenbudget.data.fashion_mnist import fashion_mnist_subset, to_model_input
from tokenbudget.data.images import model_normalization


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tb.models.dinov2_small().eval()
    images, _ = fashion_mnist_subset("test", 50, 0)
    x = to_model_input(images[: args.batch_size], 224, *model_normalization(model))
    configs = {"none": None, "tome": tb.ToMe(keep=args.keep), "tome-guard": tb.ToMeGuard(keep=args.keep)}
    times: dict[str, list[float]] = {name: [] for name in configs}
    tokens = {}
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # the first round warms up
            for name, config in configs.items():
                tb.remove(model) if config is None else tb.apply(model, config)
                start = time.perf_counter()
                model.forward_features(x)
                if rep:
                    times[name].append(time.perf_counter() - start)
                if config is not None:
                    tokens[name] = tb.last_state(model).tokens_per_layer[-1]
    for name in ("tome", "tome-guard"):
        ratios = [b / t for b, t in zip(times["none"], times[name], strict=True)]
        print(
            f"{name:<11} keep {args.keep}: batch {args.batch_size}, final width {tokens[name]}, "
            f"speedup over unpatched {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})"
        )
    guard_cost = [g / t for g, t in zip(times["tome-guard"], times["tome"], strict=True)]
    print(f"tome-guard time / tome time: median {statistics.median(guard_cost):.2f}")


if __name__ == "__main__":
    main()
