"""``tokenbudget make-anomaly`` and ``make-textures``: generate (and cache) the anomaly set
(:mod:`tokenbudget.data.anomaly`) and the woven-texture set (:mod:`tokenbudget.data.textures`)."""

from __future__ import annotations

import argparse

from . import options


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``make-anomaly`` and ``make-textures``."""
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

    tx = options.add_command(
        sub,
        "make-textures",
        cmd_make_textures,
        "generate (and cache) the woven-texture set: fabrics labelled nominal/local/global",
    )
    tx.add_argument("--n-base", type=int, default=100, help="base fabrics; each gives 3 images (default 100)")
    tx.add_argument("--size", type=int, default=224, help="image side in px (default 224, at least 64)")
    options.add_seed(tx)
    tx.add_argument("--types", type=int, default=8, help="fabric types the bases are pieces of (default 8)")
    tx.add_argument("--defect-scale", type=float, default=1.0, help="local defect size factor (default 1)")
    tx.add_argument(
        "--global-strength", type=float, default=1.0, help="strength of the global change (default 1)"
    )
    options.add_out(tx, None, "also write an image folder DIR/train|test/CLASS/*.png")
    tx.add_argument("--preview", default=None, help="write a PNG grid of the first base fabrics")


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


def cmd_make_textures(args: argparse.Namespace) -> int:
    from ..data.textures import TEXTURE_CLASSES, save_image_folder, save_preview, texture_set

    data = texture_set(
        args.n_base,
        args.size,
        args.seed,
        num_types=args.types,
        defect_scale=args.defect_scale,
        global_strength=args.global_strength,
    )
    counts = {name: int((data.labels == i).sum()) for i, name in enumerate(TEXTURE_CLASSES)}
    print(
        f"texture set: {len(data.labels)} images of {args.size} px from {args.n_base} base fabrics {counts}"
    )
    if args.out:
        save_image_folder(data, args.out)
        print(
            f"wrote {args.out}/train|test/CLASS/*.png, split by base fabric (tokenbudget eval --data {args.out})"
        )
    if args.preview:
        save_preview(data, args.preview)
        print(f"wrote {args.preview}")
    return 0
