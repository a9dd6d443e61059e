"""Why does a reducer shift texture features? Token spread and group sizes, block by block.

For nominal test images of the texture validation set, every block's output tokens are recorded
with and without reduction. Per block it prints the *spread* of the non-prefix tokens, the
root of their size-weighted mean squared distance to their size-weighted mean token (each token
counting for the patches it stands for), as a ratio to the full model's spread at the same block:
below 1, the reduced sequence is smoother, lower in contrast, than the one it stands for. After
the last block it prints the largest token (patches), the share of patches inside tokens of
8 or more patches, and the class token's cosine to the full model's.

    PYTHONPATH=src python scripts/experiments/textures_mechanism.py --images 32 --speedup 2 \\
        --methods tome,random,pool,'{"method": "auto", "merge": "moment"}'
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from textures_candidates import label_of, parse_candidates

import tokenbudget as tb
from tokenbudget.data.images import model_normalization, rgb_uint8_to_model_input
from tokenbudget.data.textures import texture_set
from tokenbudget.evaluate.budgets import keep_for_flops_speedup
from tokenbudget.patch import _context


def spreads(model: torch.nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per block, the [B] spread of the output tokens; the final sizes [B, N]; the class token [B, C]."""
    prefix = model.num_prefix_tokens
    out: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: object, tokens: torch.Tensor) -> None:
        size = None
        if tb.is_patched(model):
            state = getattr(_context(model).local, "state", None)
            size = None if state is None else state.size
        t = tokens[:, prefix:]
        w = torch.ones_like(t[..., :1]) if size is None else size[:, prefix:].to(t.dtype)
        mu = (t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        out.append(((w * (t - mu).square().sum(-1, keepdim=True)).sum((1, 2)) / w.sum((1, 2))).sqrt())

    handles = [block.register_forward_hook(hook) for block in model.blocks]
    try:
        with torch.inference_mode():
            tokens = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    sizes = tb.last_state(model).sizes[:, prefix:] if tb.is_patched(model) else torch.ones(len(x), 1)
    return out, sizes, tokens[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--methods", default="tome,random,pool")
    parser.add_argument("--bases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1000, help="generator seed (1000: the validation set)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tb.models.dinov2_small().eval()
    data = texture_set(args.bases, 224, args.seed)
    rows = np.nonzero((data.base_ids >= args.bases // 2) & (data.labels == 0))[0][: args.images]
    x = rgb_uint8_to_model_input(data.images[rows], *model_normalization(model))
    full_spread, _, full_cls = spreads(model, x)
    keep = keep_for_flops_speedup(model, args.speedup)
    blocks = list(range(len(model.blocks)))
    print(f"{len(rows)} nominal images (set seed {args.seed}), FLOPs-ideal {args.speedup}x (keep {keep})")
    print("token spread / full spread after each block (mean over images); last block: sizes, cls cosine")
    header = f"{'method':<28} " + " ".join(f"{b:>5}" for b in blocks) + "  max size  >=8 share  cls cos"
    print(header)
    for text in parse_candidates(args.methods):
        spec = json.loads(text) if text.startswith("{") else {"method": text}
        tb.apply(model, tb.config_from_dict({**spec, "keep": keep}))
        try:
            spread, sizes, cls = spreads(model, x)
        finally:
            tb.remove(model)
        ratios = [float((s / f).mean()) for s, f in zip(spread, full_spread, strict=True)]
        big = float((sizes * (sizes >= 8)).sum(1).div(sizes.sum(1)).mean())
        cos = float(F.cosine_similarity(cls, full_cls, dim=1).mean())
        print(
            f"{label_of(spec)[:28]:<28} " + " ".join(f"{r:>5.2f}" for r in ratios)
            + f"  {float(sizes.max(1).values.mean()):>8.1f}  {big:>9.2f}  {cos:>7.4f}",
            flush=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
