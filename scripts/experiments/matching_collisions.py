"""How often ToMe's greedy edges share a destination on the embedded DINOv2, and what the
optimal one-to-one matching recovers, per block.

    PYTHONPATH=src python scripts/experiments/matching_collisions.py --keep 0.25 --images 8
"""

from __future__ import annotations

import argparse

import torch

import tokenbudget as tb
from tokenbudget.data.eval_sets import load_eval_data
from tokenbudget.data.images import IMAGENET_MEAN, IMAGENET_STD
from tokenbudget.models import load_model
from tokenbudget.ops.assignment import optimal_bipartite_matching
from tokenbudget.ops.match import bipartite_soft_matching


def _total(metric: torch.Tensor, matching) -> torch.Tensor:
    unit = metric / metric.norm(dim=-1, keepdim=True)
    dst_input = matching.kept_idx.gather(1, matching.dst_idx)
    src = unit.gather(1, matching.src_idx.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    dst = unit.gather(1, dst_input.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
    return (src * dst).sum(dim=(1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("dinov2_small")
    data = load_eval_data("skimage", 224, IMAGENET_MEAN, IMAGENET_STD)
    images = data.test_images[: args.images]
    tb.apply(model, tb.ToMe(keep=args.keep))
    strategy = model._tokenbudget[1].strategy
    greedy_match = strategy.match
    rows = []

    def recording_match(keys, r, num_prefix):
        greedy = bipartite_soft_matching(keys, r, num_prefix)
        optimal = optimal_bipartite_matching(keys, r, num_prefix)
        shared = [r - len(set(row)) for row in greedy.dst_idx.tolist()]  # merges into an already-used B
        g, o = _total(keys, greedy), _total(keys, optimal)
        rows.append(
            (greedy.r, sum(shared) / len(shared), float((g / greedy.r).mean()), float((o / greedy.r).mean()))
        )
        return greedy_match(keys, r, num_prefix)

    strategy.match = recording_match
    with torch.no_grad():
        model(images)
    print(f"DINOv2 ViT-S/14, ToMe(keep={args.keep}), {len(images)} skimage crops; per merging block:")
    print(
        f"{'block':>5} {'r':>3} {'greedy merges into a shared B':>30} {'mean cos greedy':>16} {'mean cos optimal':>17}"
    )
    for i, (r, shared, g, o) in enumerate(rows):
        print(f"{i:>5} {r:>3} {shared:>30.1f} {g:>16.4f} {o:>17.4f}")


if __name__ == "__main__":
    main()
