"""CLI commands of the VLM modules: ``train-compressor``, ``vlm-compress-eval`` (learned compressors),
``train-slots`` and ``vlm-slots-eval`` (object slots, per-slot budgets, saccades).

Both read the frozen backbone's *cached* tokens (never re-embedding if the cache exists):
``--data fashion-mnist,scenes`` = ``dinov2_fashion_mnist_tokens("train", 100)`` and
``dinov2_scene_tokens(600, "train")``; or a file of your own backbone's tokens (``--tokens``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .commands import _int_list, _progress, _set_threads, _step_progress

DEFAULT_OUT = "compressors/dinov2_small_{kind}"


def training_tokens(data: str) -> torch.Tensor:
    """Cached DINOv2-S tokens [S, 257, 384] of the comma list ``data`` (fashion-mnist, scenes)."""
    from ..data.token_cache import dinov2_fashion_mnist_tokens, dinov2_scene_tokens

    parts = []
    for name in (v.strip() for v in data.split(",") if v.strip()):
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
    if not Path(path).exists():
        raise FileNotFoundError(f"no token file at {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    return loaded if isinstance(loaded, dict) else {"tokens": loaded}


def cmd_train_compressor(args: argparse.Namespace) -> int:
    """Train a resampler or an autoencoder on cached backbone tokens and save it."""
    from ..vlm.compressor_io import save_compressor
    from ..vlm.train import train_compressor

    _set_threads(args.threads)
    if args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    tokens = _load_token_file(args.tokens)["tokens"].float() if args.tokens else training_tokens(args.data)
    source = args.tokens or args.data
    bar = _progress(args.steps, f"train-compressor {args.kind}", args.quiet)
    progress = _step_progress(bar, keys=("loss", "feat", "rec"))

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
        max_seconds=60 * args.max_minutes,
        progress=progress,
        info={"data": source, "n_train": len(tokens)},
    )
    bar.close()
    out = args.out or DEFAULT_OUT.format(kind=args.kind)
    weights, config = save_compressor(model, out)
    s = report.summary()
    print(
        f"trained {'an' if args.kind == 'autoencoder' else 'a'} {args.kind} (k_max {model.k_max}, width {model.width}, depth {model.depth}) on {len(tokens)} "
        f"token sets from {source} in {s['steps']} steps, {s['seconds']} s: loss {s['loss_first']:.4f} -> "
        f"{s['loss_last_mean']:.4f} (mean of the last fifth; feature {s['feature_loss_last_mean']:.4f}, "
        f"reconstruction {s['recon_loss_last_mean']:.4f})"
    )
    print(f"wrote {weights} and {config}; load with tb.vlm.load_compressor({str(config)!r})")
    return 0


def _eval_data(args: argparse.Namespace) -> dict:
    """Train/test tokens and labels (and scenes) for the benchmark."""
    if args.tokens:
        data = _load_token_file(args.tokens)
        missing = [k for k in ("train_tokens", "train_labels", "test_tokens", "test_labels") if k not in data]
        if missing:
            raise ValueError(
                f"{args.tokens} lacks {', '.join(missing)} (a dict of tensors saved with torch.save)"
            )
        return {k: data[k] for k in ("train_tokens", "train_labels", "test_tokens", "test_labels")}
    from ..data.token_cache import dinov2_fashion_mnist_tokens

    train_tokens, train_labels = dinov2_fashion_mnist_tokens("train", 100)
    test_tokens, test_labels = dinov2_fashion_mnist_tokens("test", 50)
    return {
        "train_tokens": train_tokens,
        "train_labels": torch.as_tensor(train_labels),
        "test_tokens": test_tokens,
        "test_labels": torch.as_tensor(test_labels),
    }


def _scene_data() -> dict:
    from ..data.token_cache import dinov2_scene_tokens
    from ..evaluate.scene_metrics import item_reference_bank

    scenes, tokens = dinov2_scene_tokens(300, "test")
    bank, bank_labels = item_reference_bank()
    return {
        "tokens": tokens,
        "patch_owner": torch.from_numpy(scenes.patch_owner(14)).flatten(1),
        "labels": torch.from_numpy(scenes.labels),
        "bank": bank,
        "bank_labels": bank_labels,
    }


def cmd_vlm_compress_eval(args: argparse.Namespace) -> int:
    """k-NN accuracy, fidelity and reconstruction of pooling, random selection and trained compressors."""
    from ..evaluate.compressors import BASELINES, evaluate_compressors, format_rows
    from ..vlm.compressor_io import load_compressor

    _set_threads(args.threads)
    methods = [m for m in (v.strip() for v in args.methods.split(",")) if m]
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; use a comma list of {BASELINES}")
    compressors = {}
    if args.resampler:
        compressors["resampler"] = load_compressor(args.resampler, kind="resampler")
    if args.autoencoder:
        compressors["autoencoder"] = load_compressor(args.autoencoder, kind="autoencoder")
    data = _eval_data(args)
    scenes = _scene_data() if args.scenes else None
    total = len(methods) + len(compressors)
    bar = _progress(total, "vlm-compress-eval", args.quiet)
    start = time.perf_counter()
    rows = evaluate_compressors(
        data["train_tokens"],
        data["train_labels"],
        data["test_tokens"],
        data["test_labels"],
        args.k,
        methods=methods,
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
        import csv

        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].as_dict()))
            writer.writeheader()
            writer.writerows(r.as_dict() for r in rows)
    return 0


def add_compress_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train-compressor`` and ``vlm-compress-eval`` on the main parser's subcommands."""
    tc = sub.add_parser(
        "train-compressor",
        help="train a VLM token resampler or autoencoder on cached frozen-backbone tokens",
    )
    tc.add_argument("--kind", required=True, choices=["resampler", "autoencoder"])
    tc.add_argument(
        "--data",
        default="fashion-mnist,scenes",
        help="cached DINOv2-S tokens to train on: fashion-mnist (train, 1000), scenes (600 train), or both",
    )
    tc.add_argument("--tokens", default=None, help="instead of --data: a torch.save'd tensor [S, N, C]")
    tc.add_argument("--num-prefix", type=int, default=1, help="prefix tokens in front (default 1: class)")
    tc.add_argument("--k-max", type=int, default=144, help="learned queries = largest budget (default 144)")
    tc.add_argument("--width", type=int, default=192, help="internal width (default 192)")
    tc.add_argument("--depth", type=int, default=2, help="encoder layers (default 2)")
    tc.add_argument("--heads", type=int, default=4)
    tc.add_argument(
        "--decoder-depth", type=int, default=None, help="decoder layers (default 1 resampler, 2 autoencoder)"
    )
    tc.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    tc.add_argument("--batch-size", type=int, default=16)
    tc.add_argument("--lr", type=float, default=1e-3)
    tc.add_argument(
        "--budgets-per-step", type=int, default=2, help="k_max plus log-uniform draws (default 2)"
    )
    tc.add_argument(
        "--feature-weight",
        type=float,
        default=1.0,
        help="resampler: weight of the pooled-feature loss (default 1)",
    )
    tc.add_argument("--max-minutes", type=float, default=30.0, help="stop after this long (default 30)")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    tc.add_argument("--out", default=None, help="output stem (default compressors/dinov2_small_KIND)")
    tc.add_argument("--quiet", action="store_true", help="no progress bar")
    tc.set_defaults(func=cmd_train_compressor)

    ev = sub.add_parser(
        "vlm-compress-eval",
        help="k-NN accuracy, fidelity and reconstruction of pooling, random selection, resampler, autoencoder",
    )
    ev.add_argument("--k", type=_int_list, default=[16, 64, 144], help="budgets (default 16,64,144)")
    ev.add_argument("--methods", default="avg,max,random", help="baselines, comma list of avg,max,random")
    ev.add_argument("--resampler", default=None, help="trained resampler (STEM, .json or .safetensors)")
    ev.add_argument("--autoencoder", default=None, help="trained autoencoder")
    ev.add_argument(
        "--tokens",
        default=None,
        help="instead of the cached Fashion-MNIST tokens: a torch.save'd dict of train_tokens, train_labels, "
        "test_tokens, test_labels",
    )
    ev.add_argument(
        "--scenes", action="store_true", help="also score per-item k-NN on 300 cached test scenes"
    )
    ev.add_argument("--num-prefix", type=int, default=1)
    ev.add_argument("--knn", type=int, default=10, help="neighbours of the k-NN (default 10)")
    ev.add_argument("--seed", type=int, default=0, help="seed of random selection")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--csv", default=None, help="also write the rows as CSV")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_vlm_compress_eval)


