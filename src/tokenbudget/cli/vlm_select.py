"""``tokenbudget train-text-projection`` and ``vlm-select-eval``: query-aware token selection for VLMs
(:mod:`tokenbudget.vlm.select`) on the cached multi-object scenes."""

from __future__ import annotations

import argparse

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-text-projection`` and ``vlm-select-eval``."""
    ttp = options.add_command(
        sub,
        "train-text-projection",
        cmd_train_text_projection,
        "train the MiniLM -> DINOv2-S projection for text queries (tb.vlm.select) on Fashion-MNIST",
    )
    ttp.add_argument(
        "--data",
        default="scenes",
        choices=("scenes", "images"),
        help="labelled tokens: patch tokens of the 600 train scenes (default) or 1000 single train images",
    )
    options.add_training_options(ttp, steps=300, batch_size=4096, lr=3e-3, batch_help="labelled tokens")
    ttp.add_argument(
        "--temperature", type=float, default=0.05, help="cosine logit temperature (default 0.05)"
    )
    options.add_seed(ttp)
    options.add_trainer_output(ttp, "projections/dinov2_small_minilm")

    vse = options.add_command(
        sub,
        "vlm-select-eval",
        cmd_vlm_select_eval,
        "query-aware selection (text, exemplar) vs random and class attention on multi-object scenes",
    )
    options.add_tokens(vse, (8, 16, 32, 64))
    options.add_n_scenes(vse, 300)
    vse.add_argument(
        "--projection", default=None, help="text projection STEM (default: train one here, about a minute)"
    )
    vse.add_argument("--projection-steps", type=int, default=300, help=argparse.SUPPRESS)
    options.add_prompt(vse)
    vse.add_argument(
        "--diversity", type=float, default=0.3, help="MMR weight of the text+mmr rows (0: none; default 0.3)"
    )
    options.add_seed(vse)
    options.add_out(vse, None, "also write the table to this file")
    options.add_run_options(vse, json=None)


def cmd_train_text_projection(args: argparse.Namespace) -> int:
    """Train the MiniLM -> DINOv2-S text projection on cached Fashion-MNIST tokens and save it."""
    from ..vlm.text import save_text_projection
    from ..vlm.text_train import train_fashion_mnist_projection

    max_seconds = options.max_seconds(args)
    bar = options.progress(args.steps, "train-text-projection", disable=args.quiet)
    projection, report = train_fashion_mnist_projection(
        args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        seed=args.seed,
        max_seconds=max_seconds,
        progress=options.step_progress(bar),
    )
    bar.close()
    weights, config = save_text_projection(projection, args.out)
    summary = report.summary()
    print(
        f"trained a {projection.text_dim} -> {projection.token_dim} text projection on {args.data} in "
        f"{summary['steps']} steps, {summary['seconds']} s: loss {summary['loss_first']:.4f} -> "
        f"{summary['loss_last_mean']:.4f} (mean of the last fifth), token accuracy {summary['token_accuracy']}"
    )
    print(f"wrote {weights} and {config}; use tb.vlm.ProjectedTextQuery.load({str(config)!r})")
    return 0


def cmd_vlm_select_eval(args: argparse.Namespace) -> int:
    """Query-aware selection on the multi-object scenes: on-item share and per-item k-NN per method and budget."""
    from pathlib import Path

    from ..data.fashion_mnist import FASHION_MNIST_CLASSES
    from ..evaluate.select_scenes import (
        chance_share,
        format_rows,
        load_selection_data,
        run_selection_benchmark,
    )
    from ..vlm.text import MiniLMTextEncoder, ProjectedTextQuery, load_text_projection
    from ..vlm.text_train import train_fashion_mnist_projection

    if any(k < 1 for k in args.tokens):
        raise ValueError(f"--tokens must be positive token counts, got {args.tokens}")
    # The first run embeds the 300 test scenes, their class attention and the exemplars (minutes);
    # later runs read the caches.
    embed_bar = options.progress(300 * 2 + 100, "embedding scenes (first run only)", disable=args.quiet)
    data = load_selection_data(options.check_n_scenes(args.n_scenes), progress=embed_bar.update)
    embed_bar.close()
    encoder = MiniLMTextEncoder()  # one load for training (when needed) and the queries
    if args.projection:
        projection = load_text_projection(args.projection)
        note = f"text projection {args.projection}"
    else:
        projection, report = train_fashion_mnist_projection(
            "scenes", text_encoder=encoder, steps=args.projection_steps, seed=args.seed
        )
        note = (
            f"text projection trained here on the train scenes ({report.steps} steps, {report.seconds:.0f} s)"
        )
    query = ProjectedTextQuery(projection, encoder)
    text_queries = query.encode(
        [args.prompt.format(name.lower()) for name in FASHION_MNIST_CLASSES]
    )  # [10, C]
    methods = 4 + (args.diversity > 0)  # text, [text+mmr], exemplar, random, cls-attention
    bar = options.progress(methods * len(args.tokens), "vlm-select-eval", disable=args.quiet)
    rows = run_selection_benchmark(
        data,
        args.tokens,
        text_queries=text_queries,
        diversity=args.diversity,
        seed=args.seed,
        progress=bar.update,
    )
    bar.close()
    table = format_rows(rows)
    header = (
        f"query-aware selection on {len(data.tokens)} DINOv2-S test scenes x 4 items (256 patch tokens each); "
        f"{note}; text prompt {args.prompt!r}; chance on-item share {chance_share(data):.3f}"
    )
    print(header)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(header + "\n" + table + "\n")
        print(f"wrote {out}")
    return 0
