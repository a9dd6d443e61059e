"""Probe behind the README's exemplar note: does centering the scene tokens help exemplar queries?

Exemplar selection on the 300 cached DINOv2-S test scenes (see tokenbudget.evaluate.select_scenes),
relevance computed on raw tokens, on tokens minus the scene's mean patch token, and with the query
centred the same way. Prints the on-item share and k-NN accuracy at k=8 and k=32.

    PYTHONPATH=src python scripts/experiments/select_exemplar_centering.py
"""

from __future__ import annotations

import torch

from tokenbudget.evaluate.select_scenes import load_selection_data, pick_exemplars, score_selection
from tokenbudget.ops.select import relevance
from tokenbudget.vlm.select import select_by_scores


def main() -> None:
    data = load_selection_data(300)
    patches = data.tokens[:, 1:]
    mean = patches.mean(1, keepdim=True)  # [S, 1, C] each scene's mean patch token
    centred = torch.cat([data.tokens[:, :1], patches - mean], dim=1)
    variants = {
        "raw": lambda q: relevance(data.tokens, q),
        "tokens centred": lambda q: relevance(centred, q),
        "tokens and query centred": lambda q: relevance(centred, q - mean[:, 0]),
    }
    for name, score in variants.items():
        cells = []
        for k in (8, 32):
            shares, hits = [], []
            for item in range(data.labels.shape[1]):
                out = select_by_scores(data.tokens, score(pick_exemplars(data, item)), k, num_prefix=1)
                share, hit = score_selection(data, item, out.assignment[:, 1:] >= 0)
                shares.append(share)
                hits.append(hit)
            cells.append(f"k={k}: share {torch.cat(shares).mean():.3f}, k-NN {torch.cat(hits).mean():.3f}")
        print(f"{name:<26} " + "; ".join(cells))


if __name__ == "__main__":
    main()
