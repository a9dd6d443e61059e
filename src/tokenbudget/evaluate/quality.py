"""The quality harness: accuracy and fidelity of reduced features against full tokens, with speed.

For each method and budget the backbone is patched, the *test* images are embedded with reduced
tokens, and scored by classifiers fit on *full-token* training features (k-NN and a linear
probe): the accuracy a deployed classifier keeps when the backbone is reduced under it.
Features are the class token concatenated with the size-weighted mean of the other tokens
(:func:`~tokenbudget.evaluate.features.extract_features`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from ..bench.run import bench
from ..config import ReductionConfig
from ..data.eval_sets import EvalData
from ..patch import apply, remove
from . import distributed as dist_utils
from .budgets import method_config
from .features import extract_features
from .metrics import cosine_fidelity, knn_accuracy, linear_probe_accuracy
from .oracle import OracleHeadroom, level_features, oracle_headroom
from .per_image_eval import Judges, calibrate_in_run, per_image_mean_flops
from .shift import feature_shift


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
    #: bias diagnostic (``evaluate(shift=True)``): the largest fraction of a class gap that the mean
    #: feature shift covers (:func:`tokenbudget.evaluate.shift.feature_shift`); 0 for full tokens
    shift: float | None = None
    #: per-image rows: the oracle's k-NN and linear accuracy at the same mean FLOPs (each test image at
    #: the level its classifier is right at, cheapest first; an upper bound, see
    #: :mod:`tokenbudget.evaluate.oracle`); ``None`` for other rows
    oracle_knn: float | None = None
    oracle_linear: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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
    shift: bool = False,
) -> list[EvalRow]:
    """Score every (method, keep) on ``data``; ``keep=1.0`` is the full model, listed once.

    ``method_options`` maps a method name to further config options (e.g. ``{"dynamicvit":
    {"predictor": path}}``). ``progress`` is called with 1 after each batch of features (train,
    test, then test again per condition) and each timed sample (after the full-token features).
    ``shift``: also measure the bias diagnostic of each condition
    (:attr:`EvalRow.shift`; needs at least two classes in the train labels)."""
    method_options = method_options or {}
    if shift and len(data.train_labels.unique()) < 2:
        raise ValueError(
            f"shift measures the feature shift along between-class directions and needs at least two "
            f"classes in the train labels; {data.name} has {len(data.train_labels.unique())}"
        )
    model = model.eval()
    # Per-image budgets (tb.PerImage) are calibrated here, on the train split, at each budget.
    configs = [
        (m, kp, calibrate_in_run(model, method_config(m, kp, method_options.get(m)), data.train_images))
        for kp in keeps
        for m in methods
        if kp < 1.0
    ]
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
                progress=progress,
                # per-image budgets depend on the content: time everything on real test images
                inputs=data.test_images if any(c.method == "per-image" for _, _, c in configs) else None,
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
                shift=0.0 if shift else None,
            )
        )
    judges, level_cache = None, {}
    for (method, keep, cfg), row in zip(configs, speed, strict=True):
        apply(model, cfg)
        try:
            test_reduced = extract_features(model, data.test_images, batch_size, progress)
        finally:
            remove(model)
        oracle = None
        if cfg.method == "per-image":
            judges = judges or Judges.fit(train_full, y_train, test_full, y_test, k=k)
            oracle = per_image_oracle(model, cfg, data.test_images, judges, batch_size, level_cache)
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
                # per-image: the mean over every test image, not only over the timed batch
                flops_ratio=(
                    per_image_mean_flops(model, cfg, data.test_images, batch_size)
                    if cfg.method == "per-image"
                    else row.flops_ratio
                ),
                peak_mb=row.patched_peak_mb,
                final_tokens=row.final_tokens,
                knn_k=k,
                shift=feature_shift(train_full, y_train, test_full, test_reduced).worst if shift else None,
                oracle_knn=None if oracle is None else oracle.knn_acc,
                oracle_linear=None if oracle is None else oracle.linear_acc,
            )
        )
    return rows


def per_image_oracle(
    model: nn.Module,
    config: ReductionConfig,
    test_images: Tensor,
    judges: Judges,
    batch_size: int = 64,
    cache: dict | None = None,
) -> OracleHeadroom:
    """The oracle headroom of a calibrated ``tb.PerImage`` ``config`` on ``test_images``: its levels
    run on every test image, the oracle picks each image's level at the config's mean FLOPs target."""
    from ..adapters import find_adapter
    from ..adaptive.per_image import flops_target, input_tokens

    feats, flops, speedups = level_features(model, config, test_images, judges.test_full, batch_size, cache)
    target = flops_target(model, config, input_tokens(find_adapter(model), test_images))
    return oracle_headroom(feats, flops, speedups, target, judges.predict, judges.test_labels)
