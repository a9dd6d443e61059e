"""The command-line side of early exit and the budget predictor.

``tokenbudget train-exits`` / ``eval-exits`` and ``tokenbudget train-budget-predictor`` /
``eval-budget-predictor``; :func:`add_parsers` registers them on the main parser. Backbone outputs
of the embedded DINOv2 are cached per dataset (:mod:`tokenbudget.evaluate.caches`), so training
and evaluating again costs seconds; other models are recomputed each time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

_DEFAULT_TARGETS = "0.3,0.4,0.5,0.6,0.7,0.8"


def _cli():  # noqa: ANN202 - the cli module (imported late: it imports this module's parsers)
    from . import commands as cli

    return cli


def _cache_key(args: argparse.Namespace, data_name: str, split: str, count: int) -> str | None:
    """Cache key of backbone outputs, or None (not cached) for models whose weights vary by run."""
    if args.model in ("dinov2_small", "embedded") and args.img_size in (None, 224):
        return f"dinov2_small-imgfocus-{data_name}-{split}-{count}-{args.seed}"
    return None


def _layer_tokens(model, images, args, data_name: str, split: str):  # noqa: ANN001, ANN202
    from ..evaluate.caches import cached_layer_tokens

    key = _cache_key(args, data_name, split, len(images))
    bar = _cli()._progress(len(images), f"class tokens ({split})", disable=args.quiet)
    tokens = cached_layer_tokens(model, images, key or "", cache=key is not None, progress=bar.update)
    bar.close()
    return tokens


def _budget_features(model, images, budgets, args, data_name: str, split: str, full):  # noqa: ANN001, ANN202
    """[N, K, 2C] harness features at each budget; ``full`` [N, 2C] (the class-token pass's full-token
    feature) is the column of budget 1.0."""
    from ..evaluate.caches import cached_budget_features

    reduced = [b for b in budgets if b < 1.0]
    key = _cache_key(args, data_name, split, len(images))
    bar = _cli()._progress(
        -(-len(images) // 32) * len(reduced), f"ToMe features ({split})", disable=args.quiet
    )
    feats = cached_budget_features(
        model, images, reduced, key or "", cache=key is not None, progress=bar.update
    )
    bar.close()
    columns = list(feats.unbind(1)) + ([full] if 1.0 in budgets else [])
    return torch.stack(columns, dim=1)


def _full_features(model, images, args, data_name: str, split: str):  # noqa: ANN001, ANN202
    """[N, 2C]: the harness feature with all tokens (from the cached class-token pass)."""
    from ..adapters import find_adapter

    depth = find_adapter(model).num_layers
    return _layer_tokens(model, images, args, data_name, split)[:, depth : depth + 2].flatten(1)


def _split(n: int, calib_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, calibration) indices of n training images, a seeded split."""
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"--calib-fraction must be in (0, 1), got {calib_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_calib = max(1, round(n * calib_fraction))
    if n_calib >= n:
        raise ValueError(f"{n} training images leave none to train the heads on; give more --n-train")
    return order[n_calib:].sort().values, order[:n_calib].sort().values


