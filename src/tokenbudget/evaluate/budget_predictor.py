"""Per-image budgets against one budget for all, at the same mean token count.

Scores like the quality harness: k-NN and a linear probe fit on *full-token* training features,
applied to test features computed under each condition. Rows:

* ``fixed keep=b``: ToMe at one budget ``b`` for every image (each candidate budget);
* ``predicted``: each image at the budget the predictor chose (:func:`forward_with_budgets`, a real
  grouped run of the model);
* ``fixed, same mean``: ToMe at the predicted budgets' mean keep for every image, the same mean
  final token count (a real run);
* ``shuffled predicted``: the predicted budgets permuted across images, same token histogram (does
  the predictor pick *which* images need tokens, or only how many?);
* ``oracle``: each test image at its own agreement target (not deployable: needs all budgets run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate

import torch
from torch import Tensor, nn

from ..adapters import find_adapter
from ..adaptive.budget_predictor import BudgetPredictor, agreement_targets, forward_with_budgets, model_glance
from ..config import BudgetConfig, ToMe
from ..flops import model_flops
from ..patch import apply, remove
from ..strategies import ScheduledStrategy
from .features import extract_features
from .metrics import knn_accuracy, linear_probe_accuracy


@dataclass
class BudgetRow:
    """One condition's accuracy, mean kept fraction, mean final tokens and mean FLOPs fraction."""

    condition: str
    mean_keep: float
    mean_tokens: float
    flops: float
    knn_acc: float
    linear_acc: float
    budget_counts: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def tome_cost(model: nn.Module, keep: float) -> tuple[int, float]:
    """(tokens after the last block, FLOPs fraction of the unpatched blocks) of ``tb.ToMe(keep=keep)``
    on ``model`` at its default input size."""
    adapter = find_adapter(model)
    tokens, prefix, dims = adapter.default_num_tokens, adapter.num_prefix, adapter.block_dims()
    if keep >= 1.0:
        return tokens, 1.0
    _, merged = ScheduledStrategy(BudgetConfig(keep=keep), len(dims)).compute_plan(tokens, prefix)
    per_layer = list(accumulate(merged, lambda n, r: n - r, initial=tokens))[1:]
    full = model_flops(tokens, [tokens] * len(dims), dims)
    return per_layer[-1], model_flops(tokens, per_layer, dims) / full


def evaluate_budgets(
    model: nn.Module,
    predictor: BudgetPredictor,
    train_full: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    test_budget_features: Tensor,
    min_cosine: float,
    *,
    batch_size: int = 64,
    seed: int = 0,
    run_predicted: bool = True,
) -> list[BudgetRow]:
    """Rows of the module docstring. ``test_budget_features`` [N, K, 2C]: the test images' harness
    features under each of the predictor's budgets (the last one, 1.0, the full model).

    ``run_predicted=False`` takes the predicted row's features from ``test_budget_features`` (each
    image's row at its chosen budget) instead of a grouped run: the same features, since ToMe
    reduces every image on its own (the tests check the grouped run against per-image ToMe)."""
    budgets = torch.tensor(predictor.budgets)
    costs = {b: tome_cost(model, b) for b in predictor.budgets}

    def score(name: str, feats: Tensor, index: Tensor | None = None, keep: float | None = None) -> BudgetRow:
        if index is not None:
            keeps = budgets[index]
            tokens = torch.tensor([float(costs[b][0]) for b in predictor.budgets])[index]
            flops = torch.tensor([costs[b][1] for b in predictor.budgets])[index]
            mean_keep, mean_tokens, mean_flops = (
                float(keeps.mean()),
                float(tokens.mean()),
                float(flops.mean()),
            )
            counts = torch.bincount(index, minlength=len(budgets)).tolist()
        else:
            n_tokens, fl = tome_cost(model, keep)
            mean_keep, mean_tokens, mean_flops, counts = keep, float(n_tokens), fl, None
        return BudgetRow(
            name,
            mean_keep,
            mean_tokens,
            mean_flops,
            knn_accuracy(train_full, train_labels, feats, test_labels, k=min(20, len(train_labels))),
            linear_probe_accuracy(train_full, train_labels, feats, test_labels),
            counts,
        )

    rows = [
        score(f"fixed keep={b:g}", test_budget_features[:, k], keep=b)
        for k, b in enumerate(predictor.budgets)
    ]
    if run_predicted:
        predicted = forward_with_budgets(
            model, predictor, test_images, lambda m, x: extract_features(m, x, batch_size)
        )
        chosen, predicted_features = predicted.budget_index, predicted.outputs
    else:
        with torch.no_grad():
            chosen = torch.cat(
                [
                    predictor.choose(model_glance(model, test_images[i : i + batch_size]))
                    for i in range(0, len(test_images), batch_size)
                ]
            )
        predicted_features = _select(test_budget_features, chosen)
    rows.append(score("predicted", predicted_features, chosen))
    mean_keep = round(float(budgets[chosen].mean()), 4)
    if mean_keep < 1.0:
        apply(model, ToMe(keep=mean_keep))
    try:
        same = extract_features(model, test_images, batch_size)
    finally:
        remove(model)
    rows.append(score("fixed, same mean", same, keep=mean_keep))
    generator = torch.Generator().manual_seed(seed)
    shuffled = chosen[torch.randperm(len(test_images), generator=generator)]
    rows.append(score("shuffled predicted", _select(test_budget_features, shuffled), shuffled))
    oracle = agreement_targets(test_budget_features[:, -1], test_budget_features, min_cosine)
    rows.append(score("oracle", _select(test_budget_features, oracle), oracle))
    return rows


def _select(features: Tensor, index: Tensor) -> Tensor:
    """Row ``index[n]`` of each image's budget features [N, K, F] -> [N, F]."""
    return features[torch.arange(len(index)), index]


def format_budget_table(rows: Sequence[BudgetRow]) -> str:
    header = f"{'condition':<20} {'keep':>6} {'tokens':>7} {'FLOPs':>6} {'k-NN':>6} {'linear':>7}  images per budget"
    lines = [header, "-" * len(header)]
    for r in rows:
        counts = " ".join(str(c) for c in r.budget_counts) if r.budget_counts else ""
        lines.append(
            f"{r.condition:<20} {r.mean_keep:>6.3f} {r.mean_tokens:>7.1f} {r.flops:>6.3f} {r.knn_acc:>6.3f} {r.linear_acc:>7.3f}  {counts}"
        )
    return "\n".join(lines)
