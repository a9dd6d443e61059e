"""``tokenbudget explore``: the local web page that shows any image merged at any budget."""

from __future__ import annotations

import argparse

from . import options


def cmd_explore(args: argparse.Namespace) -> int:
    from ..explore import serve

    serve(
        model=args.model,
        host=args.host,
        port=args.port,
        img_size=args.img_size,
        threads=args.threads,
        pretrained=args.pretrained,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``explore`` command."""
    parser = options.add_command(
        subparsers,
        "explore",
        cmd_explore,
        "a local web page: any image merged at any budget, two methods side by side (nothing from the "
        "network; tokens per layer, FLOPs, cosine fidelity and measured forward time)",
    )
    options.add_model_options(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    options.add_run_options(parser, quiet=None, json=None)
