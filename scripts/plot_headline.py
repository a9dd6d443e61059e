"""The README's headline plot: k-NN accuracy per dev set at one FLOPs-ideal speedup, from the table
that ``scripts/experiments/textures_eval.py`` wrote (results/cpu/textures/final.txt), with one standard error.

    python scripts/plot_headline.py results/cpu/textures/final.txt --speedup 2 --out docs/headline_2x.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

METHODS = ("full", "tome", "auto", "random (mean of 3)", "pool", "pitome")
LABELS = {"random (mean of 3)": "random drop (3 seeds)", "tome": "ToMe", "auto": "Auto", "pitome": "PiToMe"}
SETS = {
    "textures": "woven textures",
    "fashion": "Fashion-MNIST",
    "anomaly": "anomaly",
    "skimage": "photo crops",
}


def parse(path: Path, speedup: float) -> dict[str, dict[str, tuple[float, float]]]:
    """{set: {method: (k-NN, SE)}} for the blocks measured at ``speedup`` (full from the same block)."""
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    current, active = None, False
    for line in path.read_text().splitlines():
        if line.startswith("== "):
            name = line[3:].split("_")[0].split(":")[0].strip()
            current = name if name in SETS else None
            active = False
            continue
        if current is None:
            continue
        match = re.match(r"-- FLOPs-ideal ([0-9.]+)x", line)
        if match:
            active = abs(float(match.group(1)) - speedup) < 1e-6
            continue
        for method in METHODS:
            if line.startswith(method + " ") and (active or method == "full"):
                knn, se = (float(v) for v in line[len(method) :].split()[:2])
                rows.setdefault(current, {})[method] = (knn, se)
    return {name: found for name, found in rows.items() if "tome" in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("docs/headline_2x.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = parse(args.table, args.speedup)
    sets = [name for name in SETS if name in rows]
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=100)
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        xs = [j + (i - (len(METHODS) - 1) / 2) * width for j in range(len(sets))]
        values = [rows[s].get(method, (float("nan"), 0.0)) for s in sets]
        ax.bar(
            xs,
            [v for v, _ in values],
            width,
            yerr=[e for _, e in values],
            capsize=2,
            label=LABELS.get(method, method),
        )
    ax.set_xticks(range(len(sets)), [SETS[s] for s in sets])
    ax.set_ylabel("k-NN accuracy")
    ax.set_ylim(0.3, 1.0)
    ax.set_title(f"DINOv2 ViT-S/14, FLOPs-ideal {args.speedup:g}x (same per-layer token counts); bars: 1 SE")
    ax.legend(ncol=3, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out)
    print(
        f"wrote {args.out}: "
        + "; ".join(f"{s}: " + ", ".join(f"{m} {rows[s][m][0]:.3f}" for m in rows[s]) for s in sets)
    )


if __name__ == "__main__":
    main()
