"""``tokenbudget train-compressor`` and ``vlm-compress-eval``: learned VLM token compressors
(resampler, autoencoder) against pooling and random selection.

Both read the frozen backbone's *cached* tokens (never re-embedding if the cache exists):
``--data fashion-mnist,scenes`` = ``dinov2_fashion_mnist_tokens("train", 100)`` and
``dinov2_scene_tokens(600, "train")``; or a file of your own backbone's tokens (``--token-file``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import methods, options

DEFAULT_OUT = "compressors/dinov2_small_{kind}"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-compressor`` and ``vlm-compress-eval``."""
    tc = options.add_command(
        sub,
        "train-compressor",
        cmd_train_compressor,
        "train a VLM token resampler or autoencoder on cached frozen-backbone tokens",
    )
    tc.add_argument("--kind", required=True, choices=["resampler", "autoencoder"], help="what to train")
    tc.add_argument(
        "--data",
        default="fashion-mnist,scenes",
        help="cached DINOv2-S tokens to train on: fashion-mnist (train, 1000), scenes (600 train), or both "
        "(default fashion-mnist,scenes)",
    )
    tc.add_argument("--token-file", default=None, help="instead of --data: a torch.save'd tensor [S, N, C]")
    _add_num_prefix(tc)
    tc.add_argument("--k-max", type=int, default=144, help="learned queries = largest budget (default 144)")
    tc.add_argument("--width", type=int, default=192, help="internal width (default 192)")
    tc.add_argument("--depth", type=int, default=2, help="encoder layers (default 2)")
    tc.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    tc.add_argument(
        "--decoder-depth", type=int, default=None, help="decoder layers (default 1 resampler, 2 autoencoder)"
    )
    options.add_training_options(tc, steps=400, batch_size=16, lr=1e-3, batch_help="token sets")
    tc.add_argument(
        "--budgets-per-step", type=int, default=2, help="k_max plus log-uniform draws (default 2)"
    )
    tc.add_argument(
        "--feature-weight",
        type=float,
        default=1.0,
        help="resampler: weight of the pooled-feature loss (default 1)",
    )
    options.add_seed(tc)
    options.add_trainer_output(tc, None, shown=DEFAULT_OUT.format(kind="KIND"))

    ev = options.add_command(
        sub,
        "vlm-compress-eval",
        cmd_vlm_compress_eval,
        "k-NN accuracy, fidelity and reconstruction of pooling, random selection, resampler, autoencoder",
    )
    options.add_tokens(ev, (16, 64, 144), "tokens each compressor leaves")
    methods.add_methods(ev, "avg,max,random", "; the baselines", names=("avg", "max", "random"))
    ev.add_argument("--resampler", default=None, help="trained resampler (STEM, .json or .safetensors)")
    ev.add_argument("--autoencoder", default=None, help="trained autoencoder (STEM, .json or .safetensors)")
    ev.add_argument(
        "--token-file",
        default=None,
        help="instead of the cached Fashion-MNIST tokens: a torch.save'd dict of train_tokens, train_labels, "
        "test_tokens, test_labels",
    )
    options.add_n_scenes(ev, 0, " for per-item k-NN too (0: none)")
    _add_num_prefix(ev)
    ev.add_argument("--knn", type=int, default=10, help="neighbours of the k-NN (default 10)")
    options.add_seed(ev, help="seed of random selection (default 0)")
    ev.add_argument("--csv", default=None, help="also write the rows as CSV")
    options.add_run_options(ev)


def _add_num_prefix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prefix", type=int, default=1, help="prefix tokens in front (default 1: class)")


def training_tokens(data: str):  # noqa: ANN201 - Tensor [S, 257, 384]
    """Cached DINOv2-S tokens [S, 257, 384] of the comma list ``data`` (fashion-mnist, scenes)."""
    import torch

    from ..data.token_cache import dinov2_fashion_mnist_tokens, dinov2_scene_tokens

    parts = []
    for name in options.name_list(data):
        if name == "fashion-mnist":
            parts.append(dinov2_fashion_mnist_tokens("train", 100)[0])
        elif name == "scenes":
            parts.append(dinov2_scene_tokens(600, "train")[1])
        else:
            raise ValueError(
                f"unknown training data {name!r}; use fashion-mnist, scenes or both (comma list)"
            )
    if not parts:
        raise ValueError("--data names no training set; use fashion-mnist,scenes")
    return torch.cat(parts)


