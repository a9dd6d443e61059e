"""``tokenbudget train-exits`` and ``eval-exits``: early exit (:mod:`tokenbudget.adaptive.early_exit`)."""

from __future__ import annotations

import argparse
import json
import time

from . import cached, options

_DEFAULT_TARGETS = "0.3,0.4,0.5,0.6,0.7,0.8"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-exits`` and ``eval-exits``."""
    te = options.add_command(
        sub, "train-exits", cmd_train_exits, "train early-exit heads on a frozen ViT (class token per block)"
    )
    options.add_model_options(te)
    options.add_data_options(te, n_train=1000, n_test=None)
    te.add_argument(
        "--layers", type=options.int_list, default=None, help="0-based exit blocks (default: every block)"
    )
    te.add_argument(
        "--calib-fraction",
        type=float,
        default=0.2,
        help="train images held out to calibrate thresholds (0.2)",
    )
    te.add_argument(
        "--epochs", type=int, default=100, help="passes over the cached class tokens (default 100)"
    )
    te.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 0.003)")
    te.add_argument("--target-flops", type=float, default=None, help="also calibrate and store thresholds")
    options.add_trainer_output(te, "exits/dinov2_small_exits")

    ee = options.add_command(
        sub, "eval-exits", cmd_eval_exits, "early exit vs fixed depth: accuracy against mean FLOPs"
    )
    options.add_model_options(ee)
    options.add_data_options(ee, n_train=1000, n_test=500)
    ee.add_argument("--heads", default="exits/dinov2_small_exits", help="exit heads (train-exits --out)")
    ee.add_argument(
        "--exits", type=options.int_list, default=None, help="subset of the heads' layers to exit at"
    )
    ee.add_argument(
        "--target-flops",
        type=options.float_list,
        default=_DEFAULT_TARGETS,
        help=f"mean FLOPs fractions to calibrate the thresholds to; comma list (default {_DEFAULT_TARGETS})",
    )
    ee.add_argument(
        "--timed-target", type=float, default=None, help="also run and time the real forward here"
    )
    ee.add_argument(
        "--timed-images", type=int, default=128, help="test images of the timed run (default 128)"
    )
    ee.add_argument("--batch-size", type=int, default=32, help="batch size of the timed run (default 32)")
    options.add_run_options(ee)


def cmd_train_exits(args: argparse.Namespace) -> int:
    from ..adapters import find_adapter
    from ..adaptive.early_exit import EarlyExit
    from ..adaptive.exit_heads import save_exit_heads, train_exit_heads

    model, data = options.model_and_data(args)
    depth = find_adapter(model).num_layers
    layers = args.layers if args.layers is not None else list(range(depth))
    fit, calib = cached.fit_calibration_split(len(data.train_images), args.calib_fraction, args.seed)
    tokens = cached.layer_tokens(model, data.train_images, args, data.name, "train")
    bar = options.progress(args.epochs, "train-exits", disable=args.quiet)
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
    _, logits = early_exit.confidences(tokens[calib])
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

    heads = load_exit_heads(args.heads)
    model, data = options.model_and_data(args)
    early_exit = EarlyExit(model, heads, exits=args.exits)
    calib_fraction = float(heads.info.get("calib_fraction", 0.2))
    _, calib = cached.fit_calibration_split(
        len(data.train_images), calib_fraction, int(heads.info.get("seed", args.seed))
    )
    train_tokens = cached.layer_tokens(model, data.train_images, args, data.name, "train")
    test_tokens = cached.layer_tokens(model, data.test_images, args, data.name, "test")
    rows = evaluate_exits(early_exit, train_tokens[calib], test_tokens, data.test_labels, args.target_flops)
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
    import torch

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
