"""``tokenbudget make-anomaly``: generate (and cache) the anomaly set (:mod:`tokenbudget.data.anomaly`)."""

from __future__ import annotations

import argparse

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``make-anomaly``."""
    an = options.add_command(
        sub,
        "make-anomaly",
        cmd_make_anomaly,
        "generate (and cache) the anomaly set: textures labelled clean/spot/scratch/flaw",
    )
    an.add_argument("--n-base", type=int, default=150, help="base crops; each gives 4 images (default 150)")
    an.add_argument("--size", type=int, default=224, help="image side in px (default 224)")
    options.add_seed(an)
    an.add_argument(
        "--scale", type=float, default=1.0, help="flaw size factor (anomaly-small: 0.5; default 1)"
    )
    options.add_out(an, None, "also write an image folder DIR/train|test/CLASS/*.png")
    an.add_argument("--preview", default=None, help="write a PNG grid of the first base crops")


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