def cmd_train_slots(args: argparse.Namespace) -> int:
    """Train Slot Attention on the cached DINOv2 tokens of the train scenes and save it."""
    from ..data.token_cache import dinov2_scene_tokens
    from ..vlm.slot_attention import save_slot_attention, train_slot_attention

    _set_threads(args.threads)
    if args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    _, tokens = dinov2_scene_tokens(600, "train")
    if args.n_train is not None:
        if not 1 <= args.n_train <= len(tokens):
            raise ValueError(f"--n-train must be in [1, {len(tokens)}], got {args.n_train}")
        tokens = tokens[: args.n_train]
    bar = _progress(args.steps, "train-slots", disable=args.quiet)
    progress = _step_progress(bar)

    model, report = train_slot_attention(
        tokens,
        num_prefix=1,
        num_slots=args.num_slots,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_seconds=60 * args.max_minutes,
        progress=progress,
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
    import json
    from pathlib import Path

    from ..evaluate.slot_benchmark import run_slot_benchmark

    _set_threads(args.threads)
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
        num_scenes=args.num_scenes,
        totals=args.totals,
        saccade_totals=args.saccade_totals,
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


def add_slot_commands(sub: argparse._SubParsersAction) -> None:
    """train-slots and vlm-slots-eval."""
    ts = sub.add_parser(
        "train-slots",
        help="train Slot Attention on the cached DINOv2 tokens of the train scenes (reconstruction)",
    )
    ts.add_argument("--num-slots", type=int, default=6, help="slots while training (free at inference)")
    ts.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    ts.add_argument("--batch-size", type=int, default=16)
    ts.add_argument("--lr", type=float, default=4e-4)
    ts.add_argument("--n-train", type=int, default=None, help="use only the first N train scenes")
    ts.add_argument("--max-minutes", type=float, default=30.0, help="stop after this long (default 30)")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: fastest on a shared VM)"
    )
    ts.add_argument(
        "--out",
        default="slots/dinov2_small_slot_attention",
        help="output stem: STEM.safetensors and STEM.json",
    )
    ts.add_argument("--quiet", action="store_true", help="no progress bar")
    ts.set_defaults(func=cmd_train_slots)

    vs = sub.add_parser(
        "vlm-slots-eval",
        help="object slots, per-slot budgets and saccades on the cached multi-object test scenes",
    )
    vs.add_argument("--num-scenes", type=int, default=300, help="first N of the 300 cached test scenes")
    vs.add_argument("--totals", type=_int_list, default=[16, 32, 64], help="total budgets (default 16,32,64)")
    vs.add_argument(
        "--saccade-totals",
        type=_int_list,
        default=[12, 16, 24, 32],
        help="saccade budgets (default 12,16,24,32)",
    )
    vs.add_argument("--threshold", type=float, default=0.8, help="saccade confidence threshold (default 0.8)")
    vs.add_argument("--slot-attention", default=None, help="also score a trained Slot Attention (STEM)")
    vs.add_argument(
        "--projection",
        default=None,
        help="query saccades by class-name text through this text projection (train-text-projection) "
        "instead of an exemplar",
    )
    vs.add_argument("--prompt", default="a photo of a {}", help="text query template with --projection")
    vs.add_argument("--seed", type=int, default=0)
    vs.add_argument("--threads", type=int, default=1)
    vs.add_argument("--out", default=None, help="write the results JSON here (default: print it)")
    vs.add_argument("--quiet", action="store_true")
    vs.set_defaults(func=cmd_vlm_slots_eval)
