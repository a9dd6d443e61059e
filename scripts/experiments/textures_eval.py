"""Auto against ToMe and the simple baselines on one dataset, at FLOPs-ideal speedups, with the targets.

For each speedup (the ``keep`` whose per-layer schedule gives that FLOPs-ideal speedup; every
method uses the same per-layer counts, so the same FLOPs) it prints, per method: k-NN accuracy
on the harness feature (class token ++ size-weighted patch mean) with its binomial standard
error, k-NN on the class token alone, the linear probe, cosine to full features, and the bias
diagnostic (largest |fraction| of a class gap covered by the mean feature shift). Classifiers
are fit on full-token train features. ``random`` is random drop averaged over seeds 0, 1, 2.

With ``auto`` among the methods it then checks the targets against the best of ToMe, random drop
(3-seed mean), grid pool and PiToMe: k-NN and linear >= best - 1 point, cosine >= best - 0.002,
shift <= random drop's; and prints auto minus the best baseline in k-NN with the paired standard
error of that difference (the same test images under both methods).

ToFu is printed for reference; the targets compare against ToMe, random drop, grid pool and PiToMe.

    PYTHONPATH=src python scripts/experiments/textures_eval.py --data textures --n-train 600 --n-test 1050
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from textures_lib import HEADER, Scorer, Scores, format_row, keeps, load_data

import tokenbudget as tb

BASELINES = ("tome", "random", "pool", "pitome")


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of mean(a) - mean(b) for per-image correctness ``a``, ``b`` [M] (bool)."""
    d = a.float() - b.float()
    return float(d.std(unbiased=True) / math.sqrt(len(d)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="textures", help="textures, textures-val, anomaly, fashion-mnist, skimage"
    )
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=1050)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speedups", default="1.5,2")
    parser.add_argument("--methods", default="tome,random,pool,pitome,tofu,auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tb.models.dinov2_small().eval()
    data = load_data(args.data, model, args.n_train, args.n_test, args.seed)
    scorer = Scorer(model, data)
    n = len(data.test_labels)
    print(
        f"{data.name}: {len(data.train_labels)} train / {n} test images, DINOv2-S at 224 px, k-NN k={scorer.k}"
    )
    print(f"load average at start: {os.getloadavg()[0]:.2f} (1 min), {args.threads} thread(s)")
    print(HEADER)
    print(format_row(scorer.full), flush=True)
    methods = args.methods.split(",")
    for speedup, keep in keeps(model, [float(s) for s in args.speedups.split(",")]).items():
        print(f"-- FLOPs-ideal {speedup}x (keep {keep}, ToMe's per-layer counts)")
        rows: dict[str, Scores] = {}
        for method in methods:
            if method == "random":
                configs = [tb.RandomDrop(keep=keep, seed=s) for s in range(3)]
                seeds = [scorer.score(f"random s{s}", c) for s, c in enumerate(configs)]
                rows[method] = scorer.score_mean("random (mean of 3)", configs)
                for row in seeds:
                    print(format_row(row), flush=True)
            else:
                rows[method] = scorer.score(method, tb.config_from_dict({"method": method, "keep": keep}))
            print(format_row(rows[method]), flush=True)
        if "auto" not in rows:
            continue
        auto = rows["auto"]
        present = [m for m in BASELINES if m in rows]
        best = {f: max(getattr(rows[m], f) for m in present) for f in ("knn", "linear", "cosine")}
        checks = [
            ("k-NN", auto.knn >= best["knn"] - 0.01, f"{auto.knn:.3f} vs best {best['knn']:.3f}"),
            (
                "linear",
                auto.linear >= best["linear"] - 0.01,
                f"{auto.linear:.3f} vs best {best['linear']:.3f}",
            ),
            (
                "cosine",
                auto.cosine >= best["cosine"] - 0.002,
                f"{auto.cosine:.4f} vs best {best['cosine']:.4f}",
            ),
        ]
        if "random" in rows:
            checks.append(
                (
                    "shift",
                    auto.shift <= rows["random"].shift,
                    f"{auto.shift:.3f} vs random {rows['random'].shift:.3f}",
                )
            )
        print(f"   targets (best of {', '.join(present)}): " + "; ".join(
            f"{name} {'ok' if ok else 'MISSED'} ({text})" for name, ok, text in checks))  # fmt: skip
        best_knn = max((m for m in present if m != "random"), key=lambda m: rows[m].knn, default=None)
        if best_knn is not None and auto.knn_correct is not None:
            ref = rows[best_knn]
            diff = auto.knn - ref.knn
            print(f"   auto - {best_knn} k-NN: {100 * diff:+.1f} points (paired SE "
                  f"{100 * paired_se(auto.knn_correct, ref.knn_correct):.1f})")  # fmt: skip
        if "random" in rows:
            print(f"   auto - random (mean of 3) k-NN: {100 * (auto.knn - rows['random'].knn):+.1f} points "
                  f"(SE of either about {100 * auto.knn_se:.1f})")  # fmt: skip
    print(
        "k-NN: cosine, k=20, on class token ++ size-weighted patch mean; kNN-cls: class token alone; linear:"
    )
    print(
        "logistic regression; all fit on full-token train features. cosine, cos-cls: to full test features."
    )
    print(
        "shift, sh-cls: largest |fraction| of a class gap covered by the mean feature shift (evaluate/shift.py)."
    )


if __name__ == "__main__":
    main()
