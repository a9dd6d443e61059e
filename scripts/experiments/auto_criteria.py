"""Choosing Auto's averaging criterion on validation sets only (never a test split).

Validation sets: woven textures from generator seed 1000 (the texture test set is seed 0),
Fashion-MNIST train-split images only (train and validation disjoint; the test split unseen), and
inspection surfaces from generator seed 1 (the anomaly test set is seed 0). Every method at the
same per-layer counts (FLOPs-ideal ``--speedup``); k-NN (k=20, cosine) and a linear probe fit on
full-token train features; the class-gap shift of ``tokenbudget eval --shift``. Features are cached
under ``$TOKENBUDGET_CACHE/features-alloc`` (keyed by data, split, config and the reducer sources).

    nice -n 10 python scripts/experiments/auto_criteria.py --speedup 2 --n 240 > out.txt
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import tokenbudget as tb
from tokenbudget.data.eval_sets import EvalData, load_eval_data
from tokenbudget.data.images import model_normalization
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.evaluate.features import extract_features
from tokenbudget.evaluate.metrics import cosine_fidelity, knn_accuracy, linear_probe_accuracy
from tokenbudget.evaluate.shift import feature_shift

SOURCES = ("strategies/auto.py", "ops/gated_merge.py", "ops/merge.py", "ops/match.py", "strategies/tofu.py")
#: sources only Auto and AutoDrop run: other methods' cache keys hash them as of PIN, so that a change
#: to Auto does not recompute ToMe, ToFu, random and pool
AUTO_ONLY = ("strategies/auto.py", "ops/gated_merge.py")
PINS = ("216449e", "cef88ee")  # these commits' Auto sources, for the keys of the other methods


@functools.cache
def pinned_source(name: str, pin: str) -> bytes:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["git", "show", f"{pin}:src/tokenbudget/{name}"], cwd=root, capture_output=True, check=True
    ).stdout


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load(name: str, model: torch.nn.Module, n_train: int, n_test: int) -> EvalData:
    mean, std = model_normalization(model)
    if name == "textures-val":
        from tokenbudget.data.textures import texture_tensors

        tr_x, tr_y, te_x, te_y = texture_tensors(224, mean, std, n_train=n_train, n_test=n_test, seed=1000)
        return EvalData("textures-val-s1000", tr_x, tr_y, te_x, te_y)
    if name == "anomaly-val":
        data = load_eval_data("anomaly", 224, mean, std, n_train=n_train, n_test=n_test, seed=1)
        data.name = "anomaly-val-s1"
        return data
    if name == "fashion-mnist-val":
        from tokenbudget.data import fashion_mnist_subset, to_model_input

        per_train, per_val = n_train // 10, n_test // 10
        images, labels = fashion_mnist_subset("train", per_train + per_val, 7)
        rank = torch.zeros(len(labels), dtype=torch.long)
        for c in range(10):
            rows = (labels == c).nonzero()[:, 0]
            rank[rows] = torch.arange(len(rows))
        train = rank < per_train
        x = to_model_input(images, 224, mean, std)
        return EvalData("fashion-mnist-val-s7", x[train], labels[train], x[~train], labels[~train])
    if name.startswith("folder:"):  # a held-out labelled folder (for confirming, never for choosing)
        data = load_eval_data(name[len("folder:") :], 224, mean, std)
        data.name = name
        return data
    if name.startswith("test:"):  # a dev set's test split (for confirming, never for choosing)
        data = load_eval_data(name[len("test:") :], 224, mean, std, n_train=n_train, n_test=n_test, seed=0)
        data.name = name
        return data
    raise ValueError(f"unknown validation set {name!r}")


def cached_features(
    model: torch.nn.Module, data: EvalData, split: str, config: object | None
) -> torch.Tensor:
    root = (
        Path(os.environ.get("TOKENBUDGET_CACHE") or Path.home() / ".cache" / "tokenbudget") / "features-alloc"
    )
    root.mkdir(parents=True, exist_ok=True)
    images = data.train_images if split == "train" else data.test_images
    method = None if config is None else config.to_dict().get("method")
    # Methods other than Auto never read AUTO_ONLY: their key hashes those files at any of PINS
    # (the first for new entries), so a change to Auto does not recompute ToMe, ToFu, random, pool.
    pins = (None,) if method in ("auto", "auto-drop") else PINS
    paths = []
    for pin in pins:
        code = hashlib.sha256()
        for name in SOURCES:
            if pin is not None and name in AUTO_ONLY:
                code.update(pinned_source(name, pin))
            else:
                code.update((Path(tb.__file__).parent / name).read_bytes())
        spec = {
            "data": data.name,
            "split": split,
            "n": len(images),
            "pixels": float(images[:, :, ::37, ::37].double().sum()),
            "config": None if config is None else config.to_dict(),
            "code": None if config is None else code.hexdigest()[:12],
        }
        paths.append(
            root / (hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20] + ".pt")
        )
    for path in paths:
        if path.exists():
            return torch.load(path)
    path = paths[0]
    start = time.time()
    if config is not None:
        tb.apply(model, config)
    try:
        feats = extract_features(model, images, 32)
    finally:
        if config is not None:
            tb.remove(model)
    log(f"{data.name} {split} {spec['config']}: {len(images)} images in {time.time() - start:.0f} s")
    torch.save(feats, path)
    return feats


def candidates(keep: float) -> dict[str, object]:
    out = {
        "tome": tb.ToMe(keep=keep),
        "auto": tb.Auto(keep=keep),
        "auto-drop": tb.AutoDrop(keep=keep),
        "tofu": tb.ToFu(keep=keep),
        "random": tb.RandomDrop(keep=keep),
        "pool": tb.GridPool(keep=keep),
    }
    for t in (0.008, 0.012, 0.014, 0.016, 0.02, 0.03):
        for fuse in ("mean", "mlerp"):
            out[f"dispersion {t} {fuse}"] = tb.Auto(keep=keep, rule="dispersion", threshold=t, fuse=fuse)
    for z in (0.0, 0.5, 1.0):
        out[f"outlier {z}"] = tb.Auto(keep=keep, rule="outlier", threshold=z)
    for t in (0.8, 0.9, 0.95):
        out[f"distinct {t}"] = tb.Auto(keep=keep, rule="distinct", threshold=t)
        out[f"duplicate {t}"] = tb.Auto(keep=keep, rule="duplicate", threshold=t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--n", type=int, default=240, help="train and validation images per set")
    parser.add_argument("--n-sets", default="", help="per-set sizes, e.g. fashion-mnist-val=120")
    parser.add_argument("--sets", default="textures-val,fashion-mnist-val,anomaly-val")
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tb.models.dinov2_small().eval()
    keep = keep_for_flops_speedup(model, args.speedup)
    chosen = candidates(keep)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    print(
        f"FLOPs-ideal {args.speedup}x (keep {keep:.4f}); k-NN k=20 and linear probe on full-token train features"
    )
    for name in args.sets.split(","):
        sizes = dict(item.split("=") for item in args.n_sets.split(",") if item)
        n_set = int(sizes.get(name, args.n))
        data = load(name, model, n_set, n_set)
        n = len(data.test_labels)
        tr = cached_features(model, data, "train", None)
        te = cached_features(model, data, "test", None)
        k = min(20, len(tr))
        full_knn = knn_accuracy(tr, data.train_labels, te, data.test_labels, k=k)
        full_lin = linear_probe_accuracy(tr, data.train_labels, te, data.test_labels)
        se = 100 * math.sqrt(0.25 / n)
        print(f"\n{data.name}: {len(tr)} train / {n} validation images (binomial SE <= {se:.1f} points)")
        print(f"  {'method':<22} {'k-NN':>6} {'linear':>6} {'cosine':>7} {'shift':>6}")
        print(f"  {'full':<22} {full_knn:>6.3f} {full_lin:>6.3f} {1:>7.4f} {0:>6.3f}")
        for label, cfg in chosen.items():
            red = cached_features(model, data, "test", cfg)
            knn = knn_accuracy(tr, data.train_labels, red, data.test_labels, k=k)
            lin = linear_probe_accuracy(tr, data.train_labels, red, data.test_labels)
            shift = feature_shift(tr, data.train_labels, te, red).worst
            print(
                f"  {label:<22} {knn:>6.3f} {lin:>6.3f} {cosine_fidelity(red, te):>7.4f} {shift:>6.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