def cmd_train_exits(args: argparse.Namespace) -> int:
    from ..adaptive.early_exit import EarlyExit
    from ..adaptive.exit_heads import save_exit_heads, train_exit_heads

    cli = _cli()
    cli._set_threads(args.threads)
    model, data = cli._model_and_data(args)
    from ..adapters import find_adapter

    depth = find_adapter(model).num_layers
    layers = args.layers if args.layers is not None else list(range(depth))
    fit, calib = _split(len(data.train_images), args.calib_fraction, args.seed)
    tokens = _layer_tokens(model, data.train_images, args, data.name, "train")
    bar = cli._progress(args.epochs, "train-exits", disable=args.quiet)
    heads = train_exit_heads(
        tokens[fit],
        data.train_labels[fit],
        layers,
        depth=depth,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        progress=lambda epoch, loss: bar.update(1),
        info={
            "model": args.model,
            "data": data.name,
            "n_train": len(data.train_images),
            "calib_fraction": args.calib_fraction,
            "seed": args.seed,
            "n_fit": len(fit),
        },
    )
    bar.close()
    early_exit = EarlyExit(model, heads)
    confidences, logits = early_exit.confidences(tokens[calib])
    calib_acc = (logits.argmax(-1) == data.train_labels[calib][:, None]).float().mean(0)
    heads.info["calib_accuracy"] = [round(float(a), 4) for a in calib_acc]
    if args.target_flops is not None:
        heads.info["thresholds"] = early_exit.calibrate(tokens[calib], target_flops=args.target_flops)
        heads.info["calibrated_for_flops"] = args.target_flops
    weights, config = save_exit_heads(heads, args.out)
    print(
        f"trained {len(heads.layers)} exit heads for {args.model} on {len(fit)} {data.name} images "
        f"({heads.info['train_seconds']} s); accuracy on the {len(calib)} calibration images per exit "
        f"(after blocks {[layer + 1 for layer in heads.layers]}): {heads.info['calib_accuracy']}"
    )
    if args.target_flops is not None:
        print(
            f"thresholds for mean FLOPs {args.target_flops}: {[round(t, 4) for t in heads.info['thresholds']]}"
        )
    print(f"wrote {weights} and {config}; use tb.adaptive.EarlyExit(model, {str(config)!r})")
    return 0


def cmd_eval_exits(args: argparse.Namespace) -> int:
    from ..adaptive.early_exit import EarlyExit
    from ..adaptive.exit_heads import load_exit_heads
    from ..evaluate.exits import evaluate_exits, format_exit_table

    cli = _cli()
    cli._set_threads(args.threads)
    heads = load_exit_heads(args.heads)
    targets = cli._float_list(args.target_flops)
    model, data = cli._model_and_data(args)
    early_exit = EarlyExit(model, heads, exits=args.exits)
    calib_fraction = float(heads.info.get("calib_fraction", 0.2))
    _, calib = _split(len(data.train_images), calib_fraction, int(heads.info.get("seed", args.seed)))
    train_tokens = _layer_tokens(model, data.train_images, args, data.name, "train")
    test_tokens = _layer_tokens(model, data.test_images, args, data.name, "test")
    rows = evaluate_exits(early_exit, train_tokens[calib], test_tokens, data.test_labels, targets)
    timing = None
    if args.timed_target is not None:
        timing = _time_early_exit(early_exit, train_tokens[calib], test_tokens, data.test_images, args)
    if args.json:
        print(json.dumps({"rows": [r.to_dict() for r in rows], "timing": timing}, indent=2))
        return 0
    print(
        f"{args.model} on {data.name}: exit heads after blocks {[e + 1 for e in early_exit.exits]}, thresholds "
        f"calibrated on {len(calib)} held-out train images, scored on {len(data.test_images)} test images"
    )
    print(format_exit_table(rows))
    print(
        "FLOPs: fraction of the backbone's (patch embedding + all blocks), exit heads included; depth: blocks run; "
        "early exit: max-softmax thresholds calibrated to the target mean FLOPs (MSDNet/DVT budgeted protocol)"
    )
    if timing is not None:
        print(
            f"real EarlyExit forward at target {timing['target']}: {timing['images']} test images, batch "
            f"{timing['batch_size']}: {timing['early_exit_img_s']:.1f} img/s vs {timing['full_img_s']:.1f} img/s "
            f"unpatched forward_features ({timing['speedup']:.2f}x, FLOPs-ideal {1 / timing['flops']:.2f}x); "
            f"exits equal to the cached simulation for {timing['same_exit']:.3f} of images"
        )
    return 0


