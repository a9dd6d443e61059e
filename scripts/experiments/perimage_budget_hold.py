"""Does a calibrated tb.PerImage spend what it is given? Target, train and test mean block FLOPs.

Calibrates on the train split of a labelled folder (``--data DIR``, e.g. the folder of
``make_heldout_mix.py``) at each FLOPs-ideal speedup, with the budget held on every train image's
glance, and reports the target, the mean FLOPs the train images get and the mean FLOPs the test
images get (each image's level from its glance; no test labels are used). Rule ``fit`` embeds
``--calibration`` train images at every level (a forward per level); rule ``spread`` needs none.

    PYTHONPATH=src nice -n 10 python scripts/experiments/perimage_budget_hold.py --data DIR --speedups 2,3
"""

from __future__ import annotations

import argparse

import torch

import tokenbudget as tb
from tokenbudget.adaptive.per_image import calibrate_per_image
from tokenbudget.data.eval_sets import load_eval_data
from tokenbudget.data.images import model_normalization
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.evaluate.per_image_eval import per_image_mean_flops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--speedups", default="2,3")
    parser.add_argument("--rules", default="spread,fit")
    parser.add_argument(
        "--calibration", type=int, default=48, help="train images embedded at every level (fit)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tb.models.dinov2_small().eval()
    data = load_eval_data(args.data, 224, *model_normalization(model))
    subset = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(0))[
        : args.calibration
    ]
    print(
        f"{args.data}: {len(data.train_images)} train / {len(data.test_images)} test images; DINOv2-S 224 px"
    )
    print(f"{'speedup':>7} {'rule':>6} {'target':>7} {'train':>7} {'test':>7} {'test miss':>9}")
    for speedup in (float(s) for s in args.speedups.split(",")):
        keep = keep_for_flops_speedup(model, speedup)
        for rule in args.rules.split(","):
            images = data.train_images[subset] if rule == "fit" else data.train_images
            cfg = calibrate_per_image(model, images, keep=keep, rule=rule, glance_images=data.train_images)
            test = per_image_mean_flops(model, cfg, data.test_images)
            miss = 100 * (test / cfg.target_flops - 1)
            print(
                f"{speedup:>7g} {rule:>6} {cfg.target_flops:>7.4f} {cfg.calibrated_flops:>7.4f} {test:>7.4f} {miss:>+8.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
