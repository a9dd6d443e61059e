"""How much of an image's token spread averaging ToMe's pairs would remove, per block, on the three
validation sets (woven textures, inspection surfaces, Fashion-MNIST items): a candidate statistic
for telling apart the images where averaging biases the features from those where it helps.

For each block of ``tb.Auto`` at FLOPs-ideal ``--speedup``, before the block reduces: the spread
``S = sum_i size_i |x_i - mean|^2`` of the non-prefix tokens (size-weighted mean), and the part of it
that averaging every matched pair (a, b) would remove, ``sum size_a size_b / (size_a + size_b)
|a - b|^2`` (the within-pair variance), as a share of ``S``. Prints the median and standard
deviation over images per block.

    PYTHONPATH=src python scripts/experiments/auto_spread_loss.py --images 24 > out.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import tokenbudget as tb
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.ops.match import bipartite_soft_matching
from tokenbudget.strategies import auto as auto_strategy

sys.path.insert(0, str(Path(__file__).parent))
from auto_criteria import load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shares: dict[int, list[torch.Tensor]] = {}
    reduce = auto_strategy.AutoStrategy.reduce

    def recording_reduce(self, x, keys, state, layer):  # noqa: ANN001, ANN202 - same signature
        matching = bipartite_soft_matching(keys, state.merged_per_layer[layer], state.num_prefix)
        size = state.size if state.size is not None else torch.ones_like(x[..., :1])
        p = state.num_prefix
        tokens, sizes = x[:, p:], size[:, p:]
        mean = (tokens * sizes).sum(1, keepdim=True) / sizes.sum(1, keepdim=True)
        spread = (sizes * (tokens - mean).pow(2).sum(-1, keepdim=True)).sum((1, 2))  # [B]
        dst_in = matching.kept_idx.gather(1, matching.dst_idx)
        width = x.shape[-1]
        a = x.gather(1, matching.src_idx[..., None].expand(-1, -1, width))
        b = x.gather(1, dst_in[..., None].expand(-1, -1, width))
        sa, sb = size.gather(1, matching.src_idx[..., None]), size.gather(1, dst_in[..., None])
        within = ((sa * sb / (sa + sb)) * (a - b).pow(2).sum(-1, keepdim=True)).sum((1, 2))
        shares.setdefault(layer, []).append(within / spread)
        return reduce(self, x, keys, state, layer)

    auto_strategy.AutoStrategy.reduce = recording_reduce
    model = tb.models.dinov2_small().eval()
    keep = keep_for_flops_speedup(model, args.speedup)
    print(
        f"FLOPs-ideal {args.speedup}x (keep {keep:.4f}), {args.images} validation images per set; per block:"
    )
    print("share of the token spread that averaging the block's pairs would remove, median (SD over images)")
    for name in ("textures-val", "anomaly-val", "fashion-mnist-val"):
        data = load(name, model, args.images, args.images)
        shares.clear()
        tb.apply(model, tb.Auto(keep=keep))
        with torch.inference_mode():
            model(data.test_images[: args.images])
        tb.remove(model)
        cells = [torch.cat(shares[layer]) for layer in sorted(shares)]
        print(f"{data.name:<22}" + " ".join(f"{float(c.median()):.3f}({float(c.std()):.3f})" for c in cells))


if __name__ == "__main__":
    main()
