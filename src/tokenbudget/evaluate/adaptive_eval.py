"""Adaptive patching in the quality harness: accuracy against mean tokens and FLOPs.

Three ways to spend fewer (or more) tokens per image, on the same test images and scored by the
same classifiers (k-NN and linear probe fit on *full-token* train features, as in
:mod:`.harness`):

* ``adaptive`` / ``adaptive-res``: each image at its own patch size (:class:`~tokenbudget.AdaptivePatch`
  with thresholds calibrated on the *train* images to a target mean token count), by resampling the
  patch embedding (``patch``) or by resizing the image to the same grid (``resolution``);
* ``fixed`` / ``fixed-res``: one patch size (or the matching input resolution) for every image;
* ``random-mix`` / ``random-mix-res``: the control for the score. The same patch sizes in the same
  shares as an adaptive row, but given to random images (seeded). An image's features depend only
  on its own patch size (groups run separately), so these rows are assembled from the per-image
  features of the fixed rows (the native size is the full model) without another forward; they
  appear when every size of the adaptive row also has a fixed row.

Features are the harness's: the class token joined with the mean of the other tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..adapters import find_adapter
from ..adaptive import calibrate, forward_features_list, native_patch_size
from ..config import AdaptivePatch
from ..data.eval_sets import EvalData
from ..flops import model_flops
from ..patch import apply, last_state, remove
from .features import extract_features
from .metrics import cosine_fidelity, knn_accuracy, linear_probe_accuracy


@dataclass
class AdaptiveRow:
    """One condition: how its tokens were chosen and what its features are worth."""

    method: str  # full, adaptive, adaptive-res, fixed, fixed-res
    target_tokens: float | None  # the calibration target (adaptive rows)
    patch_sizes: list[int]
    thresholds: list[float] | None
    mean_tokens: float  # measured mean patch tokens per test image (prefix excluded)
    size_shares: dict[int, float]  # patch size -> share of the test images
    flops_ratio: float  # mean block FLOPs per image over the full model's
    knn_acc: float
    linear_acc: float
    cosine: float  # test features vs full-token test features
    seconds: float  # wall time to embed the test images
    speedup: float  # full model's wall time over this one's (same process)

    def to_dict(self) -> dict:
        return asdict(self)


def pooled_features(tokens: Sequence[Tensor], num_prefix: int) -> Tensor:
    """[N, 2C]: the harness's feature (first token, mean of the non-prefix tokens) per sequence."""
    return torch.stack([torch.cat([t[0], t[num_prefix:].mean(dim=0)]) for t in tokens])


