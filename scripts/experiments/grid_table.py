"""Markdown tables from the outputs of ``allocation_grid.py``: per set, one row per method and one
column per speedup, each cell ``k-NN / linear`` in % (and, for per-image, its summed gain over the
best fixed method with the paired SE, its mean FLOPs and the oracle's).

    python scripts/experiments/grid_table.py results/cpu/auto/grid_*.txt
    python scripts/experiments/grid_table.py --speedup=2 results/cpu/auto/grid_*.txt   # one table, sets as columns
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROW = re.compile(
    r"^\s+(\S+)\s+([\d.]+)±\s*([\d.]+)\s+([\d.]+)±\s*([\d.]+)\s+([+-][\d.]+)±([\d.]+)\s*(\(best\))?\s+([\d.]+)"
)
BLOCK = re.compile(r"^\s+([\d.]+)x \((.*)\)")
ORACLE = re.compile(r"oracle at ([\d.]+): k-NN ([\d.]+), linear ([\d.]+)")
TARGET = re.compile(r"target FLOPs ([\d.]+)")


def parse(path: Path) -> tuple[str, str, dict]:
    name, full, blocks, speedup = path.stem, "", {}, None
    for line in path.read_text().splitlines():
        if line.endswith("test images") and ":" in line:
            name = Path(line.split(": ")[0].split(":", 1)[1]).name  # test:NAME or folder:DIR
        if line.strip().startswith("full:"):
            full = line.strip()
        if m := BLOCK.match(line):
            speedup = float(m.group(1))
            blocks[speedup] = {"rows": {}, "oracle": None, "schedule": m.group(2), "target": None}
        elif (m := ROW.match(line)) and speedup is not None:
            blocks[speedup]["rows"][m.group(1)] = m.groups()[1:]
        elif (m := TARGET.search(line)) and speedup is not None:
            blocks[speedup]["target"] = float(m.group(1))
        elif (m := ORACLE.search(line)) and speedup is not None:
            blocks[speedup]["oracle"] = (float(m.group(2)), float(m.group(3)))
    return name, full, blocks


def table(path: Path) -> str:
    name, full, blocks = parse(path)
    speedups = sorted(s for s in blocks if "per-image" in blocks[s]["rows"])
    lines = [f"**{name}** ({full}; one SE about 1.3-1.6 points at 1000 test images)", ""]
    lines.append("| method | " + " | ".join(f"{s:g}x" for s in speedups) + " |")
    lines.append("|---|" + "---|" * len(speedups))
    methods = list(blocks[speedups[0]]["rows"])
    for method in methods:
        cells = []
        for s in speedups:
            knn, _, lin, _, gain, gain_se, best, flops = blocks[s]["rows"][method]
            cell = f"{knn} / {lin}"
            if best:
                cell = f"**{cell}**"
            if method == "per-image":
                cell += f" ({gain} ± {gain_se}, FLOPs {float(flops):.3f})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    oracle = [blocks[s]["oracle"] for s in speedups]
    if all(oracle):
        lines.append(
            "| oracle over per-image's levels | " + " | ".join(f"{k:.1f} / {v:.1f}" for k, v in oracle) + " |"
        )
    return "\n".join(lines)


def across_sets(paths: list[Path], speedup: float) -> str:
    """One table at ``speedup``: a row per method, a column per set (``k-NN / linear``)."""
    parsed = [parse(p) for p in paths]
    parsed = [(n, f, b) for n, f, b in parsed if speedup in b and "per-image" in b[speedup]["rows"]]
    lines = ["| method | " + " | ".join(n for n, _, _ in parsed) + " |", "|---|" + "---|" * len(parsed)]
    fulls = [re.findall(r"[\d.]+", f) for _, f, _ in parsed]
    lines.append("| all tokens | " + " | ".join(f"{k} / {v}" for k, v in fulls) + " |")
    for method in parsed[0][2][speedup]["rows"]:
        cells = []
        for _, _, blocks in parsed:
            knn, _, lin, _, gain, gain_se, best, _ = blocks[speedup]["rows"][method]
            cell = f"**{knn} / {lin}**" if best else f"{knn} / {lin}"
            cells.append(cell + (f" ({gain} ± {gain_se})" if method == "per-image" else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_image_summary(paths: list[Path]) -> str:
    """Per set and speedup: per-image's summed gain over the best fixed method (paired SE), its mean
    FLOPs against the target, and the oracle's summed headroom over that method."""
    lines = [
        "| set | speedup | best fixed (k-NN / linear) | per-image gain (sum) | per-image FLOPs vs target | oracle headroom (sum) |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        name, _, blocks = parse(path)
        for s in sorted(blocks):
            rows = blocks[s]["rows"]
            if "per-image" not in rows or blocks[s]["oracle"] is None:
                continue
            best = next(m for m, r in rows.items() if r[6])
            knn, _, lin, _, *_ = rows[best]
            _, _, _, _, gain, gain_se, _, flops = rows["per-image"]
            target = blocks[s]["target"]
            oracle = sum(blocks[s]["oracle"]) - float(knn) - float(lin)
            miss = "" if target is None else f" ({100 * (float(flops) / target - 1):+.1f} %)"
            lines.append(
                f"| {name} | {s:g}x | {best} {knn} / {lin} | {gain} ± {gain_se} | {float(flops):.4f}{miss} | {oracle:+.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--per-image":
        print(per_image_summary([Path(p) for p in args[1:]]))
        return
    if args and args[0].startswith("--speedup="):
        print(across_sets([Path(p) for p in args[1:]], float(args[0].split("=")[1])))
        return
    print("\n\n".join(table(Path(p)) for p in args))


if __name__ == "__main__":
    main()
