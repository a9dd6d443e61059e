"""``tokenbudget eval``, ``plan`` and ``entropy``: quality of reduced features on labelled images."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import methods, options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``, ``plan`` and ``entropy``."""
    ev = options.add_command(
        sub, "eval", cmd_eval, "accuracy and fidelity of reduced features against full tokens, with speed"
    )
    options.add_model_options(ev)
    options.add_data_options(ev, n_train=1000, n_test=500)
    methods.add_methods(ev, "tome,random,pool", " (prune/dynamicvit: --keep is per stage)")
    methods.add_stage_options(ev.add_argument_group("pruning methods"))
    methods.add_entropy_floor(ev.add_argument_group("entropy guard"))
    methods.add_per_image_options(ev.add_argument_group("per-image budgets"))
    ev.add_argument("--keep", type=options.float_list, help="fractions of tokens left (default 1.0,0.5,0.25)")
    ev.add_argument(
        "--flops-speedup",
        type=options.float_list,
        default=None,
        help="instead of --keep: FLOPs-ideal speedups, e.g. 1.5,2,3 (each becomes the keep whose even schedule reaches it; beyond that schedule's reach, about 2.7x on DINOv2-S, every method runs the geometric schedule that reaches it)",
    )
    _add_batch_options(ev, speed_batch_size=32)
    ev.add_argument(
        "--shift",
        action="store_true",
        help="also print the bias diagnostic: the largest fraction of a class gap the mean feature shift "
        "covers (0: no bias towards any class; needs two or more classes)",
    )
    ev.add_argument("--csv", default=None, help="write the rows as CSV")
    ev.add_argument("--plot", default=None, help="write a Pareto plot (accuracy vs speedup) as PNG")
    options.add_run_options(ev)

    pl = options.add_command(
        sub, "plan", cmd_plan, "choose a config for a target speedup, FLOPs fraction or accuracy drop"
    )
    target = pl.add_argument_group("target (one or more; all must hold)")
    target.add_argument(
        "--target-speedup", type=float, default=None, help="e.g. 2.0: at least twice as fast here"
    )
    target.add_argument("--target-flops", type=float, default=None, help="e.g. 0.5: at most half the FLOPs")
    target.add_argument(
        "--max-drop", type=float, default=None, help="e.g. 0.5: lose at most 0.5 points of k-NN accuracy"
    )
    options.add_model_options(pl)
    options.add_data_options(pl, n_train=300, n_test=200, data_note="; the calibration data")
    methods.add_methods(pl, "tome", "; each is measured at every --keep and the choice is made among all")
    pl.add_argument(
        "--keep", type=options.float_list, default=None, help="candidate keep fractions (default 0.9 ... 0.1)"
    )
    methods.add_per_image_options(pl.add_argument_group("per-image budgets"))
    _add_batch_options(pl, speed_batch_size=8)
    options.add_out(pl, None, "write the chosen config JSON here")
    options.add_run_options(
        pl,
        quiet="no progress lines (by default one per candidate on stderr)",
        json="print only the chosen config JSON",
    )

    ent = options.add_command(
        sub,
        "entropy",
        cmd_entropy,
        "token entropy per block and how often the entropy guard fires, on real images",
    )
    options.add_model_options(ent)
    options.add_data_options(ent, n_train=None, n_test=100, data_note="; its test images are used")
    methods.add_methods(ent, "tome,tome-guard")
    ent.add_argument("--keep", type=options.float_list, default=[0.05], help="comma list (default 0.05)")
    methods.add_entropy_floor(ent.add_argument_group("entropy guard"))
    ent.add_argument("--batch-size", type=int, default=32, help="images per forward (default 32)")
    options.add_run_options(ent, quiet=None)


