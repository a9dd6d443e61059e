"""The ``tokenbudget`` command line: one module per command group, each with ``register(subparsers)``.

A new command is one new module here whose ``register`` adds it, plus its name in :data:`GROUPS`.
Shared options live in :mod:`.options`. Building the parser imports no torch (the command modules
import the library inside their command functions), so ``tokenbudget --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import options

#: the command groups (modules of this package), in the order ``tokenbudget --help`` lists them
GROUPS = (
    "bench",
    "visualize",
    "evaluate",
    "adaptive",
    "exits",
    "budget_predictor",
    "learned",
    "vlm_select",
    "vlm_compress",
    "vlm_slots",
    "vlm_eval",
    "vlm_train",
    "data",
    "cache",
    "demo",
    "explore",
)

#: errors of bad input: one line on stderr and exit code 2, no traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError, NotImplementedError)


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenbudget`` parser with every command of :data:`GROUPS`."""
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="tokenbudget", description="Token budgets for vision transformers.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"tokenbudget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` names (default: ``sys.argv[1:]``); its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options.set_threads(getattr(args, "threads", None))
        return args.func(args)
    except USER_ERRORS as err:
        print(f"tokenbudget {args.command}: error: {err}", file=sys.stderr)
        return 2


__all__ = ["GROUPS", "build_parser", "main"]