def _time_early_exit(early_exit, calib_tokens, test_tokens, images, args) -> dict:  # noqa: ANN001
    """Run the real early-exit forward on test images and time it against the unpatched model."""
    from ..adaptive.early_exit import simulate_exits

    early_exit.calibrate(calib_tokens, target_flops=args.timed_target)
    images = images[: args.timed_images]
    costs = torch.tensor(early_exit.costs("flops"))
    early_ms, full_ms, exits = 0.0, 0.0, []
    with torch.inference_mode():
        for start in range(0, len(images), args.batch_size):
            batch = images[start : start + args.batch_size]
            t0 = time.perf_counter()
            out = early_exit(batch)
            t1 = time.perf_counter()
            early_exit.adapter.features(batch)
            t2 = time.perf_counter()
            early_ms, full_ms = early_ms + (t1 - t0), full_ms + (t2 - t1)
            exits.append(out.exit_index)
    chosen = torch.cat(exits)
    conf, _ = early_exit.confidences(test_tokens[: len(images)])
    simulated = simulate_exits(conf, early_exit.thresholds)
    return {
        "target": args.timed_target,
        "images": len(images),
        "batch_size": args.batch_size,
        "early_exit_img_s": len(images) / early_ms,
        "full_img_s": len(images) / full_ms,
        "speedup": full_ms / early_ms,
        "flops": float(costs[chosen].mean()),
        "same_exit": float((chosen == simulated).float().mean()),
    }


