"""The object-slot benchmark on the cached multi-object test scenes.

Per-item scoring (shared by every method, so they compare at equal token counts): every output
token is credited to the item that owns most of the patches it stands for (``dominant owner``, -1
for background); an item's feature is the mean of the output tokens credited to it, reported two
ways: ``plain`` (every token counts once: a VLM sees tokens, not their sizes) and ``weighted`` (by
the patches each token stands for), L2-normalised and classified by cosine k-NN against the oracle
item bank of the train scenes (:func:`~tokenbudget.evaluate.scene_metrics.item_reference_bank`). An item
no output token is credited to counts as wrong.

Experiments (:func:`run_slot_benchmark`):

* ``slots``: slot quality against the items: best-match IoU per item and FG-ARI, slots per scene.
* ``complexity``: budgets of ground-truth slots (the 4 items + background) at ``total`` tokens:
  exact sums, and the Spearman correlation of each item's budget with its pixel detail (mean
  absolute image gradient over the item's footprint times its area, measured on the pixels, not
  the features); the same with clustered slots (tokens credited to each item); mean budget per class.
* ``accuracy``: per-item k-NN accuracy at totals 16 / 32 / 64 for grid pooling (uniform over the
  image), slots with a uniform split and slots with complexity-proportional budgets.
* ``saccade``: one item per scene is queried by an exemplar (the bank feature of another item of
  its class from the train scenes); accuracy on the queried item against tokens spent for
  saccades, one-shot complexity allocation and one-shot complexity x relevance allocation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..data.fashion_mnist import FASHION_MNIST_CLASSES
from ..data.token_cache import dinov2_scene_tokens
from ..vlm.allocate import allocate, compress_slots, merge_slots, slot_complexity
from ..vlm.base import CompressedTokens
from ..vlm.pooling import pool
from ..vlm.saccade import KnnClassifier, Saccade
from ..vlm.slots import Slots, best_match_iou, cluster_slots, foreground_ari
from .scene_metrics import item_reference_bank, knn_predict, pooled_feature


def dominant_owner(assignment: Tensor, owner: Tensor, num_outputs: int) -> Tensor:
    """[k] the item owning most patches of each output token (-1 background); ``assignment`` [P]
    (patch -> output index among the k patch outputs), ``owner`` [P] (item index or -1)."""
    table = torch.zeros(num_outputs, int(owner.max()) + 2, dtype=torch.long)
    table.index_put_((assignment, owner + 1), torch.ones_like(owner), accumulate=True)
    return table.argmax(1) - 1


def item_predictions(
    outputs: Tensor,
    assignment: Tensor,
    owner: Tensor,
    num_items: int,
    bank: Tensor,
    bank_labels: Tensor,
    weighted: bool = False,
) -> Tensor:
    """[I] predicted class of each item from one image's patch outputs [k, C] (-1 when no output is
    credited to the item). ``weighted``: weight each output by the patches it stands for."""
    credit = dominant_owner(assignment, owner, outputs.shape[0])
    sizes = torch.bincount(assignment, minlength=outputs.shape[0]).float()
    preds = torch.full((num_items,), -1, dtype=torch.long)
    features, items = [], []
    for item in range(num_items):
        mine = credit == item
        if mine.any():
            features.append(pooled_feature(outputs[mine], sizes[mine] if weighted else None))
            items.append(item)
    if features:
        preds[torch.tensor(items)] = knn_predict(bank, bank_labels, torch.stack(features))
    return preds


def compressed_predictions(
    out: CompressedTokens, owner: Tensor, num_items: int, bank, bank_labels, weighted: bool = False
) -> Tensor:  # noqa: ANN001
    """[B, I] per-item predictions from a compressor's output (patch outputs behind ``num_prefix``)."""
    p = out.num_prefix
    rows = []
    for b, tokens in enumerate(out.token_list()):
        assignment = out.assignment[b, p:] - p
        rows.append(
            item_predictions(tokens[p:], assignment, owner[b], num_items, bank, bank_labels, weighted)
        )
    return torch.stack(rows)


