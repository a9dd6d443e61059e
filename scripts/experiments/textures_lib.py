"""Shared plumbing of the ``textures_*`` experiment scripts: datasets, cached features, scored rows.

Features are the harness's (class token ++ size-weighted mean of the other tokens, from
:func:`tokenbudget.evaluate.features.extract_features`), computed once per (dataset, split,
config) and cached under ``$TOKENBUDGET_CACHE/features``: rerunning a script recomputes nothing
it already has. Every reduced condition is scored against classifiers fitted on full-token train
features, on both the harness feature and the class token alone, with the standard error of each
accuracy (binomial, ``sqrt(p (1 - p) / n)``) and the bias diagnostic of
:mod:`tokenbudget.evaluate.shift`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import tokenbudget as tb
from tokenbudget.config import ReductionConfig
from tokenbudget.data.eval_sets import EvalData, load_eval_data
from tokenbudget.data.images import model_normalization
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.evaluate.features import extract_features
from tokenbudget.evaluate.metrics import cosine_fidelity, knn_accuracy, linear_probe_accuracy
from tokenbudget.evaluate.shift import feature_shift

EMBED = 384  # DINOv2-S width: the class token is the first EMBED columns of a harness feature


def cache_root() -> Path:
    root = os.environ.get("TOKENBUDGET_CACHE") or os.path.join(Path.home(), ".cache", "tokenbudget")
    path = Path(root) / "features"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_data(name: str, model: torch.nn.Module, n_train: int, n_test: int, seed: int = 0) -> EvalData:
    """``textures`` (test set, seed ``seed``), ``textures-val`` (a disjoint validation set: another
    generator seed), ``anomaly``, ``fashion-mnist``, ``skimage``; validation sets for choosing a
    design: ``anomaly-val`` (another generator seed) and ``fashion-mnist-val`` (train and
    validation images both from Fashion-MNIST's *train* split, disjoint; the test split unseen)."""
    mean, std = model_normalization(model)
    if name == "anomaly-val":
        data = load_eval_data("anomaly", 224, mean, std, n_train=n_train, n_test=n_test, seed=seed + 1)
        data.name = f"anomaly-val-s{seed + 1}"
        return data
    if name == "fashion-mnist-val":
        from tokenbudget.data import fashion_mnist_subset, to_model_input

        per_train, per_val = n_train // 10, n_test // 10
        images, labels = fashion_mnist_subset("train", per_train + per_val, seed + 7)
        rank = torch.zeros(len(labels), dtype=torch.long)  # position of each image within its class
        for c in range(10):
            rows = (labels == c).nonzero()[:, 0]
            rank[rows] = torch.arange(len(rows))
        train = rank < per_train
        x = to_model_input(images, 224, mean, std)
        return EvalData(f"fashion-mnist-val-s{seed + 7}", x[train], labels[train], x[~train], labels[~train])
    if name in ("textures", "textures-val"):
        from tokenbudget.data.textures import texture_tensors

        gen_seed = seed if name == "textures" else seed + 1000
        tr_x, tr_y, te_x, te_y = texture_tensors(
            224, mean, std, n_train=n_train, n_test=n_test, seed=gen_seed
        )
        return EvalData(f"{name}-s{gen_seed}", tr_x, tr_y, te_x, te_y)
    data = load_eval_data(name, 224, mean, std, n_train=n_train, n_test=n_test, seed=seed)
    data.name = f"{data.name}-s{seed}"
    return data


#: methods still under development: their cached features are keyed by their source code too
_DEVELOPING = {
    "auto": ("strategies/auto.py", "ops/merge.py", "ops/match.py", "ops/energy.py"),
    "pitome": ("strategies/pitome.py", "ops/energy.py", "ops/merge.py"),
}


def _code_version(config: ReductionConfig | None) -> str | None:
    files = _DEVELOPING.get(getattr(config, "method", ""))
    if not files:
        return None
    root = Path(tb.__file__).parent
    digest = hashlib.sha256()
    for name in files:
        path = root / name
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _key(data: EvalData, split: str, config: ReductionConfig | None, batch_size: int) -> str:
    images = data.train_images if split == "train" else data.test_images
    labels = data.train_labels if split == "train" else data.test_labels
    spec = {
        "data": data.name,
        "split": split,
        "n": len(images),
        "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:12],
        "pixels": float(images[:, :, ::37, ::37].double().sum()),
        "config": None if config is None else config.to_dict(),
        "batch": batch_size,
        "code": _code_version(config),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def features(
    model: torch.nn.Module,
    data: EvalData,
    split: str,
    config: ReductionConfig | None,
    batch_size: int = 32,
) -> torch.Tensor:
    """[N, 2C] harness features of ``split`` ('train' or 'test') under ``config`` (None: full), cached."""
    path = cache_root() / f"{_key(data, split, config, batch_size)}.pt"
    if path.exists():
        return torch.load(path)
    images = data.train_images if split == "train" else data.test_images
    label = "full" if config is None else json.dumps(config.to_dict())
    start = time.time()
    if config is not None:
        tb.apply(model, config)
    try:
        feats = extract_features(model, images, batch_size)
    finally:
        if config is not None:
            tb.remove(model)
    log(f"{data.name} {split} {label}: {len(images)} images in {time.time() - start:.0f} s")
    torch.save(feats, path)
    return feats


def se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` on ``n`` test images."""
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


@dataclass
class Scores:
    label: str
    knn: float
    knn_cls: float
    linear: float
    cosine: float
    cosine_cls: float
    shift: float  # largest |fraction| of a class gap covered by the mean shift (harness feature)
    shift_cls: float  # the same on the class token alone
    n_test: int
    knn_correct: torch.Tensor | None = None  # [M] bool, for paired comparisons

    @property
    def knn_se(self) -> float:
        return se(self.knn, self.n_test)


def knn_predictions(
    train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, k: int = 20
) -> torch.Tensor:
    """[M] predicted labels of the weighted cosine k-NN (as :func:`knn_accuracy`), for paired tests."""
    train_n = torch.nn.functional.normalize(train.float(), dim=1)
    test_n = torch.nn.functional.normalize(test.float(), dim=1)
    sims = test_n @ train_n.T
    top, idx = sims.topk(k, dim=1)
    weights = ((top - top[:, :1]) / 0.07).exp()
    votes = torch.zeros(len(test), int(y_train.max()) + 1).scatter_add_(1, y_train[idx], weights)
    return votes.argmax(1)


class Scorer:
    """Scores reduced test features of one dataset against its full-token train features."""

    def __init__(self, model: torch.nn.Module, data: EvalData, k: int = 20, linear: bool = True) -> None:
        self.model, self.data, self.k, self.with_linear = model, data, min(k, len(data.train_labels)), linear
        self.train = features(model, data, "train", None)
        self.test_full = features(model, data, "test", None)
        self.full = self._score("full", self.test_full)

    def _score(self, label: str, test: torch.Tensor) -> Scores:
        d, k = self.data, self.k
        y_tr, y_te = d.train_labels, d.test_labels
        cls_tr, cls_te, cls_full = self.train[:, :EMBED], test[:, :EMBED], self.test_full[:, :EMBED]
        correct = knn_predictions(self.train, y_tr, test, k) == y_te
        return Scores(
            label=label,
            knn=knn_accuracy(self.train, y_tr, test, y_te, k=k),
            knn_cls=knn_accuracy(cls_tr, y_tr, cls_te, y_te, k=k),
            linear=linear_probe_accuracy(self.train, y_tr, test, y_te) if self.with_linear else float("nan"),
            cosine=cosine_fidelity(test, self.test_full),
            cosine_cls=cosine_fidelity(cls_te, cls_full),
            shift=feature_shift(self.train, y_tr, self.test_full, test).worst,
            shift_cls=feature_shift(cls_tr, y_tr, cls_full, cls_te).worst,
            n_test=len(y_te),
            knn_correct=correct,
        )

    def features(self, config: ReductionConfig) -> torch.Tensor:
        """[M, 2C] reduced test features under ``config`` (cached)."""
        return features(self.model, self.data, "test", config)

    def score(self, label: str, config: ReductionConfig) -> Scores:
        return self._score(label, features(self.model, self.data, "test", config))

    def score_mean(self, label: str, configs: list[ReductionConfig]) -> Scores:
        """The mean of the scores of several configs (random drop over seeds)."""
        rows = [self.score(label, c) for c in configs]
        mean = {
            f: sum(getattr(r, f) for r in rows) / len(rows)
            for f in ("knn", "knn_cls", "linear", "cosine", "cosine_cls", "shift", "shift_cls")
        }
        return Scores(label=label, n_test=rows[0].n_test, knn_correct=None, **mean)


HEADER = (
    f"{'method':<22} {'k-NN':>6} {'(SE)':>5} {'kNN-cls':>7} {'linear':>6} {'cosine':>7} {'cos-cls':>7} "
    f"{'shift':>6} {'sh-cls':>6}"
)


def format_row(s: Scores) -> str:
    return (
        f"{s.label:<22} {s.knn:>6.3f} {s.knn_se:>5.3f} {s.knn_cls:>7.3f} {s.linear:>6.3f} {s.cosine:>7.4f} "
        f"{s.cosine_cls:>7.4f} {s.shift:>6.3f} {s.shift_cls:>6.3f}"
    )


def keeps(model: torch.nn.Module, speedups: list[float]) -> dict[float, float]:
    return {s: keep_for_flops_speedup(model, s) for s in speedups}
