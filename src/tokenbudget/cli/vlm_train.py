"""``tokenbudget train-vlm`` and ``make-vqa``: the small LLaVA trained here on the shapes VQA set
(:mod:`tokenbudget.vlm.tiny_llava`), for measuring VLM token cuts on answers offline."""

from __future__ import annotations

import argparse

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-vlm`` and ``make-vqa``."""
    tv = options.add_command(
        sub,
        "train-vlm",
        cmd_train_vlm,
        "train the small LLaVA (frozen DINOv2-S tower, MLP projector, small Llama) on the shapes VQA set, "
        "save it, reload it and score the test split per question kind",
    )
    options.add_out(
        tv, None, "the model folder (its data goes to DIR/data)", shown="<cache>/vlm/tiny-llava-dinov2"
    )
    tv.add_argument(
        "--n-train",
        type=int,
        default=27000,
        help="train questions, 18 per scene (default 27000: 1500 scenes)",
    )
    tv.add_argument(
        "--n-test", type=int, default=900, help="test questions, three per scene (default 900: 300 scenes)"
    )
    tv.add_argument("--epochs", type=float, default=2.0, help="passes over the train scenes (default 2)")
    group = tv.add_argument_group("model and optimizer")
    group.add_argument("--hidden-size", type=int, default=128, help="Llama width (default 128)")
    group.add_argument("--layers", type=int, default=4, help="Llama decoder layers (default 4)")
    group.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    group.add_argument(
        "--batch-size", type=int, default=8, help="scenes per step, all their questions (default 8)"
    )
    group.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 0.002)")
    group.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    group.add_argument(
        "--init",
        default=None,
        help="continue training this saved model folder (fresh schedule) instead of a new one",
    )
    options.add_seed(tv)
    options.add_run_options(tv, threads=None, json="print the results as JSON")

    mv = options.add_command(
        sub,
        "make-vqa",
        cmd_make_vqa,
        "write the shapes VQA set: PNG images plus train.jsonl / test.jsonl (image, question, answer, kind)",
    )
    mv.add_argument("--out", required=True, help="the folder to write")
    mv.add_argument(
        "--n-train",
        type=int,
        default=27000,
        help="train questions, 18 per scene (default 27000: 1500 scenes)",
    )
    mv.add_argument(
        "--n-test", type=int, default=900, help="test questions, three per scene (default 900: 300 scenes)"
    )
    mv.add_argument("--size", type=int, default=224, help="image side in px (default 224)")
    options.add_seed(mv)


def cmd_train_vlm(args: argparse.Namespace) -> int:
    """Train, save, reload and score the small LLaVA; print per-kind accuracy vs majority rate."""
    import json

    from ..vlm.tiny_llava import vlm_dir
    from ..vlm.tiny_llava_train import format_accuracy, train_vqa_llava

    for name in ("n_train", "n_test", "hidden_size", "layers", "heads", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.epochs <= 0 or args.lr <= 0:
        raise ValueError(f"--epochs and --lr must be > 0, got {args.epochs} and {args.lr}")
    out = args.out or vlm_dir()
    results = train_vqa_llava(
        out,
        n_train=args.n_train,
        n_test=args.n_test,
        epochs=args.epochs,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
        batch_size=args.batch_size,
        lr=args.lr,
        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
        init=args.init,
        bars=lambda total, desc: options.progress(total, desc, disable=args.quiet),
    )
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    train = results["train"]
    print(
        f"trained {train['steps']} steps in {train['seconds']} s (loss {train['loss_first']} -> "
        f"{train['loss_last_mean']}); saved to {out}"
    )
    print(f"test answers, greedy generate through the reloaded folder ({results['answer_seconds']} s):")
    print(format_accuracy(results["accuracy"]))
    return 0


def cmd_make_vqa(args: argparse.Namespace) -> int:
    """Write the shapes VQA set to ``--out``."""
    from ..data.vqa import majority_rates, read_vqa, write_vqa

    paths = write_vqa(args.out, args.n_train, args.n_test, size=args.size, seed=args.seed)
    for path in paths.values():
        rates = majority_rates(read_vqa(path))
        shown = ", ".join(f"{kind} {answer!r} {rate:.2f}" for kind, (answer, rate) in rates.items())
        print(f"wrote {path} (majority answer per kind: {shown})")
    return 0
