"""``tokenbudget train-budget-predictor`` and ``eval-budget-predictor``: a learned per-image ToMe
budget (:mod:`tokenbudget.adaptive.budget_predictor`)."""

from __future__ import annotations

import argparse
import json

from . import cached, options

_MIN_COSINE = 0.9995


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-budget-predictor`` and ``eval-budget-predictor``."""
    tb_ = options.add_command(
        sub,
        "train-budget-predictor",
        cmd_train_budget_predictor,
        "train a per-image token budget predictor (ToMe budgets)",
    )
    options.add_model_options(tb_)
    options.add_data_options(tb_, n_train=1000, n_test=None)
    tb_.add_argument(
        "--budgets",
        type=options.float_list,
        default="0.25,0.5,0.75,1.0",
        help="ToMe keep fractions, increasing (default 0.25,0.5,0.75,1.0)",
    )
    tb_.add_argument(
        "--min-cosine",
        type=float,
        default=_MIN_COSINE,
        help=f"agreement: cosine of reduced to full features (default {_MIN_COSINE})",
    )
    tb_.add_argument("--target-keep", type=float, default=None, help="mean keep the budget loss steers to")
    tb_.add_argument(
        "--budget-weight", type=float, default=10.0, help="lambda of the budget loss (default 10)"
    )
    tb_.add_argument("--hidden", type=int, default=128, help="hidden width of the predictor (default 128)")
    tb_.add_argument("--epochs", type=int, default=30, help="passes over the training images (default 30)")
    tb_.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 0.001)")
    options.add_trainer_output(tb_, "predictors/dinov2_small_budget")

    eb = options.add_command(
        sub,
        "eval-budget-predictor",
        cmd_eval_budget_predictor,
        "predicted per-image budgets vs one budget for all",
    )
    options.add_model_options(eb)
    options.add_data_options(eb, n_train=1000, n_test=500)
    eb.add_argument(
        "--predictor",
        default="predictors/dinov2_small_budget",
        help="the trained predictor (train-budget-predictor --out; default predictors/dinov2_small_budget)",
    )
    eb.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        help=f"oracle agreement (default: the predictor's training value, else {_MIN_COSINE})",
    )
    eb.add_argument(
        "--cached-predicted",
        action="store_true",
        help="score the predicted budgets on the cached per-budget features instead of a grouped run (same features)",
    )
    options.add_run_options(eb)


def cmd_train_budget_predictor(args: argparse.Namespace) -> int:
    import torch

    from ..adaptive.budget_predictor import (
        agreement_targets,
        model_glance,
        save_budget_predictor,
        train_budget_predictor,
    )

    budgets = args.budgets
    model, data = options.model_and_data(args)
    full = cached.full_features(model, data.train_images, args, data.name, "train")
    features = cached.budget_features(model, data.train_images, budgets, args, data.name, "train", full)
    targets = agreement_targets(full, features, args.min_cosine)
    glance = model_glance(model, data.train_images)
    bar = options.progress(args.epochs, "train-budget-predictor", disable=args.quiet)
    predictor, report = train_budget_predictor(
        glance,
        targets,
        budgets,
        target_keep=args.target_keep,
        budget_weight=args.budget_weight,
        hidden=args.hidden,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        progress=lambda epoch, losses: bar.update(1),
        info={
            "model": args.model,
            "data": data.name,
            "n_train": len(data.train_images),
            "min_cosine": args.min_cosine,
            "target_counts": torch.bincount(targets, minlength=len(budgets)).tolist(),
        },
    )
    bar.close()
    weights, config = save_budget_predictor(predictor, args.out)
    print(
        f"targets (smallest budget with cosine >= {args.min_cosine} to the full features), images per budget "
        f"{dict(zip(predictor.budgets, predictor.info['target_counts'], strict=True))}; mean keep "
        f"{float(torch.tensor(budgets)[targets].mean()):.3f}"
    )
    print(
        f"trained in {report.seconds:.1f} s: loss {report.loss[0]:.4f} -> {report.loss[-1]:.4f}, expected keep "
        f"{report.expected_keep:.3f} (target {predictor.info['target_keep']:.3f}), target accuracy "
        f"{predictor.info['train_target_accuracy']}"
    )
    print(f"wrote {weights} and {config}")
    return 0


def cmd_eval_budget_predictor(args: argparse.Namespace) -> int:
    from ..adaptive.budget_predictor import load_budget_predictor
    from ..evaluate.budget_predictor import evaluate_budgets, format_budget_table

    predictor = load_budget_predictor(args.predictor)
    model, data = options.model_and_data(args)
    predictor.check_model(model)
    train_full = cached.full_features(model, data.train_images, args, data.name, "train")
    test_full = cached.full_features(model, data.test_images, args, data.name, "test")
    test_features = cached.budget_features(
        model, data.test_images, predictor.budgets, args, data.name, "test", test_full
    )
    min_cosine = args.min_cosine
    if min_cosine is None:
        min_cosine = float(predictor.info.get("min_cosine", _MIN_COSINE))
    rows = evaluate_budgets(
        model,
        predictor,
        train_full,
        data.train_labels,
        data.test_images,
        data.test_labels,
        test_features,
        min_cosine,
        run_predicted=not args.cached_predicted,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(
        f"{args.model} on {data.name}: {len(data.train_images)} train / {len(data.test_images)} test images; "
        f"budgets {list(predictor.budgets)} (ToMe keep)"
    )
    print(format_budget_table(rows))
    print(
        "k-NN (cosine, k=20) and linear probe fit on full-token train features; tokens: mean tokens after the "
        "last block; FLOPs: mean block FLOPs over the unpatched model's"
    )
    return 0
