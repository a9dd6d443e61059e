"""Print and plot one saccade trace on a cached test scene (README: "Object slots and saccades").

PYTHONPATH=src python scripts/experiments/saccade_trace.py --scene 0 --out results/cpu/saccade_trace
"""

import argparse

import torch

import tokenbudget as tb
from tokenbudget.data.token_cache import dinov2_scene_tokens
from tokenbudget.evaluate.scene_metrics import item_reference_bank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scene", type=int, default=0)
    parser.add_argument("--total", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--out", default="results/cpu/saccade_trace")
    args = parser.parse_args()
    scenes, tokens = dinov2_scene_tokens(300, "test")
    one = tokens[args.scene : args.scene + 1]
    slots = tb.vlm.cluster_slots(one, num_prefix=1)
    bank, labels = item_reference_bank()
    saccade = tb.vlm.Saccade(
        args.total, step=2, threshold=args.threshold, classifier=tb.vlm.KnnClassifier(bank, labels)
    )
    result = saccade(one, slots, num_prefix=1)  # no query: look where the k-NN is least sure
    text = (
        f"scene {args.scene}: items {scenes.class_names()[args.scene]}, {int(slots.num_slots[0])} slots, "
        f"per-slot budgets {result.budgets.tolist()}\n{result.trace}\n"
    )
    print(text)
    with open(f"{args.out}.txt", "w") as f:
        f.write(text)
    result.trace.plot(f"{args.out}.png")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
