"""``tokenbudget explore``: the local web page that shows any image merged at any budget."""

from __future__ import annotations

import argparse


def cmd_explore(args: argparse.Namespace) -> int:
    from ..explore import serve

    serve(model=args.model, host=args.host, port=args.port, img_size=args.img_size, threads=args.threads)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``explore`` command."""
    parser = subparsers.add_parser(
        "explore",
        help="a local web page: any image merged at any budget, two methods side by side",
        description=(
            "Serve a local page (nothing from the network) showing the merge groups of two methods "
            "over a sample or uploaded image at a budget slider, with tokens per layer, FLOPs, "
            "cosine fidelity and measured forward time."
        ),
    )
    parser.add_argument(
        "--model",
        default="dinov2_small",
        help="dinov2_small (the embedded offline DINOv2 ViT-S/14, default), a timm name, hf:<repo>, openclip:<arch>",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.set_defaults(func=cmd_explore)
