"""Eval rows as a text table, CSV and a Pareto plot (accuracy against measured speedup)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from .quality import EvalRow


def format_eval_table(rows: Sequence[EvalRow]) -> str:
    """One line per row; a ``shift`` column (the bias diagnostic) beside cosine when rows carry it."""
    with_shift = any(r.shift is not None for r in rows)
    header = (
        f"{'method':<12} {'keep':>5} {'tokens':>6} {'FLOPs':>6} {'k-NN':>7} {'drop':>6} {'linear':>7} {'drop':>6} "
        f"{'cosine':>7} "
        + (f"{'shift':>6} " if with_shift else "")
        + f"{'img/s':>7} {'speedup':>7} {'MB':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        mb = f"{r.peak_mb:>7.1f}" if r.peak_mb is not None else f"{'-':>7}"
        shift = (f"{r.shift:>6.3f} " if r.shift is not None else f"{'-':>6} ") if with_shift else ""
        lines.append(
            f"{r.method:<12} {r.keep:>5.2f} {r.final_tokens:>6} {r.flops_ratio:>6.2f} {r.knn_acc:>7.3f} {r.knn_drop:>6.1f} "
            f"{r.linear_acc:>7.3f} {r.linear_drop:>6.1f} {r.cosine:>7.4f} {shift}{r.img_s:>7.1f} {r.speedup:>6.2f}x {mb}"
        )
    return "\n".join(lines)


def budget_warnings(
    rows: Sequence[EvalRow], targets: dict[float, float] | None = None, tolerance: float = 0.03
) -> list[str]:
    """One line per row whose mean FLOPs (``flops_ratio``) misses its target by more than
    ``tolerance`` (relative): a per-image row's own ``target_flops``, any other row's
    ``targets[keep]`` (e.g. ``1 / speedup`` under ``--flops-speedup``; rows without one are not
    checked). A reducer that spends less than it was given is not comparable at that budget."""
    lines = []
    for r in rows:
        target = r.config.get("target_flops") if r.method == "per-image" else (targets or {}).get(r.keep)
        if r.method == "full" or target is None or not target > 0:
            continue
        miss = r.flops_ratio / target - 1.0
        if abs(miss) > tolerance:
            lines.append(
                f"WARNING: {r.method} at keep {r.keep:g} spent {r.flops_ratio:.4f} of full FLOPs against a target "
                f"of {target:.4f} ({100 * miss:+.1f} %, more than {100 * tolerance:g} %): its scores are not "
                "at the budget of the other rows"
            )
    return lines


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


def headroom_line(row: EvalRow, fixed: Sequence[EvalRow], full: EvalRow | None, num_test: int) -> str:
    """What a per-image ``row`` gained over the best of the ``fixed`` rows at its budget, beside the
    oracle's headroom (:mod:`tokenbudget.evaluate.oracle`) and full tokens, in points, with the
    binomial standard error of one accuracy on ``num_test`` images."""
    best_knn = max(fixed, key=lambda r: r.knn_acc)
    best_lin = max(fixed, key=lambda r: r.linear_acc)
    se = 100 * max((a * (1 - a) / max(num_test, 1)) ** 0.5 for a in (best_knn.knn_acc, best_lin.linear_acc))
    parts = [
        f"  best fixed at this budget: k-NN {best_knn.knn_acc:.3f} ({best_knn.method}), linear "
        f"{best_lin.linear_acc:.3f} ({best_lin.method}); per-image "
        f"{100 * (row.knn_acc - best_knn.knn_acc):+.1f} / {100 * (row.linear_acc - best_lin.linear_acc):+.1f} points"
    ]
    if row.oracle_knn is not None and row.oracle_linear is not None:
        parts.append(
            f"oracle headroom {100 * (row.oracle_knn - best_knn.knn_acc):+.1f} / "
            f"{100 * (row.oracle_linear - best_lin.linear_acc):+.1f} (each image at the cheapest of its levels "
            "that it is right at, same mean FLOPs: an upper bound)"
        )
    if full is not None:
        parts.append(
            f"full tokens {100 * (full.knn_acc - best_knn.knn_acc):+.1f} / "
            f"{100 * (full.linear_acc - best_lin.linear_acc):+.1f}"
        )
    return "; ".join(parts) + f"; one accuracy's SE <= {se:.1f} points ({num_test} test images)"
