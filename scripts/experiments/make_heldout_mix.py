"""A held-out labelled folder mixing simple digits on black with woven textures (8 classes).

Five digit classes (0-4: white-to-grey digits in a random font, size, position and rotation, on
black, drawn with Pillow's DejaVu fonts) and three woven-texture classes (nominal, a tiny local
defect, a subtle global change, from ``tokenbudget.data.textures`` with a generator seed no dev set
uses), written as ``DIR/train/CLASS/*.png`` and ``DIR/test/CLASS/*.png`` for ``tokenbudget eval
--data DIR``. Texture train and test images come from disjoint base fabrics.

    python scripts/experiments/make_heldout_mix.py DIR --train 40 --test 25 --seed 777
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tokenbudget.data.textures import TEXTURE_CLASSES, generate_texture_set

FONTS = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))


def digit_image(digit: int, rng: np.random.Generator, size: int = 224) -> Image.Image:
    canvas = Image.new("L", (size, size), 0)
    font = ImageFont.truetype(FONTS[int(rng.integers(len(FONTS)))], int(rng.integers(90, 170)))
    glyph = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(glyph)
    draw.text((size / 2, size / 2), str(digit), fill=int(rng.integers(170, 256)), font=font, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    dx, dy = (int(v) for v in rng.integers(-30, 31, size=2))
    canvas.paste(glyph, (dx, dy))
    return canvas.convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=40, help="train images per class")
    parser.add_argument("--test", type=int, default=25, help="test images per class")
    parser.add_argument("--seed", type=int, default=777)
    args = parser.parse_args()
    root = Path(args.out)
    rng = np.random.default_rng(args.seed)
    for split, count in (("train", args.train), ("test", args.test)):
        for d in range(5):
            folder = root / split / f"digit{d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                digit_image(d, rng).save(folder / f"{i:04d}.png")
        # disjoint base fabrics: another generator seed per split
        textures = generate_texture_set(count, 224, seed=args.seed * 10 + (split == "test"))
        for c, name in enumerate(TEXTURE_CLASSES):
            folder = root / split / f"texture-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(textures.images[textures.labels == c]):
                Image.fromarray(np.asarray(img)).save(folder / f"{i:04d}.png")


if __name__ == "__main__":
    main()