def cmd_train_budget_predictor(args: argparse.Namespace) -> int:
    from ..adaptive.budget_predictor import (
        agreement_targets,
        model_glance,
        save_budget_predictor,
        train_budget_predictor,
    )

    cli = _cli()
    cli._set_threads(args.threads)
    budgets = cli._float_list(args.budgets)
    model, data = cli._model_and_data(args)
    full = _full_features(model, data.train_images, args, data.name, "train")
    features = _budget_features(model, data.train_images, budgets, args, data.name, "train", full)
    targets = agreement_targets(full, features, args.min_cosine)
    glance = model_glance(model, data.train_images)
    bar = cli._progress(args.epochs, "train-budget-predictor", disable=args.quiet)
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

    cli = _cli()
    cli._set_threads(args.threads)
    predictor = load_budget_predictor(args.predictor)
    model, data = cli._model_and_data(args)
    predictor.check_model(model)
    train_full = _full_features(model, data.train_images, args, data.name, "train")
    test_full = _full_features(model, data.test_images, args, data.name, "test")
    test_images, test_labels, split = data.test_images, data.test_labels, "test"
    if args.max_test is not None and args.max_test < len(test_images):
        # A seeded subset of the test images: the full features come from the whole set's cache.
        keep = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(args.seed))[
            : args.max_test
        ]
        keep = keep.sort().values
        test_images, test_labels, test_full = test_images[keep], test_labels[keep], test_full[keep]
        split = f"test-{args.max_test}-of-{len(data.test_images)}"
    test_features = _budget_features(model, test_images, predictor.budgets, args, data.name, split, test_full)
    min_cosine = float(predictor.info.get("min_cosine", args.min_cosine))
    rows = evaluate_budgets(
        model,
        predictor,
        train_full,
        data.train_labels,
        test_images,
        test_labels,
        test_features,
        min_cosine,
        run_predicted=not args.cached_predicted,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(
        f"{args.model} on {data.name}: {len(data.train_images)} train / {len(test_images)} test images; budgets "
        f"{list(predictor.budgets)} (ToMe keep)"
    )
    print(format_budget_table(rows))
    print(
        "k-NN (cosine, k=20) and linear probe fit on full-token train features; tokens: mean tokens after the last "
        "block; FLOPs: mean block FLOPs over the unpatched model's"
    )
    return 0


def _common(parser: argparse.ArgumentParser, model_help: str, n_train: int, n_test: int) -> None:
    parser.add_argument("--model", default="dinov2_small", help=model_help)
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist, anomaly, or a directory")
    parser.add_argument("--n-train", type=int, default=n_train)
    parser.add_argument("--n-test", type=int, default=n_test)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parsers(sub: argparse._SubParsersAction, model_help: str) -> None:
    """Register train-exits, eval-exits, train-budget-predictor and eval-budget-predictor."""
    cli = _cli()
    te = sub.add_parser("train-exits", help="train early-exit heads on a frozen ViT (class token per block)")
    _common(te, model_help, 1000, 10)
    te.add_argument(
        "--layers", type=cli._int_list, default=None, help="0-based exit blocks (default: every block)"
    )
    te.add_argument(
        "--calib-fraction",
        type=float,
        default=0.2,
        help="train images held out to calibrate thresholds (0.2)",
    )
    te.add_argument("--epochs", type=int, default=100)
    te.add_argument("--lr", type=float, default=3e-3)
    te.add_argument("--target-flops", type=float, default=None, help="also calibrate and store thresholds")
    te.add_argument(
        "--out", default="exits/dinov2_small_exits", help="output stem (STEM.safetensors + STEM.json)"
    )
    te.set_defaults(func=cmd_train_exits)

    ee = sub.add_parser("eval-exits", help="early exit vs fixed depth: accuracy against mean FLOPs")
    _common(ee, model_help, 1000, 500)
    ee.add_argument("--heads", default="exits/dinov2_small_exits", help="exit heads (train-exits --out)")
    ee.add_argument(
        "--exits", type=cli._int_list, default=None, help="subset of the heads' layers to exit at"
    )
    ee.add_argument(
        "--target-flops", default=_DEFAULT_TARGETS, help=f"comma list (default {_DEFAULT_TARGETS})"
    )
    ee.add_argument(
        "--timed-target", type=float, default=None, help="also run and time the real forward here"
    )
    ee.add_argument("--timed-images", type=int, default=128)
    ee.add_argument("--batch-size", type=int, default=32)
    ee.add_argument("--json", action="store_true")
    ee.set_defaults(func=cmd_eval_exits)

    tb_ = sub.add_parser(
        "train-budget-predictor", help="train a per-image token budget predictor (ToMe budgets)"
    )
    _common(tb_, model_help, 1000, 10)
    tb_.add_argument(
        "--budgets", default="0.25,0.5,0.75,1.0", help="ToMe keep fractions (default 0.25,0.5,0.75,1.0)"
    )
    tb_.add_argument(
        "--min-cosine",
        type=float,
        default=0.9995,
        help="agreement: cosine of reduced to full features (0.9995)",
    )
    tb_.add_argument("--target-keep", type=float, default=None, help="mean keep the budget loss steers to")
    tb_.add_argument("--budget-weight", type=float, default=10.0, help="lambda of the budget loss")
    tb_.add_argument("--hidden", type=int, default=128)
    tb_.add_argument("--epochs", type=int, default=30)
    tb_.add_argument("--lr", type=float, default=1e-3)
    tb_.add_argument("--out", default="predictors/dinov2_small_budget", help="output stem")
    tb_.set_defaults(func=cmd_train_budget_predictor)

    eb = sub.add_parser("eval-budget-predictor", help="predicted per-image budgets vs one budget for all")
    _common(eb, model_help, 1000, 500)
    eb.add_argument("--predictor", default="predictors/dinov2_small_budget")
    eb.add_argument(
        "--min-cosine", type=float, default=0.9995, help="oracle agreement (default: the predictor's)"
    )
    eb.add_argument(
        "--max-test", type=int, default=None, help="score a seeded subset of this many test images"
    )
    eb.add_argument(
        "--cached-predicted",
        action="store_true",
        help="score the predicted budgets on the cached per-budget features instead of a grouped run (same features)",
    )
    eb.add_argument("--json", action="store_true")
    eb.set_defaults(func=cmd_eval_budget_predictor)
