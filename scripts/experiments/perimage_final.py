"""Final held-out measurement of tb.PerImage: calibrated on train, reported on test, against one fixed
ToMe budget at the same mean FLOPs, on the dev mix and on two homogeneous sets.

    PYTHONPATH=src python scripts/experiments/perimage_final.py --threads 1 [--speed-samples 7] [--no-anchor]

* scopes: the dev mix (all five sources), and its ``fashion`` (Fashion-MNIST items) and
  ``inspection`` (the anomaly set's surfaces) sources alone, each with its own classifiers (k-NN and
  a linear probe fit on that scope's full-token train features) and its own calibration;
* policies (need scores of the glance): ``redundancy`` (the library default: how near-duplicate
  the patch embeddings are, ToMe's matching on the glance), ``entropy`` (the entropy guard's
  measure), ``detail`` (adaptive patching's score), ``predictor`` (a budget predictor trained on
  the calibration images' per-image targets); thresholds by the rule ``fit`` on every third train
  image of the scope (embedded at every level);
* oracles: each test image at the cheapest level whose features keep cosine >= t to its full ones
  and the full-token k-NN (``+knn``) or probe (``+lin``) decision, t set to meet the same mean FLOPs:
  the headroom a glance could capture;
* test features are cached per level (ToMe reduces each image on its own, so picking each image's
  row of its level equals a grouped run; ``check`` below runs the grouped model for real on a
  subset and compares);
* speed: per-image vs fixed at batch 32 on real test images, interleaved in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import tokenbudget as tb
from tokenbudget.adapters import find_adapter
from tokenbudget.adaptive.per_image import config_level_plan, model_level_plan, train_need_predictor
from tokenbudget.data.images import model_normalization, rgb_uint8_to_model_input
from tokenbudget.data.mix import SOURCES, dev_mix
from tokenbudget.evaluate.budget_predictor import tome_cost
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.evaluate.metrics import knn_predictions
from tokenbudget.evaluate.per_image_eval import (
    Judges,
    bench_on_images,
    cosine_to_full,
    oracle_for_target,
    score_rows,
    select_levels,
)
from tokenbudget.evaluate.per_image_features import mix_level_features, real_run
from tokenbudget.ops.budget_fit import fit_staircase, fit_staircase_within
from tokenbudget.ops.glance import level_index
from tokenbudget.strategies.per_image import need_scores

LEVELS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
POLICIES = ("redundancy", "entropy", "detail")
SCOPES = {"mix": SOURCES, "fashion": ("fashion",), "inspection": ("inspection",)}


def glance(
    model: torch.nn.Module, images, batch_size: int = 50
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # noqa: ANN001
    """(need scores of every policy [N], patch embeddings [N, P, C] half) of uint8 ``images``."""
    adapter = find_adapter(model)
    mean, std = model_normalization(model)
    scores: dict[str, list] = {p: [] for p in POLICIES}
    tokens = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = rgb_uint8_to_model_input(images[start : start + batch_size], mean, std)
            pt = adapter.patch_embeddings(x)
            tokens.append(pt.half())
            for policy in POLICIES:
                scores[policy].append(need_scores(policy, pt, x, adapter.patch_size[0]).double())
    return {p: torch.cat(v) for p, v in scores.items()}, torch.cat(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-source", type=int, default=300)
    parser.add_argument("--calib-stride", type=int, default=3)
    parser.add_argument("--speedups", default="1.5,2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed-images", type=int, default=96)
    parser.add_argument("--speed-samples", type=int, default=7)
    parser.add_argument("--check-images", type=int, default=64)
    parser.add_argument(
        "--no-anchor",
        dest="anchor",
        action="store_false",
        help="per-image levels all geometric (anchor=False)",
    )
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
    common = dict(n_per_source=args.n_per_source, progress=log)
    train, y_train, src_train = mix_level_features(model, "dinov2_small", "train", [None], **common)
    fixed_configs = [tb.ToMe(keep=k) for k in fixed.values()]
    calib, y_calib, src_calib = mix_level_features(
        model, "dinov2_small", "train", level_configs + fixed_configs, stride=args.calib_stride, **common
    )
    test, y_test, src_test = mix_level_features(
        model, "dinov2_small", "test", level_configs + [tb.ToMe(keep=k) for k in fixed.values()], **common
    )
    levels, keep_feats = test[:, : len(LEVELS)], test[:, len(LEVELS) :]
    log("glance")
    train_data = dev_mix("train", args.n_per_source)
    test_data = dev_mix("test", args.n_per_source)
    calib_index = torch.cat(
        [
            torch.nonzero(torch.from_numpy(train_data.sources) == s).flatten()[:: args.calib_stride]
            for s in range(len(SOURCES))
        ]
    )
    calib_scores, calib_tokens = glance(model, train_data.images[calib_index.numpy()])
    train_scores, train_tokens = glance(model, train_data.images)  # every train image: holds the budget
    test_scores, test_tokens = glance(model, test_data.images)
    flops = torch.tensor(plan.flops, dtype=torch.float64)
    load = os.getloadavg()
    print(
        f"dinov2_small, held-out test split; calibration on every {args.calib_stride}rd train image of the scope; "
        f"{args.threads} thread(s); load average at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} (2 vCPU shared VM)"
    )
    print(
        "levels (FLOPs-ideal speedup: FLOPs fraction): "
        + ", ".join(f"{s:g}: {f:.4f}" for s, f in zip(plan.speedups, plan.flops, strict=True))
    )
    header = (
        f"  {'condition':<22} {'FLOPs':>6} {'vs tgt':>7} {'k-NN':>6} {'+-':>5} {'gain':>6} {'+-':>4} "
        f"{'linear':>6} {'+-':>5} {'gain':>6} {'+-':>4}  images per level {list(LEVELS)}"
    )
    thresholds_of: dict[float, tuple[float, ...]] = {}
    for scope, sources in SCOPES.items():
        ids = [SOURCES.index(s) for s in sources]
        tr = torch.isin(src_train, torch.tensor(ids))
        ca = torch.isin(src_calib, torch.tensor(ids))
        te = torch.isin(src_test, torch.tensor(ids))
        judges = Judges.fit(train[tr, 0], y_train[tr], levels[te, 0], y_test[te])
        lv = levels[te]
        cosine = cosine_to_full(lv, lv[:, 0])
        knn_full = judges.knn_full_predictions()
        lin_full = judges.probe.predict(lv[:, 0])
        knn_same = torch.stack(
            [
                knn_predictions(judges.train_feats, judges.train_labels, lv[:, j], judges.test_labels)
                == knn_full
                for j in range(len(LEVELS))
            ],
            1,
        )
        lin_same = torch.stack([judges.probe.predict(lv[:, j]) == lin_full for j in range(len(LEVELS))], 1)
        n = int(te.sum())
        print(
            f"\n== {scope} ({', '.join(sources)}): {int(tr.sum())} train / {n} test images, "
            f"{judges.train_labels.unique().numel()} classes; calibration {int(ca.sum())} train images"
        )
        for speedup in speedups:
            keep = fixed[speedup]
            target = tome_cost(model, keep)[1]
            reference = f"fixed ToMe keep={keep:g}"
            conditions = [
                ("full", lv[:, 0], torch.ones(n)),
                (reference, keep_feats[te, speedups.index(speedup)], torch.full((n,), target)),
            ]
            counts = {}
            # the per-image levels as tb.PerImage runs them: anchored (the level nearest the target
            # is the fixed budget itself, tb.PerImage(anchor=True), the default) or geometric
            level_plan = config_level_plan(model, tb.PerImage(keep=keep, levels=LEVELS, anchor=args.anchor))
            columns = [
                len(LEVELS) + speedups.index(speedup) if j == level_plan.anchor else j
                for j in range(len(LEVELS))
            ]
            lvp, calp = test[te][:, columns], calib[ca][:, columns]
            quality = cosine_to_full(calp, calp[:, 0])
            flops_p = torch.tensor(level_plan.flops, dtype=torch.float64)
            scores = {p: (calib_scores[p][ca], test_scores[p][te], train_scores[p][tr]) for p in POLICIES}
            if scope == "mix":
                log(f"predictor at {speedup}x")
                predictor = train_need_predictor(calib_tokens[ca], quality, level_plan.flops, target)
                with torch.no_grad():
                    need = [
                        torch.cat(
                            [predictor.need(t[j : j + 256].float()).double() for j in range(0, len(t), 256)]
                        )
                        for t in (calib_tokens[ca], test_tokens[te], train_tokens[tr])
                    ]
                scores["predictor"] = (need[0], need[1], need[2])
            # the library's calibration (calibrate_per_image with glance_images = the train split);
            # "calib-only": the budget held on the calibration images alone
            cal, tst, _ = scores["redundancy"]
            scores["redundancy calib-only"] = (cal, tst, None)
            for policy, (cal, tst, everyone) in scores.items():
                if everyone is None:
                    thresholds = fit_staircase(cal, quality, level_plan.flops, target)
                else:
                    thresholds = fit_staircase_within(cal, quality, level_plan.flops, target, everyone)
                if scope == "mix" and policy == "redundancy":
                    thresholds_of[speedup] = thresholds
                index = level_index(tst, torch.tensor(thresholds, dtype=torch.float64), len(LEVELS))
                name = f"per-image {policy}"
                conditions.append((name, select_levels(lvp, index), flops_p[index]))
                counts[name] = torch.bincount(index, minlength=len(LEVELS)).tolist()
            for name, extra in (("oracle cos+knn", knn_same), ("oracle cos+lin", lin_same)):
                index, _ = oracle_for_target(cosine, plan.flops, target, extra)
                conditions.append((name, select_levels(lv, index), flops[index]))
                counts[name] = torch.bincount(index, minlength=len(LEVELS)).tolist()
            rows = score_rows(judges, conditions, reference=reference)
            anchored = (
                "none" if level_plan.anchor is None else f"level {level_plan.anchor} = the fixed budget"
            )
            print(
                f"\n {scope}, FLOPs-ideal {speedup:g}x: target mean FLOPs {target:.4f} (ToMe keep={keep:g}); "
                f"per-image anchor: {anchored}; oracles over the geometric levels"
            )
            print(header)
            print("  " + "-" * (len(header) - 2))
            for r in rows:
                print(
                    f"  {r.condition:<22} {r.mean_flops:>6.4f} {100 * (r.mean_flops / target - 1):>+6.1f}% "
                    f"{r.knn_acc:>6.3f} {r.knn_se:>5.3f} {r.knn_gain:>+6.1f} {r.knn_gain_se:>4.1f} "
                    f"{r.linear_acc:>6.3f} {r.linear_se:>5.3f} {r.linear_gain:>+6.1f} {r.linear_gain_se:>4.1f}  "
                    + (str(counts[r.condition]) if r.condition in counts else "")
                )
            sys.stdout.flush()

    # A real grouped run on a subset: the cached-row shortcut must give the same features and FLOPs.
    mean, std = model_normalization(model)
    pick = torch.arange(0, len(y_test), max(1, len(y_test) // args.check_images))[: args.check_images]
    images = rgb_uint8_to_model_input(test_data.images[pick.numpy()], mean, std)
    print("\n== checks and speed (dev mix)")
    for speedup in speedups:
        config = tb.PerImage(
            keep=fixed[speedup],
            policy="redundancy",
            levels=LEVELS,
            thresholds=thresholds_of[speedup],
            anchor=args.anchor,
        )
        check_plan = config_level_plan(model, config)
        check_columns = [
            len(LEVELS) + speedups.index(speedup) if j == check_plan.anchor else j for j in range(len(LEVELS))
        ]
        log(f"real run {speedup}x")
        feats, image_flops = real_run(model, images, config, 32)
        index = level_index(
            test_scores["redundancy"][pick], torch.tensor(config.thresholds, dtype=torch.float64), len(LEVELS)
        )
        cached = select_levels(test[pick][:, check_columns], index)
        cos = torch.nn.functional.cosine_similarity(feats.double(), cached.double(), dim=-1)
        print(
            f"  {speedup:g}x real grouped run of {len(pick)} test images vs cached level rows: min cosine "
            f"{float(cos.min()):.6f}; FLOPs real {float(image_flops.mean()):.4f} vs cached "
            f"{float(torch.tensor(check_plan.flops, dtype=torch.float64)[index].mean()):.4f}"
        )
        speed_pick = torch.arange(0, len(y_test), max(1, len(y_test) // args.speed_images))[
            : args.speed_images
        ]
        speed_images = rgb_uint8_to_model_input(test_data.images[speed_pick.numpy()], mean, std)
        log(f"speed {speedup}x")
        load = os.getloadavg()[0]
        rows = bench_on_images(
            model,
            speed_images,
            {"fixed": tb.ToMe(keep=fixed[speedup]), "per-image": config},
            "fixed",
            batch_size=32,
            samples=args.speed_samples,
        )
        per_image = next(r for r in rows if r.condition == "per-image")
        fixed_row = next(r for r in rows if r.condition == "fixed")
        print(
            f"  {speedup:g}x wall clock, batch 32, {len(speed_pick)} test images (every source), "
            f"{args.speed_samples} interleaved samples, load {load:.2f} -> {os.getloadavg()[0]:.2f}: "
            f"fixed {fixed_row.img_s:.2f} img/s (FLOPs {fixed_row.mean_flops:.4f}), per-image {per_image.img_s:.2f} img/s "
            f"(FLOPs {per_image.mean_flops:.4f}); time ratio fixed/per-image median {per_image.ratio:.3f} "
            f"(IQR {per_image.ratio_q1:.3f}-{per_image.ratio_q3:.3f})"
        )
        sys.stdout.flush()
    print(
        "\nk-NN (cosine, k=20) and linear probe fit on the scope's full-token train features; +-: binomial SE; "
        "gain: points over the fixed budget with the SE of the paired difference; vs tgt: mean FLOPs over the "
        f"target; thresholds calibrated on train only; {time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