def _load_token_file(path: str) -> dict:
    """A ``torch.save``d tensor [S, N, C] or a dict of tensors (weights only)."""
    import torch

    if not Path(path).exists():
        raise FileNotFoundError(f"no token file at {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    return loaded if isinstance(loaded, dict) else {"tokens": loaded}


def cmd_train_compressor(args: argparse.Namespace) -> int:
    """Train a resampler or an autoencoder on cached backbone tokens and save it."""
    from ..vlm.compressor_io import save_compressor
    from ..vlm.train import train_compressor

    max_seconds = options.max_seconds(args)
    if args.token_file:
        tokens = _load_token_file(args.token_file)["tokens"].float()
    else:
        tokens = training_tokens(args.data)
    source = args.token_file or args.data
    bar = options.progress(args.steps, f"train-compressor {args.kind}", args.quiet)
    model, report = train_compressor(
        args.kind,
        tokens,
        num_prefix=args.num_prefix,
        k_max=args.k_max,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        decoder_depth=args.decoder_depth,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        budgets_per_step=args.budgets_per_step,
        feature_weight=args.feature_weight,
        seed=args.seed,
        max_seconds=max_seconds,
        progress=options.step_progress(bar, keys=("loss", "feat", "rec")),
        info={"data": source, "n_train": len(tokens)},
    )
    bar.close()
    weights, config = save_compressor(model, args.out or DEFAULT_OUT.format(kind=args.kind))
    s = report.summary()
    print(
        f"trained {'an' if args.kind == 'autoencoder' else 'a'} {args.kind} (k_max {model.k_max}, width "
        f"{model.width}, depth {model.depth}) on {len(tokens)} token sets from {source} in {s['steps']} steps, "
        f"{s['seconds']} s: loss {s['loss_first']:.4f} -> {s['loss_last_mean']:.4f} (mean of the last fifth; "
        f"feature {s['feature_loss_last_mean']:.4f}, reconstruction {s['recon_loss_last_mean']:.4f})"
    )
    print(f"wrote {weights} and {config}; load with tb.vlm.load_compressor({str(config)!r})")
    return 0


_EVAL_KEYS = ("train_tokens", "train_labels", "test_tokens", "test_labels")


def _eval_data(args: argparse.Namespace) -> dict:
    """Train/test tokens and labels for the benchmark."""
    import torch

    if args.token_file:
        data = _load_token_file(args.token_file)
        missing = [k for k in _EVAL_KEYS if k not in data]
        if missing:
            raise ValueError(
                f"{args.token_file} lacks {', '.join(missing)} (a dict of tensors saved with torch.save)"
            )
        return {k: data[k] for k in _EVAL_KEYS}
    from ..data.token_cache import dinov2_fashion_mnist_tokens

    train_tokens, train_labels = dinov2_fashion_mnist_tokens("train", 100)
    test_tokens, test_labels = dinov2_fashion_mnist_tokens("test", 50)
    return dict(
        zip(
            _EVAL_KEYS,
            (train_tokens, torch.as_tensor(train_labels), test_tokens, torch.as_tensor(test_labels)),
            strict=True,
        )
    )


def _scene_data(n_scenes: int) -> dict:
    """The first ``n_scenes`` cached test scenes: tokens, patch owners, item labels, reference bank."""
    import torch

    from ..data.token_cache import dinov2_scene_tokens
    from ..evaluate.scene_metrics import item_reference_bank

    scenes, tokens = dinov2_scene_tokens(options.TEST_SCENES, "test")
    bank, bank_labels = item_reference_bank()
    return {
        "tokens": tokens[:n_scenes],
        "patch_owner": torch.from_numpy(scenes.patch_owner(14)).flatten(1)[:n_scenes],
        "labels": torch.from_numpy(scenes.labels)[:n_scenes],
        "bank": bank,
        "bank_labels": bank_labels,
    }


def cmd_vlm_compress_eval(args: argparse.Namespace) -> int:
    """k-NN accuracy, fidelity and reconstruction of pooling, random selection and trained compressors."""
    from ..evaluate.compressors import BASELINES, evaluate_compressors, format_rows
    from ..vlm.compressor_io import load_compressor

    unknown = [m for m in args.methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; use a comma list of {BASELINES}")
    options.check_n_scenes(args.n_scenes, minimum=0)
    compressors = {}
    if args.resampler:
        compressors["resampler"] = load_compressor(args.resampler, kind="resampler")
    if args.autoencoder:
        compressors["autoencoder"] = load_compressor(args.autoencoder, kind="autoencoder")
    data = _eval_data(args)
    scenes = _scene_data(args.n_scenes) if args.n_scenes else None
    bar = options.progress(len(args.methods) + len(compressors), "vlm-compress-eval", args.quiet)
    start = time.perf_counter()
    rows = evaluate_compressors(
        data["train_tokens"],
        data["train_labels"],
        data["test_tokens"],
        data["test_labels"],
        args.tokens,
        methods=args.methods,
        compressors=compressors,
        num_prefix=args.num_prefix,
        knn_k=args.knn,
        seed=args.seed,
        scenes=scenes,
        progress=lambda _: bar.update(1),
    )
    bar.close()
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        print(
            f"{len(data['test_tokens'])} test vs {len(data['train_tokens'])} train token sets, "
            f"{args.knn}-NN cosine; {seconds:.0f} s"
        )
        print(format_rows(rows))
    if args.csv:
        _write_csv(rows, args.csv)
    return 0


def _write_csv(rows: list, path: str) -> None:
    import csv

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].as_dict()))
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
