"""Would an anchored level help? The per-image levels with the geometric level nearest the target
replaced by the fixed budget itself (ToMe's even ``keep`` schedule at the target FLOPs), so that a
set whose images all get that level equals the fixed budget exactly. Cached features only; the
same calibration (``fit`` on every third train image, the budget held on all train images) and the
same held-out scoring as ``perimage_final.py``.

    PYTHONPATH=src:scripts/experiments python scripts/experiments/perimage_anchor.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from perimage_final import SCOPES, glance

import tokenbudget as tb
from tokenbudget.adaptive.per_image import model_level_plan
from tokenbudget.data.mix import SOURCES, dev_mix
from tokenbudget.evaluate.budget_predictor import tome_cost
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.evaluate.per_image_eval import Judges, cosine_to_full, score_rows, select_levels
from tokenbudget.evaluate.per_image_features import mix_level_features
from tokenbudget.ops.budget_fit import fit_staircase_within
from tokenbudget.ops.glance import level_index

LEVELS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-source", type=int, default=300)
    parser.add_argument("--calib-stride", type=int, default=3)
    parser.add_argument("--speedups", default="1.5,2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(text: str) -> None:
        print(f"  [{time.time() - start:6.0f} s] {text[:100]}", file=sys.stderr, flush=True)

    model = tb.models.dinov2_small().eval()
    plan = model_level_plan(model, LEVELS)
    level_configs = [None] + [tb.ToMe(r=list(m)) for m in plan.merged[1:]]
    speedups = [float(s) for s in args.speedups.split(",")]
    fixed = {s: keep_for_flops_speedup(model, s) for s in speedups}
    fixed_configs = [tb.ToMe(keep=k) for k in fixed.values()]
    common = dict(n_per_source=args.n_per_source, progress=log)
    train, y_train, src_train = mix_level_features(model, "dinov2_small", "train", [None], **common)
    calib, _, src_calib = mix_level_features(
        model, "dinov2_small", "train", level_configs + fixed_configs, stride=args.calib_stride, **common
    )
    test, y_test, src_test = mix_level_features(
        model, "dinov2_small", "test", level_configs + fixed_configs, **common
    )
    train_data, test_data = dev_mix("train", args.n_per_source), dev_mix("test", args.n_per_source)
    calib_index = torch.cat(
        [
            torch.nonzero(torch.from_numpy(train_data.sources) == s).flatten()[:: args.calib_stride]
            for s in range(len(SOURCES))
        ]
    )
    log("glance")
    calib_scores = glance(model, train_data.images[calib_index.numpy()])[0]["redundancy"]
    train_scores = glance(model, train_data.images)[0]["redundancy"]
    test_scores = glance(model, test_data.images)[0]["redundancy"]
    load = os.getloadavg()
    print(
        f"dinov2_small, redundancy glance, held-out test; {args.threads} thread(s); load {load[0]:.2f} (2 vCPU shared VM)"
    )
    for scope, sources in SCOPES.items():
        ids = torch.tensor([SOURCES.index(s) for s in sources])
        tr, ca, te = (torch.isin(s, ids) for s in (src_train, src_calib, src_test))
        judges = Judges.fit(train[tr, 0], y_train[tr], test[te, 0], y_test[te])
        n = int(te.sum())
        print(f"\n== {scope}: {int(tr.sum())} train / {n} test, calibration {int(ca.sum())}")
        for k, speedup in enumerate(speedups):
            target = tome_cost(model, fixed[speedup])[1]
            reference = f"fixed ToMe keep={fixed[speedup]:g}"
            anchor = min(range(1, len(LEVELS)), key=lambda j: abs(plan.flops[j] - target))
            conditions = [(reference, test[te, len(LEVELS) + k], torch.full((n,), target))]
            for name, columns, level_flops in (
                ("geometric levels", list(range(len(LEVELS))), list(plan.flops)),
                (
                    f"anchored (level {LEVELS[anchor]:g} -> fixed)",
                    [len(LEVELS) + k if j == anchor else j for j in range(len(LEVELS))],
                    [target if j == anchor else f for j, f in enumerate(plan.flops)],
                ),
            ):
                cal, tst = calib[ca][:, columns], test[te][:, columns]
                quality = cosine_to_full(cal, cal[:, 0])
                thresholds = fit_staircase_within(
                    calib_scores[ca], quality, level_flops, target, train_scores[tr]
                )
                index = level_index(
                    test_scores[te], torch.tensor(thresholds, dtype=torch.float64), len(LEVELS)
                )
                flops = torch.tensor(level_flops, dtype=torch.float64)[index]
                conditions.append((name, select_levels(tst, index), flops))
                print(f"    {name}: images per level {torch.bincount(index, minlength=len(LEVELS)).tolist()}")
            rows = score_rows(judges, conditions, reference=reference)
            print(f"  {scope} {speedup:g}x (target FLOPs {target:.4f}):")
            for r in rows:
                print(
                    f"    {r.condition:<34} FLOPs {r.mean_flops:.4f} ({100 * (r.mean_flops / target - 1):+.1f} %)  "
                    f"k-NN {r.knn_acc:.3f} {r.knn_gain:+.1f} +- {r.knn_gain_se:.1f}  "
                    f"linear {r.linear_acc:.3f} {r.linear_gain:+.1f} +- {r.linear_gain_se:.1f}"
                )
            sys.stdout.flush()
    print(f"\nSE: paired, points; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
