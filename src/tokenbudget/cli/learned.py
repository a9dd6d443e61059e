"""``tokenbudget train-predictor``: DynamicViT keep/drop predictors (:mod:`tokenbudget.learned`)."""

from __future__ import annotations

import argparse

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-predictor``."""
    tp = options.add_command(
        sub,
        "train-predictor",
        cmd_train_predictor,
        "train DynamicViT keep/drop predictors (frozen backbone, distillation from all tokens)",
    )
    options.add_model_options(tp)
    options.add_data_options(tp, n_train=500, n_test=None, data_note="; labels are not used")
    tp.add_argument("--keep", type=float, default=0.7, help="target keep ratio per stage (default 0.7)")
    tp.add_argument(
        "--layers", type=options.int_list, default=[3, 6, 9], help="0-based pruning blocks (default 3,6,9)"
    )
    options.add_training_options(tp, steps=60, batch_size=8, lr=1e-3, batch_help="images")
    options.add_trainer_output(tp, "predictors/dinov2_small_dynamicvit")


def cmd_train_predictor(args: argparse.Namespace) -> int:
    """Train DynamicViT predictors for a model on unlabelled training images and save them."""
    from ..learned import save_predictors
    from ..learned.train import train_predictors

    max_seconds = options.max_seconds(args)
    model, data = options.model_and_data(args)
    bar = options.progress(args.steps, "train-predictor", disable=args.quiet)
    predictors, report = train_predictors(
        model,
        data.train_images,
        keep=args.keep,
        layers=tuple(args.layers),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_seconds=max_seconds,
        progress=options.step_progress(bar, keys=("loss", "kept")),
        info={"model": args.model, "data": data.name, "n_train": len(data.train_images)},
    )
    bar.close()
    weights, config = save_predictors(predictors, args.out)
    summary = report.summary()
    print(
        f"trained {len(predictors.layers)} predictors for {args.model} (layers {list(predictors.layers)}, "
        f"keep {args.keep} per stage) in {summary['steps']} steps, {summary['seconds']} s: loss "
        f"{summary['loss_first']:.4f} -> {summary['loss_last_mean']:.4f} (mean of the last fifth), kept "
        f"fractions {[round(k, 3) for k in summary['kept_fraction_last']]}"
    )
    print(
        f"wrote {weights} and {config}; use tb.DynamicViT(keep={args.keep}, layers={tuple(args.layers)}, "
        f"predictor={str(config)!r})"
    )
    return 0