def adaptive_features(
    model: nn.Module, images: Tensor, batch_size: int = 32
) -> tuple[Tensor, list[int], list[int]]:
    """(features [N, 2C], patch tokens per image, patch size per image) of a model patched with
    ``tb.AdaptivePatch``."""
    feats, tokens, sizes = [], [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            seqs = forward_features_list(model, images[start : start + batch_size])
            state = last_state(model)
            feats.append(pooled_features(seqs, state.num_prefix))
            tokens += state.patch_tokens
            sizes += [int(p) for p in state.patch_sizes]
    return torch.cat(feats), tokens, sizes


def evaluate_adaptive(
    model: nn.Module,
    data: EvalData,
    *,
    targets: Sequence[float] = (128.0, 196.0),
    fixed_sizes: Sequence[int] = (28, 16),
    patch_sizes: Sequence[int] | None = None,
    modes: Sequence[str] = ("patch", "resolution"),
    batch_size: int = 32,
    k: int = 20,
    train_features: Tensor | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[AdaptiveRow]:
    """Rows for the full model, each fixed patch size and each calibrated target, in each mode.

    ``train_features`` (full-token train features, e.g. from the shared token cache) skips embedding
    the train images; the train images are still scored to calibrate the thresholds. ``seed`` seeds the random-mix
    control.
    """
    model = model.eval()
    native = native_patch_size(model)
    adapter = find_adapter(model)
    prefix = adapter.num_prefix
    dims = adapter.block_dims()
    height, width = (int(s) for s in data.test_images.shape[-2:])
    full_patches = (height // native) * (width // native)

    def flops_ratio(patch_tokens: list[int]) -> float:
        full = model_flops(full_patches + prefix, [full_patches + prefix] * len(dims), dims)
        per_image = [model_flops(n + prefix, [n + prefix] * len(dims), dims) / full for n in patch_tokens]
        return sum(per_image) / len(per_image)

    say = progress or (lambda message: None)
    if train_features is None:
        say("full-token train features")
        train_features = extract_features(model, data.train_images, batch_size)
    y_train, y_test = data.train_labels, data.test_labels
    k = min(k, len(y_train))
    say("full-token test features")
    start = time.perf_counter()
    test_full = extract_features(model, data.test_images, batch_size)
    full_seconds = time.perf_counter() - start

    def row(
        method: str,
        cfg: AdaptivePatch | None,
        feats: Tensor,
        tokens: list[int],
        sizes: list[int],
        seconds: float,
    ) -> AdaptiveRow:
        shares = {p: sizes.count(p) / len(sizes) for p in sorted(set(sizes), reverse=True)}
        return AdaptiveRow(
            method=method,
            target_tokens=None if cfg is None else cfg.target_tokens,
            patch_sizes=[native] if cfg is None else list(cfg.patch_sizes),
            thresholds=None
            if cfg is None or cfg.thresholds is None
            else [round(t, 6) for t in cfg.thresholds],
            mean_tokens=sum(tokens) / len(tokens),
            size_shares=shares,
            flops_ratio=flops_ratio(tokens),
            knn_acc=knn_accuracy(train_features, y_train, feats, y_test, k=k),
            linear_acc=linear_probe_accuracy(train_features, y_train, feats, y_test),
            cosine=cosine_fidelity(feats, test_full),
            seconds=seconds,
            speedup=full_seconds / seconds,
        )

    n_test = len(y_test)
    rows = [row("full", None, test_full, [full_patches] * n_test, [native] * n_test, full_seconds)]
    # Per-image features of every image at one patch size, per mode: the random-mix control reads them.
    per_size = {(mode, native): test_full for mode in modes}
    generator = torch.Generator().manual_seed(seed)
    configs: list[tuple[str, AdaptivePatch]] = []
    for mode in modes:
        suffix = "" if mode == "patch" else "-res"
        for patch in fixed_sizes:
            configs.append((f"fixed{suffix}", AdaptivePatch(patch_sizes=(patch,), mode=mode)))
        for target in targets:
            cfg = calibrate(
                model, data.train_images, target_tokens=target, patch_sizes=patch_sizes, mode=mode
            )
            configs.append((f"adaptive{suffix}", cfg))
    for method, cfg in configs:
        say(f"{method} {cfg.patch_sizes} target {cfg.target_tokens}")
        apply(model, cfg)
        try:
            start = time.perf_counter()
            feats, tokens, sizes = adaptive_features(model, data.test_images, batch_size)
            seconds = time.perf_counter() - start
        finally:
            remove(model)
        rows.append(row(method, cfg, feats, tokens, sizes, seconds))
        if method.startswith("fixed"):
            per_size[(cfg.mode, cfg.patch_sizes[0])] = feats
        elif all((cfg.mode, p) in per_size for p in set(sizes)):
            shuffled = [sizes[i] for i in torch.randperm(len(sizes), generator=generator).tolist()]
            mixed = torch.stack([per_size[(cfg.mode, p)][i] for i, p in enumerate(shuffled)])
            tokens_mixed = [tokens[sizes.index(p)] for p in shuffled]
            control = row(
                method.replace("adaptive", "random-mix"), cfg, mixed, tokens_mixed, shuffled, float("nan")
            )
            rows.append(control)
    return rows


def format_adaptive_table(rows: Sequence[AdaptiveRow]) -> str:
    header = (
        f"{'method':<15} {'target':>6} {'tokens':>7} {'FLOPs':>6} {'k-NN':>6} {'linear':>6} {'cosine':>7} "
        f"{'speedup':>7}  patch sizes (share of images)"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        target = f"{r.target_tokens:>6.0f}" if r.target_tokens is not None else f"{'-':>6}"
        shares = ", ".join(f"{p}px {100 * s:.0f}%" for p, s in r.size_shares.items())
        speedup = f"{r.speedup:>6.2f}x" if r.speedup == r.speedup else f"{'-':>7}"  # NaN: not timed
        lines.append(
            f"{r.method:<15} {target} {r.mean_tokens:>7.1f} {r.flops_ratio:>6.2f} {r.knn_acc:>6.3f} "
            f"{r.linear_acc:>6.3f} {r.cosine:>7.4f} {speedup}  {shares}"
        )
    return "\n".join(lines)


def cached_fashion_mnist_train_features(n_train: int, seed: int) -> Tensor:
    """Full-token train features of the embedded DINOv2 at 224 px on the balanced Fashion-MNIST
    subset that :func:`~tokenbudget.evaluate.load_eval_data` loads (``n_train // 10`` per class,
    ``seed``), from the shared token cache (:mod:`tokenbudget.data.token_cache`)."""
    from ..data.token_cache import dinov2_fashion_mnist_tokens

    tokens, _ = dinov2_fashion_mnist_tokens("train", n_train // 10, seed)
    return pooled_features(tokens, num_prefix=1)
