"""Per-item scores on the multi-object scenes: which item a set of tokens covers, and what it is.

The reference bank for "what is it" holds the items of the *train* scenes (Fashion-MNIST train
split, disjoint from the test scenes' items): each item's feature is the mean of the embedded
DINOv2-S tokens of the patches it owns (``SceneSet.patch_owner``), L2-normalised. A bank of single
224 px Fashion-MNIST images does not transfer: an item at about 94 px among three others is
embedded very differently, and the oracle (all tokens of the test item) scored 0.16 against the
single-image bank (0.28 counting only foreground patches) but 0.57 against the scene bank.
A set of scene tokens (selected, compressed, or a slot's) is scored the same way: the mean of the
tokens, L2-normalised, classified by cosine k-NN against the bank (majority of the k nearest,
ties to the nearer). Compressors and selectors are compared at equal k on the same bank, so the
bank's domain gap (single item vs scene) is shared by every method.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data.token_cache import dinov2_scene_tokens


def pooled_feature(tokens: Tensor, weight: Tensor | None = None) -> Tensor:
    """L2-normalised (weighted) mean of ``tokens`` [..., T, C] -> [..., C]; ``weight`` [..., T]."""
    if weight is None:
        mean = tokens.float().mean(-2)
    else:
        w = weight.float()[..., None]
        mean = (tokens.float() * w).sum(-2) / w.sum(-2).clamp_min(1e-12)
    return torch.nn.functional.normalize(mean, dim=-1)


def item_features(tokens: Tensor, patch_owner: Tensor, num_items: int, num_prefix: int = 1) -> Tensor:
    """Oracle per-item features [S, I, C]: the pooled tokens of the patches each item owns.

    ``tokens`` [S, N, C] (prefix first), ``patch_owner`` [S, N - num_prefix] item index or -1.
    """
    patches = tokens[:, num_prefix:].float()
    masks = torch.stack([(patch_owner == i).float() for i in range(num_items)], dim=1)  # [S, I, P]
    mean = masks @ patches / masks.sum(-1, keepdim=True).clamp_min(1.0)  # [S, I, C]
    return torch.nn.functional.normalize(mean, dim=-1)


def item_reference_bank(num_scenes: int = 600, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(features [num_scenes * 4, C], labels)``: the oracle item features of the train scenes (cached)."""
    scenes, tokens = dinov2_scene_tokens(num_scenes, "train", seed)
    owner = torch.from_numpy(scenes.patch_owner(14)).flatten(1)
    features = item_features(tokens, owner, scenes.num_items)
    return features.flatten(0, 1), torch.from_numpy(scenes.labels).flatten()


def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, k: int = 10) -> Tensor:
    """Cosine k-NN labels [Q] of L2-normalised ``queries`` [Q, C] against ``bank`` [M, C]."""
    sims = queries.float() @ bank.float().T  # [Q, M]
    top_sim, top = sims.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), int(bank_labels.max()) + 1)
    # Each neighbour votes with weight 1 + tiny similarity: a majority wins, ties go to the nearer.
    votes.scatter_add_(1, bank_labels[top], 1.0 + 1e-3 * top_sim)
    return votes.argmax(1)


def on_item_share(selected_owner: Tensor, item: int) -> float:
    """Share of selected tokens whose patch belongs to ``item`` (``selected_owner``: the item index of
    each selected patch, -1 for background)."""
    return float((selected_owner == item).float().mean()) if selected_owner.numel() else 0.0
