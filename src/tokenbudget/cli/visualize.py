"""``tokenbudget visualize``: draw the merge groups of one budget over an image."""

from __future__ import annotations

import argparse

from . import methods, options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``visualize``."""
    vis = options.add_command(sub, "visualize", cmd_visualize, "draw the merge groups over an image")
    vis.add_argument("image", help="image file, or skimage:NAME (astronaut, coffee, chelsea, ...)")
    options.add_out(vis, "merges.png", "output PNG", "-o")
    options.add_model_options(vis)
    methods.add_budget_options(vis, default_r="16", methods_note="; one method and one budget per picture")


def cmd_visualize(args: argparse.Namespace) -> int:
    from PIL import Image

    from ..data import load_image
    from ..viz import render_merges

    configs = methods.configs(args)
    if len(configs) != 1:
        raise ValueError(f"visualize takes one method and one budget, got {len(configs)} configs")
    model = options.load_model(args)
    picture, summary = render_merges(model, load_image(args.image), configs[0])
    Image.fromarray(picture).save(args.out)
    budget = ""
    if "per_image_speedup" in summary:
        budget = (
            f"; per-image budget: FLOPs-ideal {summary['per_image_speedup']:g}x (level {summary['per_image_level']}, "
            f"glance score {summary['per_image_score']:.4g}, FLOPs {summary['per_image_flops']:.3f})"
        )
    print(f"wrote {args.out}: {summary['input_tokens']} -> {summary['tokens_per_layer'][-1]} tokens{budget}")
    return 0
