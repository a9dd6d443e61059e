"""Per-image budgets in the quality harness: scoring allocations against a fixed budget (paired
standard errors), oracles, interleaved speed on real images, and the calibrate-on-train path
(:func:`evaluate_per_image`). Features come from :mod:`.per_image_features`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import find_adapter
from ..config import ReductionConfig
from ..patch import apply
from .features import extract_features
from .metrics import LinearProbe, cosine_fidelity, fit_linear_probe, knn_predictions
from .per_image_features import measured_flops, real_run


# -- scoring allocations -------------------------------------------------------------------------
@dataclass
class AllocationRow:
    """One allocation of budgets to test images, scored against full tokens and a reference row.

    Accuracies are fractions with their standard error (binomial, ``sqrt(p (1 - p) / n)``); the
    ``*_gain`` columns are this row minus the reference row in points, with the standard error of the
    paired difference (the same test images under both rows).
    """

    condition: str
    mean_flops: float
    speedup: float
    knn_acc: float
    knn_se: float
    linear_acc: float
    linear_se: float
    cosine: float
    knn_gain: float
    knn_gain_se: float
    linear_gain: float
    linear_gain_se: float
    level_counts: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Judges:
    """The classifiers every allocation is scored by, fit once on full-token train features."""

    train_feats: Tensor
    train_labels: Tensor
    test_labels: Tensor
    test_full: Tensor
    probe: LinearProbe
    k: int = 20

    @classmethod
    def fit(
        cls, train_feats: Tensor, train_labels: Tensor, test_full: Tensor, test_labels: Tensor, k: int = 20
    ) -> Judges:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        probe = fit_linear_probe(train_feats, train_labels, num_classes=num_classes)
        return cls(train_feats, train_labels, test_labels, test_full, probe, min(k, len(train_labels)))

    def predict(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Per test image (k-NN prediction [N], linear probe prediction [N]) from ``feats`` [N, F]."""
        knn = knn_predictions(self.train_feats, self.train_labels, feats, self.test_labels, k=self.k)
        return knn, self.probe.predict(feats)

    def correct(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Per test image (k-NN correct [N], linear probe correct [N]) as floats."""
        knn, lin = self.predict(feats)
        return (knn == self.test_labels).double(), (lin == self.test_labels).double()

    def knn_full_predictions(self) -> Tensor:
        return knn_predictions(
            self.train_feats, self.train_labels, self.test_full, self.test_labels, k=self.k
        )


def _se(correct: Tensor) -> float:
    p = float(correct.mean())
    return math.sqrt(max(p * (1 - p), 0.0) / len(correct))


def _paired_se(a: Tensor, b: Tensor) -> float:
    diff = a - b
    return float(diff.std(unbiased=True) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")


def score_rows(
    judges: Judges,
    conditions: Sequence[tuple[str, Tensor, Tensor]],
    reference: str,
    num_levels: int | None = None,
) -> list[AllocationRow]:
    """Score each ``(name, features [N, F], per-image FLOPs [N])`` (and per-image level, when the
    name's flops come with ``levels``) against the row named ``reference``."""
    scored = {}
    for name, feats, flops in conditions:
        knn, lin = judges.correct(feats)
        scored[name] = (feats, flops, knn, lin)
    ref = scored[reference]
    rows = []
    for name, (feats, flops, knn, lin) in scored.items():
        mean_flops = float(flops.double().mean())
        rows.append(
            AllocationRow(
                condition=name,
                mean_flops=mean_flops,
                speedup=1.0 / mean_flops,
                knn_acc=float(knn.mean()),
                knn_se=_se(knn),
                linear_acc=float(lin.mean()),
                linear_se=_se(lin),
                cosine=cosine_fidelity(feats, judges.test_full),
                knn_gain=100 * float((knn - ref[2]).mean()),
                knn_gain_se=100 * _paired_se(knn, ref[2]),
                linear_gain=100 * float((lin - ref[3]).mean()),
                linear_gain_se=100 * _paired_se(lin, ref[3]),
            )
        )
    return rows


def select_levels(level_feats: Tensor, index: Tensor) -> Tensor:
    """Row ``index[n]`` of each image's level features [N, K, F] -> [N, F]."""
    return level_feats[torch.arange(len(index)), index]


def cosine_to_full(level_feats: Tensor, full: Tensor) -> Tensor:
    """[N, K] cosine similarity of each image's features under each level to its full-token ones."""
    return F.cosine_similarity(level_feats.double(), full.double()[:, None], dim=-1)


def oracle_levels(ok: Tensor, level_flops: Sequence[float]) -> Tensor:
    """[N] the cheapest level each image is ``ok`` at ([N, K] bool; levels ordered from the most
    tokens to the fewest, level 0 always counts as ok)."""
    ok = ok.clone()
    ok[:, 0] = True
    flops = torch.tensor(level_flops, dtype=torch.float64)
    cost = torch.where(ok, flops[None, :], torch.full_like(ok, float("inf"), dtype=torch.float64))
    return cost.argmin(dim=1)


def oracle_for_target(
    cosine: Tensor, level_flops: Sequence[float], target: float, extra_ok: Tensor | None = None
) -> tuple[Tensor, float]:
    """(levels [N], cosine floor t): each image at the cheapest level whose cosine to its full
    features is ``>= t`` (and ``extra_ok`` [N, K], if given), ``t`` the lowest floor whose mean FLOPs
    does not exceed ``target`` (bisection). Knows every image's full features: not deployable, an
    upper bound for a policy that picks one of these levels per image."""
    flops = torch.tensor(level_flops, dtype=torch.float64)

    def levels_at(t: float) -> Tensor:
        ok = cosine >= t
        if extra_ok is not None:
            ok = ok & extra_ok
        return oracle_levels(ok, level_flops)

    lo, hi = -1.0, 1.0 + 1e-9  # mean FLOPs rises with t
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(flops[levels_at(mid)].mean()) > target:
            hi = mid
        else:
            lo = mid
    return levels_at(lo), lo


# -- real runs: speed and achieved FLOPs ---------------------------------------------------------
@dataclass
class SpeedRow:
    """Wall-clock of one config on real images, interleaved with the others in one process."""

    condition: str
    mean_flops: float  # block FLOPs per image over the full model's, measured on these images
    img_s: float  # images per second (median over samples)
    ratio: float  # median of the per-sample time ratios reference / this (> 1: faster)
    ratio_q1: float
    ratio_q3: float

    def to_dict(self) -> dict:
        return asdict(self)


def bench_on_images(
    model: nn.Module,
    images: Tensor,
    configs: dict[str, ReductionConfig | None],
    reference: str,
    *,
    batch_size: int = 32,
    samples: int = 7,
    warmup: int = 1,
) -> list[SpeedRow]:
    """Time each config (``None``: the unpatched model) on the same real ``images`` [N, 3, H, W]
    (model-ready), one patched copy each, interleaved (:func:`tokenbudget.bench.throughput.
    measure_interleaved`); every call embeds all of ``images`` in batches of ``batch_size``, so a
    per-image config meets the same mix of images as a fixed one. Ratios are against ``reference``."""
    import copy
    import statistics

    from ..bench.throughput import measure_interleaved, paired_ratio_quartiles

    input_tokens = find_adapter(model).default_num_tokens
    models = {}
    for name, config in configs.items():
        copy_ = copy.deepcopy(model).eval()
        models[name] = copy_ if config is None else apply(copy_, config)
    batches = [images[s : s + batch_size] for s in range(0, len(images), batch_size)]

    def runner(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for batch in batches:
                    m(batch)

        return run

    flops = {}
    for name, m in models.items():
        if configs[name] is None:
            flops[name] = 1.0
            continue
        per_batch = []
        with torch.inference_mode():
            for batch in batches:
                m(batch)
                per_batch.append(measured_flops(m, input_tokens) * len(batch))
        flops[name] = sum(per_batch) / len(images)
    times = measure_interleaved(
        {name: runner(m) for name, m in models.items()},
        torch.device("cpu"),
        warmup=warmup,
        samples=samples,
        min_sample_seconds=0.0,
    )
    rows = []
    for name in models:
        q1, median, q3 = paired_ratio_quartiles(times[reference], times[name])
        rows.append(SpeedRow(name, flops[name], len(images) / statistics.median(times[name]), median, q1, q3))
    return rows


# -- the harness path: calibrate on train inside the run, score the held-out test split ----------
@dataclass
class PerImageRun:
    """One target of :func:`evaluate_per_image`: the calibrated config and the scored rows."""

    speedup: float
    fixed_keep: float
    config: dict
    rows: list[AllocationRow]
    level_counts: dict[float, int]


def evaluate_per_image(
    model: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    speedups: Sequence[float] = (1.5, 2.0),
    *,
    policy: str = "detail",
    rule: str = "fit",
    levels: Sequence[float] | None = None,
    calibration_images: int = 300,
    batch_size: int = 32,
    seed: int = 0,
    train_full: Tensor | None = None,
    progress: Callable[[str], None] | None = None,
    reducer: str = "auto",
) -> list[PerImageRun]:
    """``tb.PerImage`` against the fixed budget of its ``reducer`` (``"auto"``: ``tb.Auto``, or
    ``"tome"``) at the same mean FLOPs on model-ready images [N, 3, H, W].

    For each FLOPs-ideal ``speedup``: ToMe's ``keep`` for it (the harness's
    :func:`~tokenbudget.evaluate.keep_for_flops_speedup`), then ``tb.PerImage(keep=keep)``
    calibrated on ``calibration_images`` train images (a seeded random subset), so both aim at the
    same mean FLOPs; the test images run through both for real (the per-image model grouped by
    level), and k-NN / linear probe fit on full-token train features score them. Rows: full, fixed,
    per-image; gains are against fixed with paired standard errors.
    """
    from ..adaptive.per_image import calibrate_per_image
    from ..strategies.per_image_levels import level_config
    from .budgets import keep_for_flops_speedup

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    model = model.eval()
    say("full-token features")
    if train_full is None:
        train_full = extract_features(model, train_images, batch_size)
    test_full = extract_features(model, test_images, batch_size)
    judges = Judges.fit(train_full, train_labels, test_full, test_labels)
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(train_images), generator=generator)[:calibration_images].sort().values
    runs = []
    n = len(test_labels)
    for speedup in speedups:
        keep = keep_for_flops_speedup(model, speedup)
        say(f"{speedup:g}x: fixed {reducer} keep={keep:g}")
        fixed = level_config(reducer, True, keep=keep)
        fixed_feats, fixed_flops = real_run(model, test_images, fixed, batch_size)
        say(f"{speedup:g}x: calibrating per-image ({policy}, {rule}) on {len(subset)} train images")
        config = calibrate_per_image(
            model,
            train_images[subset],
            keep=keep,
            policy=policy,
            rule=rule,
            reducer=reducer,
            glance_images=train_images,
            batch_size=batch_size,
            **({} if levels is None else {"levels": tuple(levels)}),
        )
        say(f"{speedup:g}x: per-image test run")
        feats, flops = real_run(model, test_images, config, batch_size)
        rows = score_rows(
            judges,
            [
                ("full", test_full, torch.ones(n)),
                (f"fixed keep={keep:g}", fixed_feats, fixed_flops),
                ("per-image", feats, flops),
            ],
            reference=f"fixed keep={keep:g}",
        )
        counts = _level_counts(config, flops)
        runs.append(PerImageRun(speedup, keep, config.to_dict(), rows, counts))
    return runs


def _level_counts(config: ReductionConfig, flops: Tensor) -> dict[float, int]:
    """Images per level speedup, read back from each image's FLOPs (levels have distinct FLOPs)."""
    counts: dict[float, int] = {}
    for value in (1.0 / flops).tolist():
        nearest = min(config.levels, key=lambda s: abs(s - value))
        counts[nearest] = counts.get(nearest, 0) + 1
    return dict(sorted(counts.items()))


def format_per_image_runs(runs: Sequence[PerImageRun], name: str) -> str:
    """Plain-text table of :func:`evaluate_per_image` results."""
    lines = []
    for run in runs:
        cfg = run.config
        lines.append(
            f"{name}, FLOPs-ideal {run.speedup:g}x: fixed {run.config.get('reducer', 'tome')} keep={run.fixed_keep:g}; per-image policy "
            f"{cfg['policy']}, levels {cfg['levels']}, calibrated target FLOPs {cfg['target_flops']:.4f} "
            f"(train: {cfg['calibrated_flops']:.4f}); test images per level {run.level_counts}"
        )
        header = (
            f"  {'condition':<18} {'FLOPs':>6} {'speedup':>7} {'k-NN':>6} {'+-':>5} {'gain':>6} {'+-':>4} "
            f"{'linear':>6} {'+-':>5} {'gain':>6} {'+-':>4} {'cosine':>7}"
        )
        lines += [header, "  " + "-" * (len(header) - 2)]
        for r in run.rows:
            lines.append(
                f"  {r.condition:<18} {r.mean_flops:>6.4f} {r.speedup:>6.3f}x {r.knn_acc:>6.3f} {r.knn_se:>5.3f} "
                f"{r.knn_gain:>+6.1f} {r.knn_gain_se:>4.1f} {r.linear_acc:>6.3f} {r.linear_se:>5.3f} "
                f"{r.linear_gain:>+6.1f} {r.linear_gain_se:>4.1f} {r.cosine:>7.4f}"
            )
    return "\n".join(lines)


# -- inside the quality harness (``tokenbudget eval --methods per-image``) ------------------------
def calibrate_in_run(
    model: nn.Module,
    config: ReductionConfig,
    train_images: Tensor,
    *,
    calibration_images: int = 300,
    seed: int = 0,
    batch_size: int = 32,
) -> ReductionConfig:
    """``config`` itself, or for a ``tb.PerImage`` without thresholds its calibration
    (:func:`~tokenbudget.adaptive.calibrate_per_image`) on a seeded subset of ``calibration_images``
    of the *train* images [N, 3, H, W], at the same mean budget, which every train image's glance
    must meet."""
    from ..adaptive.per_image import calibrate_per_image
    from ..config import PerImage
    from ..config.per_image import DEFAULT_PER_IMAGE_LEVELS

    if not isinstance(config, PerImage) or config.thresholds is not None:
        return config
    if len(train_images) == 0:
        raise ValueError("per-image budgets are calibrated on the train split; it holds no images")
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(train_images), generator=generator)[:calibration_images].sort().values
    return calibrate_per_image(
        model,
        train_images[subset],
        keep=config.keep,
        flops_speedup=config.flops_speedup,
        policy=config.policy,
        # the default ladder is cut to what the model reaches; other levels are the user's
        levels=None if config.levels == DEFAULT_PER_IMAGE_LEVELS else config.levels,
        predictor=config.predictor,
        glance_images=train_images,  # the whole train split holds the budget (glance only)
        batch_size=batch_size,
    )


def per_image_mean_flops(
    model: nn.Module, config: ReductionConfig, images: Tensor, batch_size: int = 64
) -> float:
    """Mean block FLOPs fraction ``images`` [N, 3, H, W] get under a calibrated ``tb.PerImage``: each
    image's level from its glance (the patch embedding only), that level's FLOPs."""
    from ..adaptive.per_image import config_level_plan, glance_scores, input_tokens
    from ..ops.budget_fit import mean_level_flops
    from ..ops.glance import level_index

    plan = config_level_plan(model, config, input_tokens(find_adapter(model), images))
    scores = glance_scores(model, images, config, batch_size)
    index = level_index(scores, torch.tensor(config.thresholds, dtype=torch.float64), len(plan.flops))
    return mean_level_flops(index, plan.flops)