def pixel_detail(images: np.ndarray, owner: np.ndarray, num_items: int) -> np.ndarray:
    """[S, I] mean absolute image gradient over each item's footprint times its area (pixels)."""
    grey = images[..., 0].astype(np.float32)
    gy = np.abs(np.diff(grey, axis=1, append=grey[:, -1:]))
    gx = np.abs(np.diff(grey, axis=2, append=grey[:, :, -1:]))
    grad = gx + gy
    return np.stack([(grad * (owner == i)).sum((1, 2)) for i in range(num_items)], axis=1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        raise ImportError(
            "the slot benchmark's rank correlations need scipy: pip install 'tokenbudget[optimal]'"
        ) from None

    return float(spearmanr(a, b).statistic)


def _oracle_slots(owner: Tensor, grid: tuple[int, int], num_items: int) -> Slots:
    """Ground-truth slots: item i -> slot i, background -> slot num_items (ids kept, not renumbered)."""
    assignment = torch.where(owner >= 0, owner, torch.full_like(owner, num_items))
    batch, n = assignment.shape
    masks = assignment[:, None] == torch.arange(num_items + 1)[None, :, None]
    return Slots(
        assignment, masks.view(batch, num_items + 1, *grid), torch.full((batch,), num_items + 1), grid
    )


def _accuracy(preds: Tensor, labels: Tensor) -> float:
    return round(float((preds == labels).float().mean()), 4)


def run_slot_benchmark(
    num_scenes: int = 300,
    totals: Sequence[int] = (16, 32, 64),
    saccade_totals: Sequence[int] = (12, 16, 24, 32),
    saccade_threshold: float = 0.8,
    learned=None,  # noqa: ANN001 - SlotAttention | None
    learned_num_slots: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    class_queries: Tensor | None = None,
) -> dict:
    """Run every experiment of the module docstring on the first ``num_scenes`` cached test scenes.

    ``class_queries`` [10, C]: one query vector per Fashion-MNIST class in the token space (e.g. the
    projected text of each class name, :class:`~tokenbudget.vlm.ProjectedTextQuery`); the saccade
    experiment then queries each item by its class's vector instead of an exemplar."""
    scenes, tokens = dinov2_scene_tokens(300, "test")
    if not 1 <= num_scenes <= len(tokens):
        raise ValueError(
            f"num_scenes must be in [1, {len(tokens)}] (the cached test scenes), got {num_scenes}"
        )
    tokens = tokens[:num_scenes]
    labels = torch.from_numpy(scenes.labels[:num_scenes])
    owner = torch.from_numpy(scenes.patch_owner(14)[:num_scenes]).flatten(1)
    num_items, grid = scenes.num_items, (16, 16)
    bank, bank_labels = item_reference_bank()
    results: dict = {"num_scenes": num_scenes, "seed": seed}

    log("clustering slots ...")
    slots = cluster_slots(tokens, num_prefix=1, seed=seed)
    quality = {
        "cluster": {
            "best_match_iou": round(float(best_match_iou(slots, owner, num_items).mean()), 4),
            "fg_ari": round(float(foreground_ari(slots, owner).nanmean()), 4),
            "slots_per_scene": round(float(slots.num_slots.float().mean()), 2),
        }
    }
    if learned is not None:
        from ..vlm.slot_attention import learned_slots

        lslots = learned_slots(learned, tokens, learned_num_slots, num_prefix=1, seed=seed)
        quality["slot_attention"] = {
            "best_match_iou": round(float(best_match_iou(lslots, owner, num_items).mean()), 4),
            "fg_ari": round(float(foreground_ari(lslots, owner).nanmean()), 4),
            "slots_per_scene": round(float(lslots.num_slots.float().mean()), 2),
        }
    results["slots"] = quality
    log(f"slot quality: {quality}")

    # (1) budgets follow complexity: ground-truth slots, then clustered slots.
    total = 32
    detail = pixel_detail(scenes.images[:num_scenes], scenes.owner[:num_scenes], num_items)  # [S, I]
    oracle = _oracle_slots(owner, grid, num_items)
    oracle_out = compress_slots(tokens, oracle, total, num_prefix=1)
    oracle_budgets = oracle_out.slot_budgets[:, :num_items].numpy()
    cluster_out = compress_slots(tokens, slots, total, num_prefix=1)
    credited = np.zeros((num_scenes, num_items))
    for b in range(num_scenes):
        credit = dominant_owner(cluster_out.assignment[b, 1:] - 1, owner[b], cluster_out.budgets[b])
        credited[b] = [(credit == i).sum() for i in range(num_items)]
    per_class = {
        FASHION_MNIST_CLASSES[c]: round(float(oracle_budgets[labels.numpy() == c].mean()), 2)
        for c in range(len(FASHION_MNIST_CLASSES))
        if (labels.numpy() == c).any()
    }
    complexity = slot_complexity(tokens, oracle, 1)[:, :num_items].numpy()
    results["complexity"] = {
        "total": total,
        "sums_exact_gt_slots": bool((oracle_out.slot_budgets.sum(1) == total).all()),
        "sums_exact_clustered": bool(all(k == total for k in cluster_out.budgets)),
        "spearman_budget_vs_pixel_detail_gt_slots": round(
            spearman(oracle_budgets.ravel(), detail.ravel()), 4
        ),
        "spearman_complexity_vs_pixel_detail_gt_slots": round(
            spearman(complexity.ravel(), detail.ravel()), 4
        ),
        "spearman_tokens_vs_pixel_detail_clustered": round(spearman(credited.ravel(), detail.ravel()), 4),
        "spearman_budget_vs_pixel_detail_within_scene_gt_slots": round(
            float(np.nanmean([spearman(oracle_budgets[b], detail[b]) for b in range(num_scenes)])), 4
        ),
        "background_share_gt_slots": round(
            float(oracle_out.slot_budgets[:, num_items].float().mean() / total), 4
        ),
        "mean_item_budget_by_class_gt_slots": per_class,
    }
    log(f"complexity: {results['complexity']}")

    # (2) per-item accuracy at equal totals.
    def scores(out: CompressedTokens, items: Tensor | None = None) -> dict:
        """Accuracy with plain and size-weighted means (on the queried ``items`` when given)."""
        row = {}
        for name, weighted in (("plain", False), ("weighted", True)):
            preds = compressed_predictions(out, owner, num_items, bank, bank_labels, weighted)
            if items is None:
                row[name] = _accuracy(preds, labels)
            else:
                row[name] = _accuracy(
                    preds[torch.arange(num_scenes), items], labels[torch.arange(num_scenes), items]
                )
        return row

    accuracy: dict = {}
    counts = slots.counts()
    lo = torch.minimum(torch.ones_like(counts), counts)
    for k in totals:
        row = {"pool": scores(pool(tokens, k, num_prefix=1))}
        # equal weight per slot: a uniform split over the slots
        row["slots_uniform"] = scores(
            merge_slots(tokens, slots, allocate(counts.gt(0).double(), k, lo, counts), 1)
        )
        row["slots_complexity"] = scores(compress_slots(tokens, slots, k, num_prefix=1))
        accuracy[str(k)] = row
        log(f"accuracy at {k} tokens: {row}")
    full = CompressedTokens(tokens, torch.arange(tokens.shape[1]).expand(num_scenes, -1), num_prefix=1)
    accuracy["all_256"] = scores(full)
    results["accuracy"] = accuracy
    log(f"accuracy with all 256 tokens: {accuracy['all_256']}")

    # (3) saccades on a queried item, against one-shot allocations of the same total.
    rng = np.random.default_rng(seed)
    queried = torch.arange(num_scenes) % num_items
    q_labels = labels[torch.arange(num_scenes), queried]
    if class_queries is None:
        queries = torch.stack(
            [bank[int(rng.choice(np.flatnonzero(bank_labels.numpy() == int(c))))] for c in q_labels]
        )
    else:
        if class_queries.shape != (len(FASHION_MNIST_CLASSES), tokens.shape[-1]):
            raise ValueError(
                f"class_queries must be [{len(FASHION_MNIST_CLASSES)}, {tokens.shape[-1]}] (one vector per "
                f"class in the token space), got {tuple(class_queries.shape)}"
            )
        queries = class_queries[q_labels].float()
    results["saccade_query"] = "exemplar" if class_queries is None else "class text"
    classifier = KnnClassifier(bank, bank_labels, k=10)
    saccade: dict = {}
    for k in saccade_totals:
        row = {
            "one_shot_complexity": scores(compress_slots(tokens, slots, k, num_prefix=1), queried),
            "one_shot_relevance": scores(
                compress_slots(tokens, slots, k, num_prefix=1, query=queries), queried
            ),
        }
        sacc = Saccade(k, coarse_per_slot=1, step=2, threshold=None, classifier=classifier)
        row["saccade"] = _saccade_scores(
            sacc, tokens, slots, owner, queries, queried, q_labels, bank, bank_labels
        )
        saccade[str(k)] = row
        log(f"queried-item accuracy at {k} tokens: {row}")
    top = max(saccade_totals)
    sacc = Saccade(top, coarse_per_slot=1, step=2, threshold=saccade_threshold, classifier=classifier)
    key = f"threshold_{saccade_threshold}_up_to_{top}"
    saccade[key] = _saccade_scores(sacc, tokens, slots, owner, queries, queried, q_labels, bank, bank_labels)
    log(f"saccades with threshold {saccade_threshold}: {saccade[key]}")
    results["saccade"] = saccade
    return results


def _saccade_scores(
    sacc: Saccade, tokens, slots, owner, queries, queried, q_labels, bank, bank_labels
) -> dict:  # noqa: ANN001
    """Queried-item accuracy (plain and size-weighted) and mean tokens spent of a saccade run."""
    preds = {"plain": [], "weighted": []}
    spent, hits = [], []
    for b in range(len(tokens)):
        one = Slots(
            slots.assignment[b : b + 1], slots.masks[b : b + 1], slots.num_slots[b : b + 1], slots.grid
        )
        result = sacc(tokens[b : b + 1], one, num_prefix=1, query=queries[b])
        for name, weighted in (("plain", False), ("weighted", True)):
            item_preds = item_predictions(
                result.tokens[1:], result.assignment - 1, owner[b], 4, bank, bank_labels, weighted
            )
            preds[name].append(int(item_preds[queried[b]]))
        spent.append(result.trace.tokens[-1])
        # did the saccades look at the queried item? (the target slot covers most of its patches)
        item_patches = owner[b] == queried[b]
        hits.append(
            bool(item_patches.any())
            and int(torch.mode(one.assignment[0][item_patches]).values) == result.target
        )
    return {
        "plain": _accuracy(torch.tensor(preds["plain"]), q_labels),
        "weighted": _accuracy(torch.tensor(preds["weighted"]), q_labels),
        "mean_tokens_spent": round(float(np.mean(spent)), 2),
        "target_is_queried_item": round(float(np.mean(hits)), 4),
    }
