"""What does a reducer's feature shift look like in image space?

For nominal test images of the texture validation set, the mean shift of reduced features
(reduced minus full, per image) is compared, by cosine, with the mean feature change that
simple image edits cause with all tokens: blur, lower contrast, zoom in (coarser threads), zoom
out (finer), more sensor noise. The edit whose change points the same way as the reducer's shift
is what the reduction makes the fabric *look like* to the model, and a class that differs from
nominal in that way is the one a biased reducer pushes images into.

    PYTHONPATH=src python scripts/experiments/textures_alignment.py --images 60 --speedup 2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import tokenbudget as tb
from tokenbudget.data.images import model_normalization, rgb_uint8_to_model_input
from tokenbudget.data.textures import texture_set
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.evaluate.features import extract_features


def _edit(image: np.ndarray, kind: str, amount: float, rng: np.random.Generator) -> np.ndarray:
    """``image`` [S, S, 3] uint8 edited by ``kind`` with strength ``amount``."""
    size = image.shape[0]
    pil = Image.fromarray(image)
    if kind == "blur":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(amount)))
    if kind == "contrast":
        x = image.astype(np.float32)
        mean = x.mean(axis=(0, 1), keepdims=True)
        return np.clip(mean + amount * (x - mean), 0, 255).astype(np.uint8)
    if kind == "zoom":  # amount > 1: zoom in (coarser threads); < 1: zoom out (finer)
        if amount >= 1:
            side = int(round(size / amount))
            off = (size - side) // 2
            return np.asarray(
                pil.crop((off, off, off + side, off + side)).resize((size, size), Image.BICUBIC)
            )
        tiled = np.tile(image, (2, 2, 1))  # a stationary texture tiles: zoom out over a 2x2 tiling
        side = int(round(size / amount))
        crop = Image.fromarray(tiled[:side, :side])
        return np.asarray(crop.resize((size, size), Image.BICUBIC))
    if kind == "noise":
        return np.clip(image.astype(np.float32) + rng.normal(0, amount, image.shape), 0, 255).astype(np.uint8)
    raise ValueError(kind)


EDITS = [
    ("blur", 0.6),
    ("blur", 1.2),
    ("contrast", 0.85),
    ("contrast", 0.7),
    ("zoom", 1.15),
    ("zoom", 0.87),
    ("noise", 6.0),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=60, help="nominal test images")
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--methods", default="tome,random,pool")
    parser.add_argument(
        "--bases", type=int, default=200, help="bases of the validation set (test: the second half)"
    )
    parser.add_argument("--seed", type=int, default=1000, help="generator seed (1000: the validation set)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tb.models.dinov2_small().eval()
    mean, std = model_normalization(model)
    data = texture_set(args.bases, 224, args.seed)
    rows = np.nonzero((data.base_ids >= args.bases // 2) & (data.labels == 0))[0][: args.images]
    nominal = data.images[rows]
    globals_ = np.stack(
        [data.images[(data.base_ids == data.base_ids[i]) & (data.labels == 2)][0] for i in rows]
    )

    def feats(images: np.ndarray) -> torch.Tensor:
        return F.normalize(extract_features(model, rgb_uint8_to_model_input(images, mean, std), 32), dim=1)

    full = feats(nominal)
    directions = {"global class": (feats(globals_) - full).mean(0)}
    rng = np.random.default_rng(0)
    for kind, amount in EDITS:
        edited = np.stack([_edit(im, kind, amount, rng) for im in nominal])
        directions[f"{kind} {amount:g}"] = (feats(edited) - full).mean(0)
    keep = keep_for_flops_speedup(model, args.speedup)
    shifts = {}
    for method in args.methods.split(","):
        tb.apply(model, tb.config_from_dict({"method": method, "keep": keep}))
        shifts[method] = (feats(nominal) - full).mean(0)
        tb.remove(model)

    print(
        f"{len(rows)} nominal test images (set seed {args.seed}), FLOPs-ideal {args.speedup}x (keep {keep})"
    )
    print("cosine between each mean feature change (rows) and each reducer's mean shift (columns);")
    print("|change| is the length of the mean change (normalized harness features)")
    names = list(shifts)
    print(f"{'image edit':<16} {'|change|':>8} " + " ".join(f"{n:>8}" for n in names))
    for label, d in directions.items():
        cos = [float(F.cosine_similarity(d, shifts[n], dim=0)) for n in names]
        print(f"{label:<16} {float(d.norm()):>8.4f} " + " ".join(f"{c:>8.3f}" for c in cos))
    print(f"{'|shift|':<16} {'':>8} " + " ".join(f"{float(shifts[n].norm()):>8.4f}" for n in names))


if __name__ == "__main__":
    main()