def _add_batch_options(parser: argparse.ArgumentParser, *, speed_batch_size: int) -> None:
    """``--batch-size`` of feature extraction and ``--speed-batch-size`` / ``--speed-samples`` of timing."""
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per forward of the features (default 64)"
    )
    parser.add_argument(
        "--speed-batch-size",
        type=int,
        default=speed_batch_size,
        help=f"batch size the speedup is measured at (default {speed_batch_size})",
    )
    parser.add_argument(
        "--speed-samples", type=int, default=5, help="timed samples per model (median; default 5)"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..config import BudgetConfig, PerImage, config_class
    from ..evaluate import budget_for_flops_speedup, evaluate, format_eval_table, method_config, pareto_plot
    from ..evaluate.distributed import is_main
    from ..evaluate.tables import budget_warnings, headroom_line, rows_to_csv
    from ..patch import apply, remove

    chosen = args.methods
    method_options = {m: methods.method_options(m, args) for m in chosen}
    if args.flops_speedup is not None and args.keep is not None:
        raise ValueError("give --keep or --flops-speedup, not both")
    keeps = args.keep if args.keep is not None else [1.0, 0.5, 0.25]
    for m in chosen:  # fail on a bad method or budget before any model or data is loaded
        # per-image's keep is its mean budget: the FLOPs of ToMe at that keep
        if args.flops_speedup is not None and not issubclass(config_class(m), (BudgetConfig, PerImage)):
            raise ValueError(
                f"--flops-speedup needs methods with a per-layer schedule ({', '.join(methods.scheduled_methods())}); "
                f"{m!r} keeps a fraction per stage: give it --keep"
            )
        for keep in keeps if args.flops_speedup is None else [0.5]:
            method_config(m, keep, method_options[m])
    model, data = options.model_and_data(args)
    if args.shift and len(data.train_labels.unique()) < 2:
        raise ValueError(
            f"--shift measures the shift along between-class directions and needs two or more classes; "
            f"the train images of {data.name} hold {len(data.train_labels.unique())}"
        )
    if args.flops_speedup is not None:
        keeps = [1.0] + [budget_for_flops_speedup(model, s) for s in args.flops_speedup]
    for m in chosen:  # apply validates against this model (layers, predictor, class token): fail now,
        for keep in keeps:  # not after minutes of full-token feature extraction
            if keep < 1.0:
                remove(apply(model, _checkable(method_config(m, keep, method_options[m]))))
    size = options.image_side(model)
    test_batches = -(-len(data.test_images) // args.batch_size)
    batches = -(-len(data.train_images) // args.batch_size) + test_batches
    conditions = sum(1 for keep in keeps if keep < 1.0) * len(chosen)
    # Under torchrun only rank 0 shows progress and writes results (every rank computes the same rows).
    bar = options.progress(
        batches + args.speed_samples + conditions * test_batches,
        "eval",
        disable=args.json or args.quiet or os.environ.get("RANK", "0") != "0",
    )
    rows = evaluate(
        model,
        data,
        chosen,
        keeps,
        batch_size=args.batch_size,
        speed_batch_size=args.speed_batch_size,
        speed_samples=args.speed_samples,
        progress=bar.update,
        method_options=method_options,
        shift=args.shift,
    )
    bar.close()
    if not is_main():
        return 0
    if args.csv:
        with open(args.csv, "w") as fh:
            fh.write(rows_to_csv(rows))
    if args.plot:
        pareto_plot(rows, args.plot)
    targets = None
    if args.flops_speedup is not None:
        targets = {keep: 1.0 / s for keep, s in zip(keeps[1:], args.flops_speedup, strict=True)}
    warnings = budget_warnings(rows, targets)
    for line in warnings:
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(
        f"{args.model} on {data.name}: {len(data.train_images)} train / {len(data.test_images)} test images, "
        f"{size} px, {torch.get_num_threads()} threads"
    )
    print(format_eval_table(rows))
    full = next((r for r in rows if r.method == "full"), None)
    for row in rows:
        if row.method == "per-image":
            cfg = row.config
            print(
                f"per-image keep={row.keep:g} ({cfg['policy']}; {cfg.get('reducer', 'tome')} levels; "
                f"calibrated on {min(300, len(data.train_images))} train images, budget held on all "
                f"{len(data.train_images)}): target mean FLOPs {cfg['target_flops']:.4f}, train "
                f"{cfg['calibrated_flops']:.4f}, achieved on test {row.flops_ratio:.4f}"
            )
            fixed = [r for r in rows if r.keep == row.keep and r.method not in ("full", "per-image")]
            if fixed:
                print(headroom_line(row, fixed, full, len(data.test_labels)))
    for line in warnings:
        print(line)
    print(
        f"k-NN (cosine, k={rows[0].knn_k}) and linear probe fit on full-token train features; drop in points "
        "vs full; cosine: reduced vs full test features; speedup measured at batch "
        f"{args.speed_batch_size} in this run"
    )
    if args.shift:
        print(
            "shift: largest fraction of a class gap (between class means of the full-token train features) "
            "covered by the mean shift of the reduced test features; random drop's is a fair reference"
        )
    return 0


def _checkable(config: object) -> object:
    """``config``, or for an uncalibrated ``tb.PerImage`` the same with placeholder thresholds, so
    that applying it checks the model before the run calibrates it."""
    from dataclasses import replace

    from ..config import PerImage

    if isinstance(config, PerImage) and config.thresholds is None:
        # the run calibrates the levels the model reaches; here only the model is checked
        return replace(config, levels=(1.0, 1.01), thresholds=(0.0,))
    return config


def cmd_plan(args: argparse.Namespace) -> int:
    # Light imports first: bad or unreachable targets fail in seconds.
    from ..bench.reach import DEFAULT_KEEPS, candidates, check_reachable, check_targets, geometry_of

    check_targets(args.target_speedup, args.target_flops, args.max_drop)
    keeps = args.keep or DEFAULT_KEEPS
    method_options = {m: methods.method_options(m, args) for m in args.methods}
    # Before anything is measured: a target no candidate's FLOPs reach fails now, from the model's
    # geometry as the last command that loaded it recorded (seconds), else from the model itself.
    targets = {"target_speedup": args.target_speedup, "target_flops": args.target_flops}
    geometry = options.cached_geometry(args)
    if geometry is not None:
        check_reachable(geometry, candidates(geometry, args.methods, keeps, method_options), **targets)
    from ..evaluate import format_eval_table
    from ..evaluate.distributed import is_main
    from ..evaluate.plan import plan

    model = options.load_model(args)
    geometry = geometry_of(model)
    found = candidates(geometry, args.methods, keeps, method_options)
    check_reachable(geometry, found, **targets)
    model, data = options.model_and_data(args, model)
    quiet = args.json or args.quiet or os.environ.get("RANK", "0") != "0"
    steps = PlanProgress(found, data, args.batch_size, args.speed_batch_size, args.speed_samples, quiet)
    result = plan(
        model,
        data,
        target_speedup=args.target_speedup,
        target_flops=args.target_flops,
        max_drop=args.max_drop,
        batch_size=args.batch_size,
        speed_batch_size=args.speed_batch_size,
        speed_samples=args.speed_samples,
        methods=args.methods,
        method_options=method_options,
        keeps=keeps,
        progress=steps.update,
    )
    steps.close()
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
        f"{args.model} on {data.name} ({len(data.test_images)} calibration images), batch {args.speed_batch_size}:"
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


def cmd_entropy(args: argparse.Namespace) -> int:
    from ..config import DEFAULT_ENTROPY_FLOOR, config_class
    from ..evaluate import method_config
    from ..evaluate.guard_report import entropy_profile, format_profile, guard_summary

    floor = DEFAULT_ENTROPY_FLOOR if args.entropy_floor is None else args.entropy_floor
    configs = {
        (m, keep): method_config(m, keep, methods.guard_options(config_class(m), args))
        for keep in args.keep
        for m in args.methods
    }  # every config is checked before the model and data load
    model, data = options.model_and_data(args)
    report = []
    for (m, keep), config in configs.items():
        profile = entropy_profile(model, data.test_images, config, batch_size=args.batch_size)
        summary = guard_summary(profile, floor)
        report.append({"method": m, "keep": keep, "config": config.to_dict(), **summary})
        if not args.json:
            print(f"\n{m} keep={keep:g} on {len(data.test_images)} {data.name} test images (floor {floor:g})")
            print(format_profile(profile, floor))
            print(
                ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
            )
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


class PlanProgress:
    """Progress of ``plan`` on stderr: one line when each stage ends (the full-token features, the
    timing, then each candidate), with the time so far and an estimate of the time left.

    The estimate weighs each step by the images it runs through the model, a reduced image counting
    its FLOPs fraction, and extrapolates the time spent so far."""

    def __init__(  # noqa: PLR0913 - what sizes the run
        self,
        found: list,
        data,
        batch_size: int,
        speed_batch_size: int,
        speed_samples: int,
        quiet: bool,  # noqa: ANN001
    ) -> None:
        import time

        n_train, n_test = len(data.train_images), len(data.test_images)
        train_batches, test_batches = -(-n_train // batch_size), -(-n_test // batch_size)
        cost = [1.0 / c.ideal_speedup if c.ideal_speedup else 1.0 for c in found]
        # (label, steps, work per step in full-image forwards)
        self.stages = [
            (
                f"full-token features of {n_train + n_test} images",
                train_batches + test_batches,
                (n_train + n_test) / (train_batches + test_batches),
            ),
            (
                f"timing {len(found)} candidates against the unpatched model",
                speed_samples,
                speed_batch_size * (1.0 + sum(cost)),
            ),
        ]
        for c, w in zip(found, cost, strict=True):
            ideal = f" (FLOPs-ideal {c.ideal_speedup:.2f}x)" if c.ideal_speedup else ""
            self.stages.append(
                (f"{c.method} keep={c.keep:g}{ideal}", test_batches, n_test / test_batches * w)
            )
        self.total = sum(n * w for _, n, w in self.stages)
        self.stage, self.step, self.done = 0, 0, 0.0
        self.quiet, self.clock, self.start = quiet, time.perf_counter, time.perf_counter()
        self._say(
            f"plan: {len(found)} candidates on {len(data.train_images)} train + {n_test} test {data.name} images; "
            f"{len(self.stages)} stages"
        )

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        """``n`` steps done (the callback of :func:`~tokenbudget.evaluate.plan.plan`)."""
        for _ in range(n):
            if self.stage >= len(self.stages):
                return
            label, steps, work = self.stages[self.stage]
            self.step += 1
            self.done += work
            if self.step == steps:
                elapsed = self.clock() - self.start
                left = elapsed * (self.total - self.done) / max(self.done, 1e-9)
                self.stage, self.step = self.stage + 1, 0
                self._say(
                    f"plan: [{self.stage}/{len(self.stages)}] {label} done; {_clock(elapsed)} so far, "
                    + ("finished" if self.stage == len(self.stages) else f"about {_clock(left)} left")
                )

    def close(self) -> None:
        """Nothing to release; the stages end themselves."""


def _clock(seconds: float) -> str:
    """``"3:07"``: minutes and seconds."""
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"
