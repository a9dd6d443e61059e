"""Per-image policies on the dev mix: which glance score, calibrated on train only, beats one fixed
budget at the same mean FLOPs on the held-out test split.

    PYTHONPATH=src python scripts/experiments/perimage_policies.py [--calib-stride 3] [--threads 2]

Each policy scores every image (:mod:`tokenbudget.ops.glance` and friends); thresholds are calibrated
on the *train* split (rule ``fit``: on a subset of train images embedded at every level, where
their features stay closest to their full-token ones; rule ``spread``: a flat profile over the
levels tilted to the target, no extra forward). The test images are then assigned levels by those
thresholds and scored by picking each image's row of its level's features (cached; ToMe reduces
each image on its own, so this equals a grouped run, which ``perimage_eval.py`` checks).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import tokenbudget as tb
from tokenbudget.adaptive.per_image import model_level_plan, train_need_predictor
from tokenbudget.data.images import model_normalization, rgb_uint8_to_model_input
from tokenbudget.data.mix import SOURCES, dev_mix
from tokenbudget.evaluate.budget_predictor import tome_cost
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.evaluate.per_image_eval import (
    Judges,
    cosine_to_full,
    score_rows,
    select_levels,
)
from tokenbudget.evaluate.per_image_features import mix_level_features
from tokenbudget.ops.budget_fit import fit_staircase, profile_shares, thresholds_for_shares
from tokenbudget.ops.glance import distinct_need, level_index, redundancy_need
from tokenbudget.strategies.per_image import need_scores

LEVELS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
POLICIES = ("redundancy", "entropy", "detail", "spread", "distinct-k0", "redundancy-k0")


def glance(model: torch.nn.Module, images, policies, batch_size: int = 50) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """[N] scores of every policy for uint8 ``images``, and the patch embeddings (key ``"tokens"``)."""
    mean, std = model_normalization(model)
    out: dict[str, list] = {p: [] for p in policies}
    tokens = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = rgb_uint8_to_model_input(images[start : start + batch_size], mean, std)
            raw = model.patch_embed(x)
            pt = raw.flatten(1, 2) if raw.ndim == 4 else raw
            tokens.append(pt.half())
            keys = None
            for policy in policies:
                if policy.endswith("-k0"):
                    if keys is None:  # the first block's keys, summed over heads (ToMe's metric)
                        block = model.blocks[0]
                        h = block.norm1(model.norm_pre(model._pos_embed(raw)))
                        qkv = block.attn.qkv(h).reshape(h.shape[0], h.shape[1], 3, block.attn.num_heads, -1)
                        keys = block.attn.k_norm(qkv[:, :, 1].transpose(1, 2)).sum(1)
                    score = (distinct_need if policy.startswith("distinct") else redundancy_need)(keys, 1)
                elif policy in ("redundancy", "entropy", "detail", "spread"):
                    score = need_scores(policy, pt, x, int(model.patch_embed.patch_size[0]))
                else:
                    continue
                out[policy].append(score.double())
    result = {p: torch.cat(v) for p, v in out.items() if v}
    result["tokens"] = torch.cat(tokens)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-source", type=int, default=300)
    parser.add_argument(
        "--calib-stride", type=int, default=3, help="every n-th train image is embedded at every level"
    )
    parser.add_argument("--speedups", default="1.5,2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    model = tb.models.dinov2_small().eval()
    plan = model_level_plan(model, LEVELS)
    level_configs = [None] + [tb.ToMe(r=list(m)) for m in plan.merged[1:]]
    speedups = [float(s) for s in args.speedups.split(",")]
    # ToMe's even keep schedule reaches about 2.7x on DINOv2-S; beyond it the fixed budget is the
    # geometric level at that speedup (the same schedule family as the per-image levels).
    fixed = {s: keep_for_flops_speedup(model, s) for s in speedups if s <= 2.5}

    def log(name: str) -> None:
        print(f"  [{time.time() - start:6.0f} s] {name[:100]}", file=sys.stderr, flush=True)

    common = dict(n_per_source=args.n_per_source, progress=log)
    train, y_train, _ = mix_level_features(model, "dinov2_small", "train", [None], **common)
    calib, _, _ = mix_level_features(
        model, "dinov2_small", "train", level_configs, stride=args.calib_stride, **common
    )
    test, y_test, src = mix_level_features(
        model, "dinov2_small", "test", level_configs + [tb.ToMe(keep=k) for k in fixed.values()], **common
    )
    levels, keep_feats = test[:, : len(LEVELS)], test[:, len(LEVELS) :]
    judges = Judges.fit(train[:, 0], y_train, levels[:, 0], y_test)
    calib_quality = cosine_to_full(calib, calib[:, 0])
    log("glance")
    train_images = dev_mix("train", args.n_per_source).images
    test_images = dev_mix("test", args.n_per_source).images
    train_scores = glance(model, train_images, POLICIES)
    test_scores = glance(model, test_images, POLICIES)
    calib_index = torch.cat(
        [
            torch.nonzero(torch.from_numpy(dev_mix("train", args.n_per_source).sources) == s).flatten()[
                :: args.calib_stride
            ]
            for s in range(len(SOURCES))
        ]
    )
    flops = torch.tensor(plan.flops, dtype=torch.float64)
    n = len(y_test)
    header = f"{'policy':<28} {'FLOPs':>6} {'speedup':>7} {'k-NN':>6} {'gain':>6} {'+-':>4} {'linear':>6} {'gain':>6} {'+-':>4}  images per level {list(LEVELS)}"
    # Label-aware quality of the calibration images: does a level keep the linear probe's decision
    # (probe fit on the full-token train features), with the cosine as a tie-breaker.
    full_decision = judges.probe.predict(calib[:, 0])
    calib_decision = torch.stack(
        [judges.probe.predict(calib[:, j]) == full_decision for j in range(len(LEVELS))], 1
    )
    decision_quality = calib_decision.double() + 0.1 * calib_quality
    qualities = {"fit": calib_quality, "fit-dec": decision_quality}
    for speedup in speedups:
        if speedup in fixed:
            keep = fixed[speedup]
            target, reference = tome_cost(model, keep)[1], f"fixed keep={keep:g}"
            fixed_feats = keep_feats[:, list(fixed).index(speedup)]
        else:
            j = LEVELS.index(speedup)
            target, reference, fixed_feats = plan.flops[j], f"fixed level {speedup:g}", levels[:, j]
        conditions = [(reference, fixed_feats, torch.full((n,), target))]
        counts = {}
        scores_train = dict(train_scores)
        scores_test = dict(test_scores)
        for kind, quality in qualities.items():
            log(f"predictor on {kind} targets at {speedup}x")
            predictor = train_need_predictor(train_scores["tokens"][calib_index], quality, plan.flops, target)
            with torch.no_grad():
                for scores, tokens in (
                    (scores_train, train_scores["tokens"]),
                    (scores_test, test_scores["tokens"]),
                ):
                    scores[f"predictor-{kind}"] = torch.cat(
                        [
                            predictor.need(tokens[j : j + 256].float()).double()
                            for j in range(0, len(tokens), 256)
                        ]
                    )
        for policy in (*POLICIES, "predictor-fit", "predictor-fit-dec"):
            for rule in ("fit", "fit-dec", "spread"):
                if rule == "spread":
                    thresholds = thresholds_for_shares(
                        scores_train[policy], profile_shares(target, plan.flops)
                    )
                else:
                    thresholds = fit_staircase(
                        scores_train[policy][calib_index], qualities[rule], plan.flops, target
                    )
                index = level_index(
                    scores_test[policy], torch.tensor(thresholds, dtype=torch.float64), len(LEVELS)
                )
                name = f"{policy} ({rule})"
                conditions.append((name, select_levels(levels, index), flops[index]))
                counts[name] = [
                    torch.bincount(index[src == s], minlength=len(LEVELS)).tolist()
                    for s in range(len(SOURCES))
                ]
        rows = score_rows(judges, conditions, reference=reference)
        print(
            f"\nFLOPs-ideal {speedup:g}x: thresholds calibrated on train; test FLOPs are what the test images got"
        )
        print(header)
        print("-" * len(header))
        for r in rows:
            print(
                f"{r.condition:<28} {r.mean_flops:>6.4f} {r.speedup:>6.3f}x {r.knn_acc:>6.3f} {r.knn_gain:>+6.1f} "
                f"{r.knn_gain_se:>4.1f} {r.linear_acc:>6.3f} {r.linear_gain:>+6.1f} {r.linear_gain_se:>4.1f}  "
                + (
                    " ".join(f"{SOURCES[s][:4]}{c}" for s, c in enumerate(counts[r.condition]))
                    if r.condition in counts
                    else ""
                )
            )
        sys.stdout.flush()
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
