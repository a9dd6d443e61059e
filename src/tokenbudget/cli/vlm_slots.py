"""``tokenbudget train-slots`` and ``vlm-slots-eval``: object slots, per-slot budgets and saccades
(:mod:`tokenbudget.vlm`) on the cached DINOv2 tokens of the multi-object scenes."""

from __future__ import annotations

import argparse
import json

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-slots`` and ``vlm-slots-eval``."""
    ts = options.add_command(
        sub,
        "train-slots",
        cmd_train_slots,
        "train Slot Attention on the cached DINOv2 tokens of the train scenes (reconstruction)",
    )
    ts.add_argument(
        "--num-slots", type=int, default=6, help="slots while training (free at inference; default 6)"
    )
    options.add_training_options(ts, steps=400, batch_size=16, lr=4e-4, batch_help="scenes")
    options.add_n_images(ts, "train", "train on the first N of the 600 train scenes (default: all)")
    options.add_seed(ts)
    options.add_trainer_output(ts, "slots/dinov2_small_slot_attention", threads=1)

    vs = options.add_command(
        sub,
        "vlm-slots-eval",
        cmd_vlm_slots_eval,
        "object slots, per-slot budgets and saccades on the cached multi-object test scenes",
    )
    options.add_n_scenes(vs, 300)
    options.add_tokens(vs, (16, 32, 64), "total token budgets of a scene")
    vs.add_argument(
        "--saccade-tokens",
        type=options.int_list,
        default=[12, 16, 24, 32],
        help="total token budgets of the saccade runs; comma list (default 12,16,24,32)",
    )
    vs.add_argument(
        "--threshold",
        type=_threshold,
        default=0.8,
        help="saccade confidence threshold in [0, 1] (default 0.8), or 'none' to never stop early",
    )
    vs.add_argument("--slot-attention", default=None, help="also score a trained Slot Attention (STEM)")
    vs.add_argument(
        "--projection",
        default=None,
        help="query saccades by class-name text through this text projection (train-text-projection) "
        "instead of an exemplar",
    )
    options.add_prompt(vs, " with --projection")
    options.add_seed(vs)
    options.add_out(vs, None, "write the results JSON here (default: print it)")
    options.add_run_options(vs, threads=1, quiet="no progress lines", json=None)


def _threshold(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"the threshold is a confidence in [0, 1] (or 'none'), got {value}")
    return value


def cmd_train_slots(args: argparse.Namespace) -> int:
    """Train Slot Attention on the cached DINOv2 tokens of the train scenes and save it."""
    from ..data.token_cache import dinov2_scene_tokens
    from ..vlm.slot_attention import save_slot_attention, train_slot_attention

    max_seconds = options.max_seconds(args)
    if args.n_train is not None and not 1 <= args.n_train <= 600:
        raise ValueError(f"--n-train must be in [1, 600] (the train scenes), got {args.n_train}")
    # Only the scenes used are embedded (or sliced from the cached 600).
    embed_bar = options.progress(args.n_train or 600, "embedding train scenes", disable=args.quiet)
    _, tokens = dinov2_scene_tokens(600, "train", first=args.n_train, progress=embed_bar.update)
    embed_bar.close()
    bar = options.progress(args.steps, "train-slots", disable=args.quiet)
    model, report = train_slot_attention(
        tokens,
        num_prefix=1,
        num_slots=args.num_slots,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_seconds=max_seconds,
        progress=options.step_progress(bar),
        info={"data": "dinov2_scene_tokens(600, 'train')", "n_train": len(tokens)},
    )
    bar.close()
    weights, config = save_slot_attention(model, args.out)
    summary = report.summary()
    print(
        f"trained Slot Attention ({args.num_slots} slots) on {len(tokens)} scenes in {summary['steps']} steps, "
        f"{summary['seconds']} s: loss {summary['loss_first']:.4f} -> {summary['loss_last_mean']:.4f} "
        "(mean of the last fifth)"
    )
    print(
        f"wrote {weights} and {config}; use tb.vlm.learned_slots(tb.vlm.load_slot_attention({str(config)!r}), tokens)"
    )
    return 0


def cmd_vlm_slots_eval(args: argparse.Namespace) -> int:
    """Slots, per-slot budgets and saccades on the cached test scenes; JSON to --out."""
    from pathlib import Path

    from ..evaluate.slot_benchmark import run_slot_benchmark

    learned = None
    if args.slot_attention:
        from ..vlm.slot_attention import load_slot_attention

        learned = load_slot_attention(args.slot_attention)
    class_queries = None
    if args.projection:
        from ..data.fashion_mnist import FASHION_MNIST_CLASSES
        from ..vlm.text import ProjectedTextQuery

        text = ProjectedTextQuery.load(args.projection)
        class_queries = text.encode([args.prompt.format(name.lower()) for name in FASHION_MNIST_CLASSES])
    results = run_slot_benchmark(
        num_scenes=options.check_n_scenes(args.n_scenes),
        totals=args.tokens,
        saccade_totals=args.saccade_tokens,
        saccade_threshold=args.threshold,
        learned=learned,
        seed=args.seed,
        class_queries=class_queries,
        log=(lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True)),
    )
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {path}")
    else:
        print(json.dumps(results, indent=2))
    return 0
