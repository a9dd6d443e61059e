"""The ``tokenbudget`` command: bench, visualize, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence

import torch

from ..config import BudgetConfig, ReductionConfig, config_class, config_from_json, method_names
from ..patch import apply, remove


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_budget_args(parser: argparse.ArgumentParser, default_r: str | None) -> None:
    group = parser.add_argument_group("method and budget; give one of --r, --keep, --tokens, --config")
    group.add_argument(
        "--method",
        default=["tome"],
        type=_method_list,
        help=f"one of {', '.join(method_names())}, or a comma list (bench: timed interleaved against "
        "one unpatched baseline). prune/dynamicvit: --keep is per stage; dynamicvit needs --predictor",
    )
    group.add_argument(
        "--r",
        type=_int_list,
        default=None,
        help=f"tokens merged per block; comma list for several configs (default: {default_r})",
    )
    group.add_argument(
        "--inflection",
        type=float,
        default=None,
        help="ToMe schedule inflection in [-1, 1] with --r (-1: decreasing)",
    )
    group.add_argument(
        "--keep",
        type=_float_list,
        default=None,
        help="fraction of tokens left after the last block; comma list",
    )
    group.add_argument(
        "--tokens", type=_int_list, default=None, help="tokens left after the last block; comma list"
    )
    group.add_argument("--config", default=None, help='a JSON config, e.g. \'{"method": "tome", "r": 16}\'')
    group.add_argument("--no-prop-attn", action="store_true", help="turn off proportional attention")
    _add_entropy_floor_arg(group)
    _add_stage_args(group)
    parser.set_defaults(default_r=default_r)


def _add_entropy_floor_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--entropy-floor",
        type=float,
        default=None,
        help="entropy guard for the methods that take it (tome, tome-detail, tome-optimal, tofu, pool): "
        "merge less where token entropy would fall below this fraction of its maximum (tome-guard: 0.2734)",
    )


def _guard_options(cls: type, args: argparse.Namespace) -> dict:
    """``entropy_floor`` for configs that take it, from --entropy-floor."""
    floor = getattr(args, "entropy_floor", None)
    if floor is None or "entropy_floor" not in {f.name for f in dataclasses.fields(cls)}:
        return {}
    return {"entropy_floor": floor}


def _add_stage_args(group: argparse._ArgumentGroup) -> None:
    """Options of the pruning methods (prune, dynamicvit), whose --keep is a per-stage ratio."""
    group.add_argument(
        "--layers",
        type=_int_list,
        default=None,
        help="prune/dynamicvit: 0-based blocks that prune (default 3,6,9)",
    )
    group.add_argument(
        "--predictor", default=None, help="dynamicvit: trained predictors (tokenbudget train-predictor)"
    )


def _scheduled_methods() -> list[str]:
    return [m for m in method_names() if issubclass(config_class(m), BudgetConfig)]


def _stage_options(cls: type, args: argparse.Namespace) -> dict:
    """Keyword options for a pruning config (per-stage keep) from --layers / --predictor."""
    names = {f.name for f in dataclasses.fields(cls)}
    options = {}
    if getattr(args, "layers", None) is not None and "layers" in names:
        options["layers"] = tuple(args.layers)
    if getattr(args, "predictor", None) is not None and "predictor" in names:
        options["predictor"] = args.predictor
    return options


def _configs(args: argparse.Namespace) -> list[ReductionConfig]:
    """Every (method, budget) config the command line names, methods outermost."""
    given = [name for name in ("r", "keep", "tokens", "config") if getattr(args, name) is not None]
    if len(given) > 1:
        raise ValueError(f"give one budget option, not {', '.join('--' + g for g in given)}")
    if args.config is not None:
        return [config_from_json(args.config)]
    return [config for method in args.method for config in _method_configs(method, args)]


def _method_configs(method: str, args: argparse.Namespace) -> list[ReductionConfig]:
    cls = config_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    extra = {"prop_attn": not args.no_prop_attn} if "prop_attn" in names else {}
    extra |= _guard_options(cls, args)
    if "r" not in names:  # pruning methods: --keep is the per-stage keep ratio
        extra |= _stage_options(cls, args)
        if args.r is not None or args.tokens is not None:
            raise ValueError(
                f"method {method} takes --keep (fraction kept at each pruning layer), not --r/--tokens"
            )
        return [cls(keep=k, **extra) for k in args.keep] if args.keep is not None else [cls(**extra)]
    if args.keep is not None:
        return [cls(keep=k, **extra) for k in args.keep]
    if args.tokens is not None:
        return [cls(tokens=t, **extra) for t in args.tokens]
    rs = args.r if args.r is not None else _int_list(args.default_r)
    if args.inflection is not None:
        return [cls(r=(r, args.inflection), **extra) for r in rs]
    return [cls(r=r, **extra) for r in rs]


def _method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for method in methods:
        if method not in method_names():
            raise argparse.ArgumentTypeError(
                f"unknown method {method!r}; choose from {', '.join(method_names())}"
            )
    if not methods:
        raise argparse.ArgumentTypeError("give at least one method")
    return methods


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import bench, format_table
    from ..models import load_model

    _set_threads(args.threads)
    configs = _configs(args)
    model = load_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
    batch_sizes = args.batch_size
    total = len(batch_sizes) * args.samples
    bar = _progress(total, "bench", disable=args.json or args.quiet)
    rows = bench(
        model,
        configs,
        model_name=args.model,
        batch_sizes=batch_sizes,
        device=args.device,
        dtype=args.dtype,
        samples=args.samples,
        warmup=args.warmup,
        measure_memory=not args.no_memory,
        ceiling=not args.no_ceiling,
        progress=bar.update,
        compile=args.compile,
    )
    bar.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        weights = (
            "embedded DINOv2 weights"
            if args.model == "dinov2_small"
            else ("pretrained" if args.pretrained else "random weights")
        )
        print(
            f"{args.model} ({weights}), device {args.device}, {args.dtype}, {torch.get_num_threads()} threads"
        )
        print(format_table(rows))
        if args.compile:
            print(_compile_note(rows))
        print(
            "speedup: measured images/s over the unpatched model (IQR: quartiles of paired per-sample ratios); ideal: FLOPs-ideal speedup; eff = speedup/ideal;"
        )
        print(
            "ceiling: speedup of the same token counts with free reduction; c-eff = speedup/ceiling; MB: peak forward memory"
        )
    return 0


def _compile_note(rows: list) -> str:
    """One line per batch size: how long the first (compiling) call of each model took."""
    lines = []
    for row in rows:
        lines.append(
            f"compiled (torch.compile, inductor), batch {row.batch_size}: first call {row.baseline_compile_s:.1f} s "
            f"unpatched, {row.patched_compile_s:.1f} s patched (compile + one run)"
        )
    return "\n".join(lines)


def cmd_visualize(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..data import load_image
    from ..models import load_model
    from ..viz import render_merges

    configs = _configs(args)
    if len(configs) != 1:
        raise ValueError("visualize takes one budget")
    model = load_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
    picture, summary = render_merges(model, load_image(args.image), configs[0])
    Image.fromarray(picture).save(args.output)
    print(f"wrote {args.output}: {summary['input_tokens']} -> {summary['tokens_per_layer'][-1]} tokens")
    return 0


def _image_side(model) -> int:  # noqa: ANN001
    from ..adapters import find_adapter

    size = find_adapter(model).image_size
    if size is None:
        raise ValueError("the model has no default input size; give --img-size")
    return size[0]


def _model_and_data(args: argparse.Namespace):  # noqa: ANN202 - (nn.Module, EvalData)
    """The model named on the command line and the eval data, preprocessed for it."""
    from ..data.eval_sets import load_eval_data
    from ..data.images import model_normalization
    from ..models import load_model

    model = load_model(args.model, pretrained=args.pretrained, img_size=args.img_size)
    data = load_eval_data(
        args.data,
        _image_side(model),
        *model_normalization(model),
        n_train=args.n_train,
        n_test=args.n_test,
        test_fraction=getattr(args, "test_fraction", 0.2),
        seed=args.seed,
    )
    return model, data


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate, format_eval_table, pareto_plot
    from ..evaluate.budgets import method_config
    from ..evaluate.distributed import is_main
    from ..evaluate.tables import rows_to_csv

    _set_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    options = {
        m: _stage_options(config_class(m), args) | _guard_options(config_class(m), args) for m in methods
    }
    if args.flops_speedup is not None and args.keep is not None:
        raise ValueError("give --keep or --flops-speedup, not both")
    if args.keep is None:
        args.keep = [1.0, 0.5, 0.25]
    for m in methods:  # fail on a bad method or budget before any model or data is loaded
        if args.flops_speedup is not None and not issubclass(config_class(m), BudgetConfig):
            raise ValueError(
                f"--flops-speedup needs methods with a per-layer schedule ({', '.join(_scheduled_methods())}); "
                f"{m!r} keeps a fraction per stage: give it --keep"
            )
        for keep in args.keep if args.flops_speedup is None else [0.5]:
            method_config(m, keep, options[m])
    model, data = _model_and_data(args)
    if args.flops_speedup is not None:
        from ..evaluate.budgets import keep_for_flops_speedup

        args.keep = [1.0] + [keep_for_flops_speedup(model, s) for s in args.flops_speedup]
    for m in methods:  # apply validates against this model (layers, predictor, class token): fail now,
        for keep in args.keep:  # not after minutes of full-token feature extraction
            if keep < 1.0:
                remove(apply(model, method_config(m, keep, options[m])))
    size = _image_side(model)
    batches = -(-len(data.train_images) // args.batch_size) + -(-len(data.test_images) // args.batch_size)
    conditions = sum(1 for keep in args.keep if keep < 1.0) * len(methods)
    # Under torchrun only rank 0 shows progress and writes results (every rank computes the same rows).
    bar = _progress(
        batches + conditions * -(-len(data.test_images) // args.batch_size),
        "eval",
        disable=args.json or os.environ.get("RANK", "0") != "0",
    )
    rows = evaluate(
        model,
        data,
        methods,
        args.keep,
        batch_size=args.batch_size,
        speed_batch_size=args.speed_batch_size,
        speed_samples=args.speed_samples,
        progress=bar.update,
        method_options=options,
    )
    bar.close()
    if not is_main():
        return 0
    if args.csv:
        with open(args.csv, "w") as fh:
            fh.write(rows_to_csv(rows))
    if args.plot:
        pareto_plot(rows, args.plot)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(
        f"{args.model} on {data.name}: {len(data.train_images)} train / {len(data.test_images)} test images, "
        f"{size} px, {torch.get_num_threads()} threads"
    )
    print(format_eval_table(rows))
    print(
        f"k-NN (cosine, k={rows[0].knn_k}) and linear probe fit on full-token train features; drop in points vs full; "
        "cosine: reduced vs full test features; speedup measured at batch "
        f"{args.speed_batch_size} in this run"
    )
    return 0


def cmd_entropy(args: argparse.Namespace) -> int:
    from ..config import DEFAULT_ENTROPY_FLOOR
    from ..evaluate.budgets import method_config
    from ..evaluate.guard_report import entropy_profile, format_profile, guard_summary

    _set_threads(args.threads)
    floor = DEFAULT_ENTROPY_FLOOR if args.entropy_floor is None else args.entropy_floor
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        for keep in args.keep:
            method_config(m, keep, _guard_options(config_class(m), args))
    args.n_train = 10
    model, data = _model_and_data(args)
    report = []
    for keep in args.keep:
        for m in methods:
            config = method_config(m, keep, _guard_options(config_class(m), args))
            profile = entropy_profile(model, data.test_images, config, batch_size=args.batch_size)
            summary = guard_summary(profile, floor)
            report.append({"method": m, "keep": keep, "config": config.to_dict(), **summary})
            if not args.json:
                print(
                    f"\n{m} keep={keep:g} on {len(data.test_images)} {data.name} test images (floor {floor:g})"
                )
                print(format_profile(profile, floor))
                print(
                    ", ".join(
                        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                    )
                )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def cmd_adaptive_eval(args: argparse.Namespace) -> int:
    from ..evaluate.adaptive_eval import (
        cached_fashion_mnist_train_features,
        evaluate_adaptive,
        format_adaptive_table,
    )

    _set_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("patch", "resolution"):
            raise ValueError(f"--modes takes patch and/or resolution, got {mode!r}")
    model, data = _model_and_data(args)
    train_features = None
    if args.model == "dinov2_small" and args.data == "fashion-mnist" and args.img_size in (None, 224):
        train_features = cached_fashion_mnist_train_features(args.n_train, args.seed)
    quiet = args.json or args.quiet
    rows = evaluate_adaptive(
        model,
        data,
        targets=args.targets,
        fixed_sizes=args.fixed,
        patch_sizes=args.patch_sizes,
        modes=modes,
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


def _add_adaptive_eval_parser(sub: argparse._SubParsersAction, model_help: str) -> None:
    ae = sub.add_parser(
        "adaptive-eval",
        help="adaptive patching (tb.AdaptivePatch) vs one fixed patch size vs input resolution: accuracy vs tokens",
    )
    ae.add_argument("--model", default="dinov2_small", help=model_help)
    ae.add_argument("--pretrained", action="store_true")
    ae.add_argument("--img-size", type=int, default=None)
    ae.add_argument(
        "--data", default="fashion-mnist", help="as in eval: fashion-mnist, skimage, anomaly, a folder"
    )
    ae.add_argument(
        "--targets",
        type=_float_list,
        default=[128.0, 196.0],
        help="mean patch tokens per image to calibrate the thresholds to, on the train images (default 128,196)",
    )
    ae.add_argument(
        "--fixed",
        type=_int_list,
        default=[28, 16],
        help="patch sizes run for every image, as baselines (default 28,16: 64 and 196 tokens at 224 px)",
    )
    ae.add_argument(
        "--patch-sizes",
        type=_int_list,
        default=None,
        help="adaptive patch sizes, coarse to fine (default: twice, once, half the native patch)",
    )
    ae.add_argument(
        "--modes", default="patch,resolution", help="patch (resample the kernel), resolution (resize)"
    )
    ae.add_argument("--n-train", type=int, default=1000)
    ae.add_argument("--n-test", type=int, default=200)
    ae.add_argument("--test-fraction", type=float, default=0.2)
    ae.add_argument("--seed", type=int, default=0)
    ae.add_argument("--batch-size", type=int, default=32)
    ae.add_argument("--threads", type=int, default=None)
    ae.add_argument("--json", action="store_true")
    ae.add_argument("--quiet", action="store_true", help="no progress lines")
    ae.set_defaults(func=cmd_adaptive_eval)


def cmd_make_anomaly(args: argparse.Namespace) -> int:
    from ..data.anomaly import ANOMALY_CLASSES, anomaly_set, save_image_folder, save_preview

    data = anomaly_set(args.n_base, args.size, args.seed, args.scale)
    counts = {name: int((data.labels == i).sum()) for i, name in enumerate(ANOMALY_CLASSES)}
    print(f"anomaly set: {len(data.labels)} images of {args.size} px from {args.n_base} base crops {counts}")
    if args.out:
        save_image_folder(data, args.out)
        print(
            f"wrote {args.out}/train|test/CLASS/*.png, split by base crop (tokenbudget eval --data {args.out})"
        )
    if args.preview:
        save_preview(data, args.preview)
        print(f"wrote {args.preview}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from ..evaluate import format_eval_table
    from ..evaluate.distributed import is_main
    from ..evaluate.plan import check_targets, plan

    _set_threads(args.threads)
    check_targets(args.target_speedup, args.target_flops, args.max_drop)
    model, data = _model_and_data(args)
    keeps = args.keep or None
    result = plan(
        model,
        data,
        target_speedup=args.target_speedup,
        target_flops=args.target_flops,
        max_drop=args.max_drop,
        speed_batch_size=args.batch_size,
        speed_samples=args.speed_samples,
        **({"keeps": keeps} if keeps else {}),
    )
    if not is_main():
        return 0
    if result.choice is None:
        raise ValueError(result.reason)
    config_json = json.dumps(result.choice.config)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(config_json + "\n")
    if args.json:
        print(config_json)
        return 0
    front = {id(r) for r in result.front}
    print(
        f"{args.model} on {data.name} ({len(data.test_images)} calibration images), batch {args.batch_size}:"
    )
    table = format_eval_table(result.rows).splitlines()
    print(table[0] + "  front")
    print(table[1])
    for row, line in zip(result.rows, table[2:], strict=True):
        mark = "  <- chosen" if row is result.choice else ("  *" if id(row) in front else "")
        print(line + mark)
    print(f"* on the measured Pareto front (speedup vs k-NN accuracy); choice: {result.reason}")
    print(config_json)
    return 0


def cmd_train_predictor(args: argparse.Namespace) -> int:
    """Train DynamicViT predictors for a model on unlabelled training images and save them."""
    from ..learned import save_predictors
    from ..learned.train import train_predictors

    _set_threads(args.threads)
    if args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    model, data = _model_and_data(args)
    bar = _progress(args.steps, "train-predictor", disable=args.quiet)
    progress = _step_progress(bar, keys=("loss", "kept"))

    predictors, report = train_predictors(
        model,
        data.train_images,
        keep=args.keep,
        layers=tuple(args.layers),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_seconds=60 * args.max_minutes,
        progress=progress,
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
    layers = tuple(args.layers) if getattr(args, "layers", None) is not None else None
    layers_arg = f", layers={layers}" if layers is not None else ""
    print(
        f"wrote {weights} and {config}; use tb.DynamicViT(keep={args.keep}{layers_arg}, predictor={str(config)!r})"
    )
    return 0


def cmd_train_text_projection(args: argparse.Namespace) -> int:
    """Train the MiniLM -> DINOv2-S text projection on cached Fashion-MNIST tokens and save it."""
    from ..vlm.text import save_text_projection
    from ..vlm.text_train import train_fashion_mnist_projection

    _set_threads(args.threads)
    if args.max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
    bar = _progress(args.steps, "train-text-projection", disable=args.quiet)
    progress = _step_progress(bar)

    projection, report = train_fashion_mnist_projection(
        args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        seed=args.seed,
        max_seconds=60 * args.max_minutes,
        progress=progress,
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
    """Query-aware selection on the multi-object scenes: on-item share and per-item k-NN per method and k."""
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

    _set_threads(args.threads)
    if any(k < 1 for k in args.ks):
        raise ValueError(f"--ks must be positive token counts, got {args.ks}")
    data = load_selection_data(args.scenes)
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
    prompts = [args.prompt.format(name.lower()) for name in FASHION_MNIST_CLASSES]
    text_queries = query.encode(prompts)  # [10, C]
    methods = 4 + (args.diversity > 0)  # text, [text+mmr], exemplar, random, cls-attention
    bar = _progress(methods * len(args.ks), "vlm-select-eval", disable=args.quiet)
    rows = run_selection_benchmark(
        data,
        args.ks,
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


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    _set_threads(args.threads)
    return run_demo(out_dir=args.out, quick=args.quick, as_json=args.json)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, disable: bool):  # noqa: ANN202
    if disable:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def _step_progress(bar, keys: Sequence[str] = ("loss",)) -> Callable[[int, float | dict], None]:  # noqa: ANN001
    """The ``progress(step, losses)`` callback of a trainer: one tick of ``bar`` per step, with the loss
    (a float, or the ``keys`` of a dict of them) as the bar's postfix (floats to 4 decimals)."""

    def progress(step: int, losses: float | dict) -> None:
        bar.update(1)
        if hasattr(bar, "set_postfix"):
            values = {k: losses[k] for k in keys} if isinstance(losses, dict) else {"loss": losses}
            bar.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in values.items()})

    return progress


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenbudget", description="Token budgets for vision transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    model_help = "timm model name (random weights unless --pretrained) or dinov2_small, the embedded offline DINOv2 ViT-S/14"
    bench = sub.add_parser("bench", help="throughput, FLOPs and memory: patched vs unpatched, same process")
    bench.add_argument("--model", default="vit_small_patch16_224", help=model_help)
    bench.add_argument(
        "--pretrained", action="store_true", help="load timm's pretrained weights (needs a network)"
    )
    bench.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    bench.add_argument("--batch-size", type=_int_list, default=[1, 32], help="comma list (default: 1,32)")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    bench.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    bench.add_argument("--samples", type=int, default=10, help="timed samples per model (median)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    bench.add_argument("--no-ceiling", action="store_true", help="skip the free-reduction ceiling run")
    bench.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every model and compare compiled patched vs compiled unpatched",
    )
    bench.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_budget_args(bench, default_r="16")
    bench.set_defaults(func=cmd_bench)

    vis = sub.add_parser("visualize", help="draw the merge groups over an image")
    vis.add_argument("image", help="image file, or skimage:NAME (astronaut, coffee, chelsea, ...)")
    vis.add_argument("-o", "--output", default="merges.png", help="output PNG (default: merges.png)")
    vis.add_argument("--model", default="dinov2_small", help=model_help)
    vis.add_argument("--pretrained", action="store_true")
    vis.add_argument("--img-size", type=int, default=None)
    _add_budget_args(vis, default_r="16")
    vis.set_defaults(func=cmd_visualize)

    ev = sub.add_parser(
        "eval", help="accuracy and fidelity of reduced features against full tokens, with speed"
    )
    ev.add_argument("--model", default="dinov2_small", help=model_help)
    ev.add_argument("--pretrained", action="store_true")
    ev.add_argument("--img-size", type=int, default=None)
    ev.add_argument(
        "--data",
        default="fashion-mnist",
        help="fashion-mnist (offline copy), skimage (crops of bundled photos, labelled by photo), anomaly / anomaly-small (textures labelled by a small flaw: tokenbudget make-anomaly), or a directory: IDX files or CLASS/ image folders",
    )
    ev.add_argument(
        "--methods",
        default="tome,random,pool",
        help=f"comma list of {', '.join(method_names())} (prune/dynamicvit: --keep is per stage)",
    )
    _add_stage_args(ev.add_argument_group("pruning methods"))
    _add_entropy_floor_arg(ev.add_argument_group("entropy guard"))
    ev.add_argument(
        "--keep",
        type=_float_list,
        default=None,
        help="fractions of tokens left (default 1.0,0.5,0.25)",
    )
    ev.add_argument(
        "--flops-speedup",
        type=_float_list,
        default=None,
        help="instead of --keep: FLOPs-ideal speedups, e.g. 1.5,2 (each becomes the keep that reaches it)",
    )
    ev.add_argument(
        "--n-train",
        type=int,
        default=1000,
        help="train images (fashion-mnist: balanced subset; anomaly: 4 per base crop)",
    )
    ev.add_argument("--n-test", type=int, default=500, help="test images (as --n-train)")
    ev.add_argument("--test-fraction", type=float, default=0.2, help="image folders without train/ and test/")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--speed-batch-size", type=int, default=32)
    ev.add_argument("--speed-samples", type=int, default=5)
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--csv", default=None, help="write the rows as CSV")
    ev.add_argument("--plot", default=None, help="write a Pareto plot (accuracy vs speedup) as PNG")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    _add_adaptive_eval_parser(sub, model_help)

    an = sub.add_parser(
        "make-anomaly",
        help="generate (and cache) the anomaly set: textures labelled clean/spot/scratch/flaw",
    )
    an.add_argument("--n-base", type=int, default=150, help="base crops; each gives 4 images (default 150)")
    an.add_argument("--size", type=int, default=224, help="image side in px (default 224)")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--scale", type=float, default=1.0, help="flaw size factor (anomaly-small: 0.5)")
    an.add_argument("--out", default=None, help="also write an image folder DIR/CLASS/*.png")
    an.add_argument("--preview", default=None, help="write a PNG grid of the first base crops")
    an.set_defaults(func=cmd_make_anomaly)

    pl = sub.add_parser("plan", help="choose a config for a target speedup, FLOPs fraction or accuracy drop")
    target = pl.add_argument_group("target (one or more; all must hold)")
    target.add_argument(
        "--target-speedup", type=float, default=None, help="e.g. 2.0: at least twice as fast here"
    )
    target.add_argument("--target-flops", type=float, default=None, help="e.g. 0.5: at most half the FLOPs")
    target.add_argument(
        "--max-drop", type=float, default=None, help="e.g. 0.5: lose at most 0.5 points of k-NN accuracy"
    )
    pl.add_argument("--model", default="dinov2_small", help=model_help)
    pl.add_argument("--pretrained", action="store_true")
    pl.add_argument("--img-size", type=int, default=None)
    pl.add_argument("--data", default="fashion-mnist", help="calibration data: fashion-mnist or a directory")
    pl.add_argument("--n-train", type=int, default=300)
    pl.add_argument("--n-test", type=int, default=200)
    pl.add_argument(
        "--keep", type=_float_list, default=None, help="candidate keep fractions (default 0.9 ... 0.1)"
    )
    pl.add_argument("--batch-size", type=int, default=8, help="batch size the speed is measured at")
    pl.add_argument("--speed-samples", type=int, default=5)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--threads", type=int, default=None)
    pl.add_argument("--out", default=None, help="write the chosen config JSON here")
    pl.add_argument("--json", action="store_true", help="print only the chosen config JSON")
    pl.set_defaults(func=cmd_plan)

    tp = sub.add_parser(
        "train-predictor",
        help="train DynamicViT keep/drop predictors (frozen backbone, distillation from all tokens)",
    )
    tp.add_argument("--model", default="dinov2_small", help=model_help)
    tp.add_argument("--pretrained", action="store_true")
    tp.add_argument("--img-size", type=int, default=None)
    tp.add_argument("--data", default="fashion-mnist", help="fashion-mnist (offline copy) or a directory")
    tp.add_argument("--n-train", type=int, default=500, help="training images (labels are not used)")
    tp.add_argument("--n-test", type=int, default=10, help=argparse.SUPPRESS)
    tp.add_argument("--keep", type=float, default=0.7, help="target keep ratio per stage (default 0.7)")
    tp.add_argument(
        "--layers", type=_int_list, default=[3, 6, 9], help="0-based pruning blocks (default 3,6,9)"
    )
    tp.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    tp.add_argument("--batch-size", type=int, default=8)
    tp.add_argument("--lr", type=float, default=1e-3)
    tp.add_argument("--max-minutes", type=float, default=30.0, help="stop after this long (default 30)")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--threads", type=int, default=None)
    tp.add_argument(
        "--out",
        default="predictors/dinov2_small_dynamicvit",
        help="output stem: writes STEM.safetensors and STEM.json (default predictors/dinov2_small_dynamicvit)",
    )
    tp.add_argument("--quiet", action="store_true", help="no progress bar")
    tp.set_defaults(func=cmd_train_predictor)

    ttp = sub.add_parser(
        "train-text-projection",
        help="train the MiniLM -> DINOv2-S projection for text queries (tb.vlm.select) on Fashion-MNIST",
    )
    ttp.add_argument(
        "--data",
        default="scenes",
        choices=("scenes", "images"),
        help="labelled tokens: patch tokens of the 600 train scenes (default) or 1000 single train images",
    )
    ttp.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    ttp.add_argument("--batch-size", type=int, default=4096, help="labelled tokens per step (default 4096)")
    ttp.add_argument("--lr", type=float, default=3e-3)
    ttp.add_argument("--temperature", type=float, default=0.05, help="cosine logit temperature")
    ttp.add_argument("--max-minutes", type=float, default=30.0, help="stop after this long (default 30)")
    ttp.add_argument("--seed", type=int, default=0)
    ttp.add_argument("--threads", type=int, default=None)
    ttp.add_argument(
        "--out",
        default="projections/dinov2_small_minilm",
        help="output stem: writes STEM.safetensors and STEM.json (default projections/dinov2_small_minilm)",
    )
    ttp.add_argument("--quiet", action="store_true", help="no progress bar")
    ttp.set_defaults(func=cmd_train_text_projection)

    vse = sub.add_parser(
        "vlm-select-eval",
        help="query-aware selection (text, exemplar) vs random and class attention on multi-object scenes",
    )
    vse.add_argument("--ks", type=_int_list, default=[8, 16, 32, 64], help="tokens kept (default 8,16,32,64)")
    vse.add_argument("--scenes", type=int, default=300, help="test scenes to score (default all 300)")
    vse.add_argument(
        "--projection", default=None, help="text projection STEM (default: train one here, about a minute)"
    )
    vse.add_argument("--projection-steps", type=int, default=300, help=argparse.SUPPRESS)
    vse.add_argument(
        "--prompt", default="a photo of a {}", help="text query template (default 'a photo of a {}')"
    )
    vse.add_argument("--diversity", type=float, default=0.3, help="MMR weight of the text+mmr rows (0: none)")
    vse.add_argument("--seed", type=int, default=0)
    vse.add_argument("--threads", type=int, default=None)
    vse.add_argument("--out", default=None, help="also write the table to this file")
    vse.add_argument("--quiet", action="store_true", help="no progress bar")
    vse.set_defaults(func=cmd_vlm_select_eval)
    ent = sub.add_parser(
        "entropy",
        help="token entropy per block and how often the entropy guard fires, on real images",
    )
    ent.add_argument("--model", default="dinov2_small", help=model_help)
    ent.add_argument("--pretrained", action="store_true")
    ent.add_argument("--img-size", type=int, default=None)
    ent.add_argument("--data", default="fashion-mnist", help="as for eval (its test images are used)")
    ent.add_argument("--n-test", type=int, default=100, help="images (default 100)")
    ent.add_argument("--methods", default="tome,tome-guard", help="comma list (default tome,tome-guard)")
    ent.add_argument("--keep", type=_float_list, default=[0.05], help="comma list (default 0.05)")
    _add_entropy_floor_arg(ent.add_argument_group("entropy guard"))
    ent.add_argument("--seed", type=int, default=0)
    ent.add_argument("--batch-size", type=int, default=32)
    ent.add_argument("--threads", type=int, default=None)
    ent.add_argument("--json", action="store_true")
    ent.set_defaults(func=cmd_entropy)

    demo = sub.add_parser(
        "demo", help="ToMe on the embedded DINOv2 at a few budgets: table and merge picture"
    )
    demo.add_argument(
        "--out", default="demo_output", help="folder for the picture and JSON (default: demo_output)"
    )
    demo.add_argument("--quick", action="store_true", help="fewer budgets and samples (for smoke tests)")
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    _add_adaptive_commands(sub, model_help)
    from .vlm import add_compress_commands, add_slot_commands

    add_compress_commands(sub)
    add_slot_commands(sub)
    return parser


def _add_adaptive_commands(sub: argparse._SubParsersAction, model_help: str) -> None:
    """train-exits, eval-exits, train-budget-predictor, eval-budget-predictor (tokenbudget.adaptive)."""
    from .adaptive import add_parsers

    add_parsers(sub, model_help)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError) as err:
        print(f"tokenbudget {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
