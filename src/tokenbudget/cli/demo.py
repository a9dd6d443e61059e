"""``tokenbudget demo``: Auto and ToMe on the embedded DINOv2 at a few budgets, a table and a merge picture."""

from __future__ import annotations

import argparse

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
    demo = options.add_command(
        sub,
        "demo",
        cmd_demo,
        "Auto and ToMe on the embedded DINOv2 at a few budgets: table and merge picture",
    )
    options.add_out(demo, "demo_output", "folder for the picture and JSON")
    demo.add_argument("--quick", action="store_true", help="fewer budgets and samples (for smoke tests)")
    demo.add_argument(
        "--report",
        default=None,
        help="also write the printed report to this file, headed by the machine and the time the demo took "
        "(results/cpu/demo.txt is written this way)",
    )
    options.add_run_options(demo, quiet=None)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(out_dir=args.out, quick=args.quick, as_json=args.json, report=args.report)
