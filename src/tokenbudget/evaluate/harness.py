"""The quality harness: accuracy and fidelity of reduced features against full tokens, with speed.

For each method and budget the backbone is patched, the *test* images are embedded with reduced
tokens, and scored by classifiers fit on *full-token* training features (k-NN and a linear
probe): the accuracy a deployed classifier keeps when the backbone is reduced under it.
Features are the class token concatenated with the size-weighted mean of the other tokens.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..bench.run import bench
from ..config import ReductionConfig, config_class
from ..patch import apply, is_patched, last_state, remove
from . import distributed as dist_utils
from .metrics import cosine_fidelity, knn_accuracy, linear_probe_accuracy


@dataclass
class EvalData:
    """Images [N, 3, H, W] (normalized for the model) and labels [N] for train and test."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class EvalRow:
    """Scores of one (method, keep) condition against full tokens."""

    method: str
    keep: float
    config: dict
    knn_acc: float
    knn_drop: float
    linear_acc: float
    linear_drop: float
    cosine: float
    img_s: float
    speedup: float
    flops_ratio: float
    peak_mb: float | None
    final_tokens: int
    knn_k: int

    def to_dict(self) -> dict:
        return asdict(self)


def method_config(method: str, keep: float, options: dict | None = None) -> ReductionConfig:
    """The config of ``method`` that leaves ``keep`` of the non-prefix tokens after the last block.

    For the pruning methods (``prune``, ``dynamicvit``) ``keep`` is their per-stage keep ratio, so
    the same ``keep`` leaves fewer tokens than ToMe's; every row reports its FLOPs for a fair
    comparison. ``options`` are further keyword arguments of the config (e.g. ``predictor``).
    """
    cls = config_class(method)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return cls(keep=keep, **(options or {}))


def keep_for_flops_speedup(model: nn.Module, speedup: float) -> float:
    """The ``keep`` whose per-layer schedule gives ``model`` a FLOPs-ideal speedup of ``speedup``
    at its default input (all our scheduled methods share the schedule, hence the FLOPs).

    Found by bisection on ``keep`` to 1e-4; ``ValueError`` for a speedup no schedule reaches.
    """
    from itertools import accumulate

    from ..adapters import find_adapter
    from ..config import BudgetConfig
    from ..flops import block_dims, ideal_speedup
    from ..strategies import ScheduledStrategy

    adapter = find_adapter(model)
    tokens, prefix, layers = adapter.default_num_tokens, adapter.num_prefix, adapter.num_layers
    if tokens is None:
        raise ValueError("the model has no default patch grid; give --keep values instead of a speedup")
    dims = [block_dims(block) for block in adapter.blocks]

    def achieved(keep: float) -> float:
        _, merged = ScheduledStrategy(BudgetConfig(keep=keep), layers).compute_plan(tokens, prefix)
        per_layer = list(accumulate(merged, lambda n, r: n - r, initial=tokens))[1:]
        return ideal_speedup(tokens, per_layer, dims)

    def feasible(keep: float) -> bool:
        try:
            achieved(keep)
        except ValueError:  # fewer tokens than the blocks can reach
            return False
        return True

    # The fastest schedule: the smallest feasible keep (bisection on feasibility).
    lo, hi = 1.0 / (tokens - prefix), 1.0
    if not feasible(lo):
        while hi - lo > 1e-4:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if feasible(mid) else (mid, hi)
        lo = hi
    fastest = achieved(lo)
    if speedup < 1.0 or speedup > fastest:
        raise ValueError(
            f"a FLOPs-ideal speedup of {speedup} is out of reach for this model: choose one in [1, {fastest:.2f}]"
        )
    if speedup <= 1.0 + 1e-9:
        return 1.0
    hi = 1.0
    while hi - lo > 1e-4:  # achieved() falls as keep grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if achieved(mid) >= speedup else (lo, mid)
    return round(lo, 4)


