"""``tokenbudget adaptive-eval``: adaptive patching (``tb.AdaptivePatch``) against one fixed patch size
and against a lower input resolution, accuracy against tokens."""

from __future__ import annotations

import argparse
import json
import sys

from . import options

_MODES = ("patch", "resolution")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``adaptive-eval``."""
    ae = options.add_command(
        sub,
        "adaptive-eval",
        cmd_adaptive_eval,
        "adaptive patching (tb.AdaptivePatch) vs one fixed patch size vs input resolution: accuracy vs tokens",
    )
    options.add_model_options(ae)
    options.add_data_options(ae, n_train=1000, n_test=200)
    ae.add_argument(
        "--targets",
        type=options.float_list,
        default=[128.0, 196.0],
        help="mean patch tokens per image to calibrate the thresholds to, on the train images (default 128,196)",
    )
    ae.add_argument(
        "--fixed",
        type=options.int_list,
        default=[28, 16],
        help="patch sizes run for every image, as baselines (default 28,16: 64 and 196 tokens at 224 px)",
    )
    ae.add_argument(
        "--patch-sizes",
        type=options.int_list,
        default=None,
        help="adaptive patch sizes, coarse to fine (default: twice, once, half the native patch)",
    )
    ae.add_argument(
        "--modes",
        type=options.name_list,
        default="patch,resolution",
        help="patch (resample the kernel), resolution (resize); comma list (default patch,resolution)",
    )
    ae.add_argument("--batch-size", type=int, default=32, help="images per forward (default 32)")
    options.add_run_options(ae, quiet="no progress lines")


def cmd_adaptive_eval(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate.adaptive_eval import (
        cached_fashion_mnist_train_features,
        evaluate_adaptive,
        format_adaptive_table,
    )

    for mode in args.modes:
        if mode not in _MODES:
            raise ValueError(f"--modes takes patch and/or resolution, got {mode!r}")
    model, data = options.model_and_data(args)
    train_features = None
    if args.model == "dinov2_small" and args.data == "fashion-mnist" and args.img_size in (None, 224):
        train_features = cached_fashion_mnist_train_features(len(data.train_images), args.seed)
    quiet = args.json or args.quiet
    rows = evaluate_adaptive(
        model,
        data,
        targets=args.targets,
        fixed_sizes=args.fixed,
        patch_sizes=args.patch_sizes,
        modes=args.modes,
        batch_size=args.batch_size,
        train_features=train_features,
        seed=args.seed,
        progress=None if quiet else (lambda message: print(f"  ... {message}", file=sys.stderr)),
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(
        f"{args.model} on {data.name}: {len(data.train_images)} train / {len(data.test_images)} test images, "
        f"{int(data.test_images.shape[-1])} px, {torch.get_num_threads()} threads"
    )
    print(format_adaptive_table(rows))
    print(
        "tokens: measured mean patch tokens per test image; FLOPs: mean block FLOPs over the full model's; "
        "k-NN (cosine, k=20) and linear probe fit on full-token train features; cosine: vs full test features; "
        "speedup: wall time of embedding the test images, full over this (same process); random-mix: the "
        "adaptive row's sizes and shares given to random images (a control for the score; no timing)"
    )
    return 0
