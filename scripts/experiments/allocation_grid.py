"""Allocation on held-out test splits at FLOPs-ideal 1.5x, 2x and 3x: every fixed reducer, the
per-image budget and its oracle headroom, with standard errors (binomial for one accuracy, paired
for a difference on the same test images).

    nice -n 5 python scripts/experiments/allocation_grid.py --speedups 1.5,2,3 \\
        --sets test:fashion-mnist,test:anomaly,folder:DIR,test:textures --n 1000 > out.txt

Sets are loaded as in ``auto_criteria.py`` (``test:NAME``: the set's test split, seed 0;
``folder:DIR``: every image of a labelled folder such as ``make_heldout_mix.py`` writes), and
features are cached the same way. Budgets are :func:`tokenbudget.evaluate.budget_for_flops_speedup`:
the even ``keep`` schedule up to its reach (about 2.7x on DINOv2-S/224), the geometric schedule
beyond, every method at the same per-layer counts.

Per-image is ``tb.PerImage`` (redundancy glance, Auto levels) calibrated on the train split exactly
as ``tokenbudget eval`` does; its test features are each image's row of its glance-chosen level
(each image is reduced on its own, so a level's features do not depend on the batch; ``eval`` runs
the grouped model for real). The oracle (:mod:`tokenbudget.evaluate.oracle`) puts each test image at
the cheapest level that it is classified right at, within the same mean FLOPs: an upper bound.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

import tokenbudget as tb
from tokenbudget.adaptive.per_image import glance_scores
from tokenbudget.evaluate.budgets import ScheduledKeep, budget_for_flops_speedup, method_config
from tokenbudget.evaluate.oracle import level_features, oracle_headroom
from tokenbudget.evaluate.per_image_eval import Judges, calibrate_in_run
from tokenbudget.ops.glance import level_index

sys.path.insert(0, str(Path(__file__).parent))
from auto_criteria import cached_features, load, log  # noqa: E402

FIXED = ("tome", "auto", "auto-drop", "tofu", "random", "pool")


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a - b).double()
    return float(diff.std(unbiased=True) / math.sqrt(len(diff)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--speedups", default="1.5,2,3")
    parser.add_argument("--sets", default="test:fashion-mnist,test:anomaly")
    parser.add_argument("--n", type=int, default=1000, help="train and test images per set")
    parser.add_argument("--n-sets", default="", help="per-set sizes, e.g. test:textures=300")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tb.models.dinov2_small().eval()
    sizes = dict(item.split("=") for item in args.n_sets.split(",") if item)
    print("k-NN (k=20, cosine) and linear probe fit on full-token train features; accuracies in %")
    for name in args.sets.split(","):
        n_set = int(sizes.get(name, args.n))
        data = load(name, model, n_set, n_set)
        train_full = cached_features(model, data, "train", None)
        test_full = cached_features(model, data, "test", None)
        judges = Judges.fit(train_full, data.train_labels, test_full, data.test_labels)
        n = len(data.test_labels)
        print(f"\n{data.name}: {len(train_full)} train / {n} test images")
        knn_full, lin_full = judges.correct(test_full)
        print(f"  full: k-NN {100 * knn_full.mean():.1f}, linear {100 * lin_full.mean():.1f}")
        for speedup in (float(s) for s in args.speedups.split(",")):
            budget = budget_for_flops_speedup(model, speedup)
            schedule = "geometric" if isinstance(budget, ScheduledKeep) else f"even, keep {float(budget):.4f}"
            print(f"\n  {speedup:g}x ({schedule})")
            print(f"  {'method':<12} {'k-NN':>11} {'linear':>11} {'sum vs best fixed':>22} {'FLOPs':>7}")
            correct = {}
            for method in FIXED:
                feats = cached_features(model, data, "test", method_config(method, budget))
                correct[method] = judges.correct(feats)
            # per-image, calibrated on the train split as `tokenbudget eval` does
            config = calibrate_in_run(model, method_config("per-image", budget), data.train_images)
            level_feats, level_flops, level_speedups = level_features(
                model,
                config,
                data.test_images,
                test_full,
                embed=functools.partial(cached_features, model, data, "test"),
            )  # [N, K, F]
            scores = glance_scores(model, data.test_images, config)
            index = level_index(
                scores, torch.tensor(config.thresholds, dtype=torch.float64), len(level_flops)
            )
            flops = torch.tensor(level_flops, dtype=torch.float64)
            per_image = level_feats[torch.arange(n), index]
            correct["per-image"] = judges.correct(per_image)
            oracle = oracle_headroom(
                level_feats,
                level_flops,
                level_speedups,
                config.target_flops,
                judges.predict,
                data.test_labels,
            )
            best = max(FIXED, key=lambda m: float(correct[m][0].mean() + correct[m][1].mean()))
            best_sum = correct[best][0] + correct[best][1]
            for method, (knn, lin) in correct.items():
                gain = 100 * float((knn + lin - best_sum).mean())
                se_gain = 100 * paired_se(knn + lin, best_sum)
                cost = (
                    float(flops[index].mean())
                    if method == "per-image"
                    else 1.0 / getattr(budget, "speedup", speedup)
                )
                print(
                    f"  {method:<12} {100 * knn.mean():5.1f}±{100 * math.sqrt(knn.mean() * (1 - knn.mean()) / n):4.1f}"
                    f" {100 * lin.mean():5.1f}±{100 * math.sqrt(lin.mean() * (1 - lin.mean()) / n):4.1f}"
                    f" {gain:+13.1f}±{se_gain:3.1f}{'  (best)' if method == best else '':>8}"
                    f" {cost:7.4f}"
                )
            counts = torch.bincount(index, minlength=len(level_flops)).tolist()
            print(
                f"  per-image levels {[round(s, 2) for s in level_speedups]}, images per level {counts}; "
                f"target FLOPs {config.target_flops:.4f}, calibrated {config.calibrated_flops:.4f}"
            )
            print(
                f"  oracle at {oracle.target_flops:.4f}: k-NN {100 * oracle.knn_acc:.1f}, linear "
                f"{100 * oracle.linear_acc:.1f}; headroom over best fixed "
                f"{100 * (oracle.knn_acc + oracle.linear_acc) - 100 * float(best_sum.mean()):+.1f} (sum)",
                flush=True,
            )
            log(f"{data.name} {speedup}x done")


if __name__ == "__main__":
    main()
