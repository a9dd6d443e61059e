"""How well a reducer keeps the flaw of an anomaly image in tokens of its own.

For test images of the anomaly set (flawed ones only) the flaw's patches are found by comparing
with the clean counterpart (a patch counts when > 10 % of its pixels changed). After the last
block, every token that contains a flaw patch is scored by its purity (share of its patches that
are flaw patches) and size. A reducer that averages the flaw into its background leaves impure,
large tokens.

    .venv/bin/python scripts/experiments/anomaly_purity.py --images 48 --speedup 1.5,2
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import tokenbudget as tb
from tokenbudget.data.anomaly import anomaly_set
from tokenbudget.data.images import model_normalization, rgb_uint8_to_model_input
from tokenbudget.evaluate.budgets import keep_for_flops_speedup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48, help="flawed test images to probe")
    parser.add_argument("--speedup", default="1.5,2", help="FLOPs-ideal speedups (comma list)")
    parser.add_argument("--methods", default="tome,tome-detail,pool")
    args = parser.parse_args()

    model = tb.models.dinov2_small().eval()
    size, patch = 224, 14
    grid = size // patch
    data = anomaly_set(150, size, 0)  # the set of `tokenbudget eval --data anomaly` (400/200 split)
    test = [i for i in range(len(data.labels)) if data.base_ids[i] >= 100 and data.labels[i] > 0]
    test = test[: args.images]
    x = rgb_uint8_to_model_input(data.images[test], *model_normalization(model))
    flaw = []  # [B, grid * grid] bool: patches the flaw touches
    for i in test:
        clean = data.images[(data.base_ids == data.base_ids[i]) & (data.labels == 0)][0]
        changed = np.abs(data.images[i].astype(int) - clean.astype(int)).max(axis=-1) > 0
        share = changed.reshape(grid, patch, grid, patch).mean(axis=(1, 3)).reshape(-1)
        flaw.append(torch.from_numpy(share > 0.1))
    flaw = torch.stack(flaw)

    print(f"{len(test)} flawed images, {flaw.sum(1).float().mean():.1f} flaw patches each on average")
    print("speedup  method        purity  share pure (>= 0.5)  median size")
    for speedup in (float(s) for s in args.speedup.split(",")):
        keep = keep_for_flops_speedup(model, speedup)
        for method in args.methods.split(","):
            config = tb.config_from_dict({"method": method, "keep": keep, "trace_source": True})
            tb.apply(model, config)
            with torch.no_grad():
                model(x)
            state = tb.last_state(model)
            tb.remove(model)
            token_of_patch = state.token_map[:, state.num_prefix :]  # [B, grid * grid]
            purity, sizes = [], []
            for b in range(len(test)):
                for token in token_of_patch[b][flaw[b]].unique():
                    members = token_of_patch[b] == token
                    purity.append((members & flaw[b]).sum().item() / members.sum().item())
                    sizes.append(members.sum().item())
            purity = np.array(purity)
            print(
                f"{speedup:>6.2f}x  {method:<12}  {purity.mean():.2f}    {np.mean(purity >= 0.5):.2f}"
                f"                 {np.median(sizes):.0f}"
            )


if __name__ == "__main__":
    main()