def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[N, 2C] features: class token and size-weighted mean of the non-prefix tokens (normed output).

    Under ``torchrun`` each rank embeds a contiguous run of whole batches (the batches a single
    process would form, so batch-dependent reductions such as random drop match it exactly) and
    every rank receives the full [N, 2C] in the original order.
    """
    prefix = model.num_prefix_tokens
    patched = is_patched(model)
    lo, hi = 0, len(images)
    distributed = dist_utils.is_active()
    if distributed:
        n_batches = -(-len(images) // batch_size)
        b_lo, b_hi = dist_utils.shard_bounds(n_batches, dist_utils.rank(), dist_utils.world_size())
        lo, hi = min(b_lo * batch_size, len(images)), min(b_hi * batch_size, len(images))
    out = []
    with torch.inference_mode():
        for start in range(lo, hi, batch_size):
            tokens = model.forward_features(images[start : start + batch_size])  # [b, N', C]
            if patched:
                sizes = last_state(model).sizes[:, prefix:, None].to(tokens.dtype)
            else:
                sizes = torch.ones_like(tokens[:, prefix:, :1])
            mean = (tokens[:, prefix:] * sizes).sum(1) / sizes.sum(1)
            out.append(torch.cat([tokens[:, 0], mean], dim=1))
            if progress is not None:
                progress(1)
    if not distributed:
        return torch.cat(out)
    if out:
        local = torch.cat(out)
    else:  # more ranks than batches: this rank holds an empty block of the right width and dtype
        param = next(model.parameters())
        local = torch.empty(0, 2 * model.embed_dim, dtype=param.dtype, device=param.device)
    return dist_utils.gather_rows(local, len(images))


def evaluate(
    model: nn.Module,
    data: EvalData,
    methods: Sequence[str] = ("tome", "random", "pool"),
    keeps: Sequence[float] = (1.0, 0.5, 0.25),
    *,
    batch_size: int = 64,
    k: int = 20,
    speed_batch_size: int = 32,
    speed_samples: int = 5,
    progress: Callable[[int], None] | None = None,
    method_options: dict[str, dict] | None = None,
) -> list[EvalRow]:
    """Score every (method, keep) on ``data``; ``keep=1.0`` is the full model, listed once.

    ``method_options`` maps a method name to further config options (e.g. ``{"dynamicvit":
    {"predictor": path}}``)."""
    method_options = method_options or {}
    configs = [
        (m, kp, method_config(m, kp, method_options.get(m))) for kp in keeps for m in methods if kp < 1.0
    ]
    model = model.eval()
    if dist_utils.maybe_init_distributed():
        dist_utils.broadcast_module(model)  # every rank embeds with rank 0's weights (random ones too)
    train_full = extract_features(model, data.train_images, batch_size, progress)
    test_full = extract_features(model, data.test_images, batch_size, progress)
    y_train, y_test = data.train_labels, data.test_labels
    # Small folders can hold fewer training images than k neighbours: use them all, and say so (knn_k).
    k = min(k, len(y_train))
    knn_full = knn_accuracy(train_full, y_train, test_full, y_test, k=k)
    lin_full = linear_probe_accuracy(train_full, y_train, test_full, y_test)

    # Timing is per machine, not per shard: rank 0 measures alone (the others wait, so they do not
    # compete for its cores) and shares its rows, so every rank builds the same EvalRows.
    speed, failure = None, None
    if dist_utils.is_main():
        try:
            speed = bench(
                model,
                [cfg for _, _, cfg in configs],
                model_name=data.name,
                batch_sizes=(speed_batch_size,),
                samples=speed_samples,
                warmup=1,
                ceiling=False,
            )
        except Exception as err:
            if not dist_utils.is_active():
                raise
            failure = err  # reach the barrier first, so that the other ranks fail instead of hanging
    if dist_utils.is_active():
        dist_utils.barrier()
        speed, message = dist_utils.broadcast_object(
            (speed, None if failure is None else f"{type(failure).__name__}: {failure}")
        )
        if failure is not None:
            raise failure
        if message is not None:
            raise RuntimeError(f"the speed benchmark failed on rank 0: {message}")
    num_tokens = speed[0].input_tokens if speed else None
    rows = []
    if 1.0 in keeps:
        rows.append(
            EvalRow(
                method="full",
                keep=1.0,
                config={},
                knn_acc=knn_full,
                knn_drop=0.0,
                linear_acc=lin_full,
                linear_drop=0.0,
                cosine=1.0,
                img_s=speed[0].baseline_img_s if speed else float("nan"),
                speedup=1.0,
                flops_ratio=1.0,
                peak_mb=speed[0].baseline_peak_mb if speed else None,
                final_tokens=num_tokens or 0,
                knn_k=k,
            )
        )
    for (method, keep, cfg), row in zip(configs, speed, strict=True):
        apply(model, cfg)
        try:
            test_reduced = extract_features(model, data.test_images, batch_size, progress)
        finally:
            remove(model)
        knn = knn_accuracy(train_full, y_train, test_reduced, y_test, k=k)
        lin = linear_probe_accuracy(train_full, y_train, test_reduced, y_test)
        rows.append(
            EvalRow(
                method=method,
                keep=keep,
                config=cfg.to_dict(),
                knn_acc=knn,
                knn_drop=100 * (knn_full - knn),
                linear_acc=lin,
                linear_drop=100 * (lin_full - lin),
                cosine=cosine_fidelity(test_reduced, test_full),
                img_s=row.patched_img_s,
                speedup=row.speedup,
                flops_ratio=row.flops_ratio,
                peak_mb=row.patched_peak_mb,
                final_tokens=row.final_tokens,
                knn_k=k,
            )
        )
    return rows


def format_eval_table(rows: Sequence[EvalRow]) -> str:
    header = (
        f"{'method':<12} {'keep':>5} {'tokens':>6} {'FLOPs':>6} {'k-NN':>7} {'drop':>6} {'linear':>7} {'drop':>6} "
        f"{'cosine':>7} {'img/s':>7} {'speedup':>7} {'MB':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        mb = f"{r.peak_mb:>7.1f}" if r.peak_mb is not None else f"{'-':>7}"
        lines.append(
            f"{r.method:<12} {r.keep:>5.2f} {r.final_tokens:>6} {r.flops_ratio:>6.2f} {r.knn_acc:>7.3f} {r.knn_drop:>6.1f} "
            f"{r.linear_acc:>7.3f} {r.linear_drop:>6.1f} {r.cosine:>7.4f} {r.img_s:>7.1f} {r.speedup:>6.2f}x {mb}"
        )
    return "\n".join(lines)


def rows_to_csv(rows: Sequence[EvalRow]) -> str:
    buffer = io.StringIO()
    names = [f for f in EvalRow.__dataclass_fields__ if f != "config"]
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for r in rows:
        writer.writerow({n: getattr(r, n) for n in names})
    return buffer.getvalue()


def pareto_plot(rows: Sequence[EvalRow], path: str, metric: str = "knn_acc") -> None:
    """Accuracy against measured speedup, one line per method (full tokens as the common start)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the Pareto plot needs matplotlib: pip install 'tokenbudget[plots]'") from None
    full = [r for r in rows if r.method == "full"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r.method for r in rows if r.method != "full"):
        pts = full + sorted((r for r in rows if r.method == method), key=lambda r: r.speedup)
        ax.plot([r.speedup for r in pts], [getattr(r, metric) for r in pts], marker="o", label=method)
        for r in pts[len(full) :]:
            ax.annotate(f"keep {r.keep:g}", (r.speedup, getattr(r, metric)), fontsize=7)
    ax.set_xlabel("measured speedup over full tokens")
    ax.set_ylabel({"knn_acc": "k-NN accuracy", "linear_acc": "linear-probe accuracy"}.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_eval_data(
    source: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    n_train: int = 1000,
    n_test: int = 500,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> EvalData:
    """``"fashion-mnist"`` (offline Debian copy, a balanced seeded subset of ``n_train``/``n_test``
    images), ``"skimage"`` (:func:`skimage_crops`), ``"anomaly"`` / ``"anomaly-small"``
    (:func:`anomaly_data`, flaws at full and half size), or a directory: Fashion-MNIST IDX files, or
    an image folder with one subfolder per class."""
    from pathlib import Path

    from ..data import fashion_mnist_subset, load_image_folder, load_images, to_model_input

    def fashion(root: str | None) -> EvalData:
        if n_train < 10 or n_test < 10:
            raise ValueError(
                "Fashion-MNIST subsets need at least 10 train and 10 test images (one per class)"
            )
        tr_x, tr_y = fashion_mnist_subset("train", n_train // 10, seed, root)
        te_x, te_y = fashion_mnist_subset("test", n_test // 10, seed, root)
        return EvalData(
            "fashion-mnist",
            to_model_input(tr_x, size, mean, std),
            tr_y,
            to_model_input(te_x, size, mean, std),
            te_y,
        )

    if source == "fashion-mnist":
        return fashion(None)
    if source == "skimage":
        return skimage_crops(size, mean, std, seed=seed)
    if source in ("anomaly", "anomaly-small"):
        return anomaly_data(
            size,
            mean,
            std,
            n_train=n_train,
            n_test=n_test,
            seed=seed,
            scale=1.0 if source == "anomaly" else 0.5,
        )
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"no dataset at {source!r}; give 'fashion-mnist' or a directory (image folder or IDX files)"
        )
    if any(path.glob("*-idx?-ubyte*")):
        return fashion(str(path))
    folder = load_image_folder(path, test_fraction=test_fraction, seed=seed)
    tr_x, tr_y = load_images(folder.train, size, mean, std)
    te_x, te_y = load_images(folder.test, size, mean, std)
    return EvalData(path.name or str(path), tr_x, tr_y, te_x, te_y)


def skimage_crops(
    size: int, mean: Sequence[float], std: Sequence[float], *, crops_per_image: int = 8, seed: int = 0
) -> EvalData:
    """Label-free data from scikit-image's bundled photos: random crops (30-80 % of the shorter side),
    labelled by the photo they come from, alternately train and test. k-NN then measures whether
    reduced features still retrieve crops of the same photo; cosine measures fidelity."""
    import numpy as np
    from PIL import Image

    from ..data import SAMPLE_IMAGES, load_image, preprocess

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(SAMPLE_IMAGES):
        photo = load_image(f"skimage:{name}")
        w, h = photo.size
        for _ in range(crops_per_image):
            side = int(min(w, h) * rng.uniform(0.3, 0.8))
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize(
                (size, size), Image.Resampling.BICUBIC
            )
            images.append(preprocess(crop, size, mean, std))
            labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    train = torch.arange(len(y)) % 2 == 0
    return EvalData("skimage-crops", x[train], y[train], x[~train], y[~train])


def anomaly_data(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    n_train: int = 400,
    n_test: int = 200,
    seed: int = 0,
    scale: float = 1.0,
) -> EvalData:
    """The detail-decided anomaly set (:mod:`tokenbudget.data.anomaly`): textures labelled clean /
    spot / scratch / flaw, every base crop in all four classes, train and test from disjoint base
    crops (``n_train // 4`` and ``n_test // 4`` of them). Generated once per setting and cached."""
    from ..data.anomaly import anomaly_set
    from ..data.images import rgb_uint8_to_model_input

    if n_train < 4 or n_test < 4:
        raise ValueError("the anomaly set needs at least 4 train and 4 test images (one per class)")
    n_train_base, n_test_base = n_train // 4, n_test // 4
    data = anomaly_set(n_train_base + n_test_base, size, seed, scale)
    x = rgb_uint8_to_model_input(data.images, mean, std)  # [N, 3, S, S]
    y = torch.from_numpy(data.labels)
    train = torch.from_numpy(data.base_ids) < n_train_base
    name = "anomaly" if scale == 1.0 else f"anomaly-x{scale:g}"
    return EvalData(name, x[train], y[train], x[~train], y[~train])
