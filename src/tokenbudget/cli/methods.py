"""The method/budget options of the commands that reduce tokens (``bench``, ``visualize``, ``eval``,
``entropy``), declared once: :func:`add_budget_options` (``--methods`` and one of ``--r``, ``--keep``,
``--tokens``, ``--config``), :func:`add_methods`, :func:`add_stage_options` (``--layers``,
``--predictor``), :func:`add_entropy_floor`, :func:`add_cost_model`; and what turns them into
configs: :func:`configs`, :func:`method_options`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from ..config import BudgetConfig, ReductionConfig, config_class, config_from_json, method_names
from .options import add_tokens, float_list, int_list, name_list


def method_list(text: str) -> list[str]:
    """A comma list of method names (:func:`tokenbudget.config.method_names`), checked here."""
    methods = name_list(text)
    for method in methods:
        if method not in method_names():
            raise argparse.ArgumentTypeError(
                f"unknown method {method!r}; choose from {', '.join(method_names())}"
            )
    if not methods:
        raise argparse.ArgumentTypeError("give at least one method")
    return methods


def add_methods(parser: Any, default: str, note: str = "", *, names: Sequence[str] | None = None) -> None:
    """``--methods``: a comma list of the library's methods (checked while parsing; the old spelling
    ``--method`` is a hidden alias), or of ``names`` (checked by the command)."""
    kind = method_list if names is None else name_list
    listed = ", ".join(method_names() if names is None else names)
    parser.add_argument(
        "--methods", type=kind, default=default, help=f"comma list of {listed} (default: {default}){note}"
    )
    if names is None:
        parser.add_argument("--method", dest="methods", type=kind, help=argparse.SUPPRESS)


def add_budget_options(
    parser: argparse.ArgumentParser,
    default_r: str,
    methods_note: str = "; several are timed interleaved against one unpatched baseline",
) -> None:
    """The method/budget group: ``--methods`` (``methods_note`` says what the command does with
    several) and one of ``--r``, ``--keep``, ``--tokens``, ``--config``."""
    group = parser.add_argument_group("method and budget; give one of --r, --keep, --tokens, --config")
    add_methods(
        group,
        "tome",
        f"{methods_note}. prune/dynamicvit: --keep is per stage; dynamicvit needs --predictor",
    )
    group.add_argument(
        "--r", type=int_list, default=None, help=f"tokens merged per block; comma list (default: {default_r})"
    )
    group.add_argument(
        "--inflection",
        type=float,
        default=None,
        help="ToMe schedule inflection in [-1, 1] with --r (-1: decreasing)",
    )
    group.add_argument(
        "--keep",
        type=float_list,
        default=None,
        help="fraction of tokens left after the last block; comma list",
    )
    add_tokens(group, None, "tokens left after the last block")
    group.add_argument("--config", default=None, help='a JSON config, e.g. \'{"method": "tome", "r": 16}\'')
    group.add_argument("--no-prop-attn", action="store_true", help="turn off proportional attention")
    add_entropy_floor(group)
    add_cost_model(group)
    add_stage_options(group)
    add_per_image_options(group)
    parser.set_defaults(default_r=default_r)


def add_entropy_floor(group: Any) -> None:
    """``--entropy-floor`` of the methods that take it (:func:`guard_options`)."""
    group.add_argument(
        "--entropy-floor",
        type=float,
        default=None,
        help="entropy guard for the methods that take it (tome, tome-detail, tome-optimal, tofu, pool): "
        "merge less where token entropy would fall below this fraction of its maximum (tome-guard: 0.2734)",
    )


def add_cost_model(group: Any) -> None:
    """``--cost-model`` of the methods that take it (:func:`cost_options`)."""
    group.add_argument(
        "--cost-model",
        choices=("off", "auto"),
        default=None,
        help="for the methods that take it (tome, tome-detail, tome-optimal, tome-guard): 'auto' measures "
        "what a merge costs on this machine and merges only in blocks where it pays, so small budgets "
        "at batch 1 are not slower than the unpatched model; 'off' (the default) merges as the budget says",
    )


def add_stage_options(group: Any) -> None:
    """``--layers`` and ``--predictor`` of the pruning methods (:func:`stage_options`)."""
    group.add_argument(
        "--layers",
        type=int_list,
        default=None,
        help="prune/dynamicvit: 0-based blocks that prune (default 3,6,9)",
    )
    group.add_argument(
        "--predictor", default=None, help="dynamicvit: trained predictors (tokenbudget train-predictor --out)"
    )


def add_per_image_options(group: Any) -> None:
    """``--policy`` of per-image budgets (:func:`per_image_options`)."""
    from ..config.per_image import PER_IMAGE_POLICIES

    group.add_argument(
        "--policy",
        choices=PER_IMAGE_POLICIES,
        default=None,
        help="per-image: the glance score that picks each image's budget (default redundancy); calibrated on "
        "the train split inside the run",
    )


def per_image_options(cls: type, args: argparse.Namespace) -> dict:
    """``policy`` for per-image configs, from ``--policy``."""
    policy = getattr(args, "policy", None)
    if policy is None or "policy" not in {f.name for f in dataclasses.fields(cls)}:
        return {}
    return {"policy": policy}


def guard_options(cls: type, args: argparse.Namespace) -> dict:
    """``entropy_floor`` for configs that take it, from ``--entropy-floor``."""
    floor = getattr(args, "entropy_floor", None)
    if floor is None or "entropy_floor" not in {f.name for f in dataclasses.fields(cls)}:
        return {}
    return {"entropy_floor": floor}


def cost_options(cls: type, args: argparse.Namespace) -> dict:
    """``cost_model`` for configs that take it, from ``--cost-model``."""
    choice = getattr(args, "cost_model", None)
    if choice is None or "cost_model" not in {f.name for f in dataclasses.fields(cls)}:
        return {}
    return {"cost_model": choice}


def stage_options(cls: type, args: argparse.Namespace) -> dict:
    """Keyword options for a pruning config (per-stage keep) from ``--layers`` / ``--predictor``."""
    names = {f.name for f in dataclasses.fields(cls)}
    options = {}
    if getattr(args, "layers", None) is not None and "layers" in names:
        options["layers"] = tuple(args.layers)
    if getattr(args, "predictor", None) is not None and "predictor" in names:
        options["predictor"] = args.predictor
    return options


def method_options(method: str, args: argparse.Namespace) -> dict:
    """Every per-method option (pruning stages, entropy floor, cost model) the command line gives
    ``method``."""
    cls = config_class(method)
    return (
        stage_options(cls, args)
        | guard_options(cls, args)
        | cost_options(cls, args)
        | per_image_options(cls, args)
    )


def scheduled_methods() -> list[str]:
    """Methods with a per-layer schedule (those a FLOPs target can be given to)."""
    return [m for m in method_names() if issubclass(config_class(m), BudgetConfig)]


def configs(args: argparse.Namespace) -> list[ReductionConfig]:
    """Every (method, budget) config the method/budget group names, methods outermost."""
    given = [name for name in ("r", "keep", "tokens", "config") if getattr(args, name) is not None]
    if len(given) > 1:
        raise ValueError(f"give one budget option, not {', '.join('--' + g for g in given)}")
    if args.config is not None:
        return [config_from_json(args.config)]
    return [config for method in args.methods for config in _method_configs(method, args)]


def _method_configs(method: str, args: argparse.Namespace) -> list[ReductionConfig]:
    cls = config_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    extra = {"prop_attn": not args.no_prop_attn} if "prop_attn" in names else {}
    extra |= guard_options(cls, args) | cost_options(cls, args) | per_image_options(cls, args)
    if "r" not in names:  # pruning methods: --keep is the per-stage keep ratio
        extra |= stage_options(cls, args)
        if args.r is not None or args.tokens is not None:
            raise ValueError(
                f"method {method} takes --keep (fraction kept at each pruning layer), not --r/--tokens"
            )
        return [cls(keep=k, **extra) for k in args.keep] if args.keep is not None else [cls(**extra)]
    if args.keep is not None:
        return [cls(keep=k, **extra) for k in args.keep]
    if args.tokens is not None:
        return [cls(tokens=t, **extra) for t in args.tokens]
    rs = args.r if args.r is not None else int_list(args.default_r)
    if args.inflection is not None:
        return [cls(r=(r, args.inflection), **extra) for r in rs]
    return [cls(r=r, **extra) for r in rs]
