"""A learned per-image token budget: ``tb.adaptive.BudgetPredictor`` looks at a glance of the image and picks
how many tokens ToMe should leave for it.

The glance is the model's own patch embedding [B, N, C] (one strided convolution, before position
embeddings and blocks: about 2 % of DINOv2-S's FLOPs). The predictor embeds each patch
(``LayerNorm -> Linear(C, h) -> GELU``), pools the image by the mean and the max over patches
(the max keeps the one busy patch a mean would wash out), and an MLP gives one logit per budget;
the softmax over budgets is the prediction. At inference each image takes the most probable
budget and runs under ``tb.ToMe(keep=budget)`` (:func:`forward_with_budgets`).

Training (:func:`train_budget_predictor`) uses targets from the model itself
(:func:`agreement_targets`): the smallest budget whose reduced features still agree with the
full-token features. The loss is cross entropy to those targets plus the budget loss
``lambda * (expected_keep - target_keep)^2`` (:func:`budget_loss`) on the batch mean of the
expected kept fraction ``sum_k p_k keep_k``, which steers the mean budget to ``target_keep``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import find_adapter
from ..config import ToMe
from ..parts import load_weights, read_part, save_part
from ..patch import apply, is_patched, remove

FORMAT = "tokenbudget-budget-predictor"
VERSION = 1
_WHAT = "budget predictor"
_HINT = "train one with: tokenbudget train-budget-predictor --out PATH"
DEFAULT_BUDGETS = (0.25, 0.5, 0.75, 1.0)


def _check_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    budgets = tuple(float(b) for b in budgets)
    if len(budgets) < 2 or any(not 0.0 < b <= 1.0 for b in budgets) or list(budgets) != sorted(set(budgets)):
        raise ValueError(
            f"budgets must be at least two increasing keep fractions in (0, 1], e.g. {DEFAULT_BUDGETS}; "
            f"got {budgets}"
        )
    return budgets


class BudgetPredictor(nn.Module):
    """Predicts a softmax distribution over token budgets from an image's patch embeddings.

    Args:
        embed_dim: width C of the model's patch embedding.
        budgets: kept fractions of the non-prefix tokens after the last block, increasing
            (``tb.ToMe(keep=b)``); ``1.0`` is the unpatched model.
        hidden: width of the per-patch embedding and the MLP.
        info: free-form training record, saved in the JSON.

    ``forward(glance [B, N, C])`` gives logits [B, len(budgets)]; :meth:`probabilities`, the softmax;
    :meth:`choose`, the budget index of each image (most probable).
    """

    def __init__(
        self,
        embed_dim: int,
        budgets: Sequence[float] = DEFAULT_BUDGETS,
        hidden: int = 128,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or hidden < 1:
            raise ValueError(f"embed_dim and hidden must be >= 1, got {embed_dim} and {hidden}")
        self.embed_dim, self.hidden = int(embed_dim), int(hidden)
        self.budgets = _check_budgets(budgets)
        self.info = dict(info or {})
        self.embed = nn.Sequential(
            nn.LayerNorm(self.embed_dim), nn.Linear(self.embed_dim, self.hidden), nn.GELU()
        )
        self.classify = nn.Sequential(
            nn.LayerNorm(2 * self.hidden),
            nn.Linear(2 * self.hidden, self.hidden),
            nn.GELU(),
            nn.Linear(self.hidden, len(self.budgets)),
        )

    def forward(self, glance: Tensor) -> Tensor:
        if glance.ndim != 3 or glance.shape[-1] != self.embed_dim:
            raise ValueError(f"expected a glance [B, N, {self.embed_dim}], got {tuple(glance.shape)}")
        h = self.embed(glance.float())  # [B, N, h]
        pooled = torch.cat([h.mean(dim=1), h.amax(dim=1)], dim=-1)  # [B, 2h]
        return self.classify(pooled)  # [B, K]

    def probabilities(self, glance: Tensor) -> Tensor:
        """Softmax over the budgets [B, K]."""
        return self(glance).softmax(dim=-1)

    def choose(self, glance: Tensor) -> Tensor:
        """Budget index [B] of each image: its most probable budget."""
        return self(glance).argmax(dim=-1)

    def keep_values(self) -> Tensor:
        """The budgets as a tensor [K]."""
        return torch.tensor(self.budgets)

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "embed_dim": self.embed_dim,
            "budgets": list(self.budgets),
            "hidden": self.hidden,
            "info": self.info,
        }

    def check_model(self, model: nn.Module) -> None:
        """``ValueError`` when the predictor was trained on another model's patch embedding width."""
        width = find_adapter(model).embed_dim
        if width != self.embed_dim:
            raise ValueError(
                f"budget predictor was trained for embed dim {self.embed_dim}, this model has {width}; "
                "train one for it with tokenbudget train-budget-predictor"
            )


def save_budget_predictor(predictor: BudgetPredictor, path: str | Path) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` and ``STEM.json``; returns both paths."""
    return save_part(predictor, predictor.config(), path, _WHAT)


def load_budget_predictor(path: str | Path) -> BudgetPredictor:
    """A predictor written by :func:`save_budget_predictor` (STEM, STEM.safetensors or STEM.json)."""
    meta, state, weights = read_part(path, FORMAT, VERSION, _WHAT, _HINT)
    predictor = BudgetPredictor(meta["embed_dim"], meta["budgets"], meta["hidden"], meta.get("info"))
    load_weights(predictor, state, weights, _WHAT)
    return predictor.eval()


def agreement_targets(full: Tensor, reduced: Tensor, min_cosine: float) -> Tensor:
    """Index [N] of the smallest budget whose reduced feature agrees with the full-token one.

    ``full`` [N, F]: features with all tokens; ``reduced`` [N, K, F]: features under each budget
    (increasing). Agreement: cosine similarity >= ``min_cosine``. The last budget always counts as
    agreeing (it is the fallback, normally 1.0 = the full model)."""
    if reduced.ndim != 3 or full.shape != (reduced.shape[0], reduced.shape[2]):
        raise ValueError(
            f"expected full features [N, F] and reduced ones [N, K, F], got {tuple(full.shape)} and "
            f"{tuple(reduced.shape)}"
        )
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    cosine = F.cosine_similarity(reduced.float(), full.float()[:, None], dim=-1)  # [N, K]
    agrees = cosine >= min_cosine
    agrees[:, -1] = True
    return agrees.int().argmax(dim=1)  # the first budget that agrees


def budget_loss(probabilities: Tensor, budgets: Tensor, target_keep: float, weight: float) -> Tensor:
    """``weight * (mean_b sum_k p_bk budget_k - target_keep)^2``: the batch's expected kept fraction
    (probabilities [B, K], budgets [K]) pulled to ``target_keep``."""
    expected = (probabilities * budgets.to(probabilities)).sum(dim=-1).mean()
    return weight * (expected - target_keep) ** 2


@dataclass
class BudgetTrainReport:
    """Loss per epoch (total, cross entropy, budget) and the final mean expected keep."""

    loss: list[float]
    ce_loss: list[float]
    budget_loss: list[float]
    expected_keep: float
    seconds: float


def train_budget_predictor(
    glance: Tensor,
    targets: Tensor,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    *,
    target_keep: float | None = None,
    budget_weight: float = 10.0,
    hidden: int = 128,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    progress: Callable[[int, dict], None] | None = None,
    info: dict[str, Any] | None = None,
) -> tuple[BudgetPredictor, BudgetTrainReport]:
    """Train a :class:`BudgetPredictor` on glances [N, P, C] and target budget indices [N].

    Loss = cross entropy to ``targets`` + :func:`budget_loss` with ``budget_weight`` (lambda) and
    ``target_keep`` (default: the targets' mean keep, so the budget term only steers when asked to).
    """
    budgets = _check_budgets(budgets)
    if glance.ndim != 3 or targets.shape != glance.shape[:1]:
        raise ValueError(
            f"expected glances [N, P, C] and targets [N], got {tuple(glance.shape)} and {tuple(targets.shape)}"
        )
    if int(targets.min()) < 0 or int(targets.max()) >= len(budgets):
        raise ValueError(f"targets must index the {len(budgets)} budgets")
    keep_t = torch.tensor(budgets)
    if target_keep is None:
        target_keep = float(keep_t[targets].mean())
    if not budgets[0] <= target_keep <= budgets[-1]:
        raise ValueError(
            f"target_keep {target_keep} must lie between the budgets {budgets[0]} and {budgets[-1]}"
        )
    torch.manual_seed(seed)
    predictor = BudgetPredictor(glance.shape[-1], budgets, hidden, info)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    report = BudgetTrainReport([], [], [], 0.0, 0.0)
    start = time.perf_counter()
    predictor.train()
    for epoch in range(epochs):
        order = torch.randperm(len(glance), generator=generator)
        sums = torch.zeros(3)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            logits = predictor(glance[idx])
            ce = F.cross_entropy(logits, targets[idx])
            steer = budget_loss(logits.softmax(dim=-1), keep_t, target_keep, budget_weight)
            loss = ce + steer
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss, ce, steer]).detach() * len(idx)
        schedule.step()
        sums /= len(glance)
        report.loss.append(float(sums[0]))
        report.ce_loss.append(float(sums[1]))
        report.budget_loss.append(float(sums[2]))
        if progress is not None:
            progress(epoch + 1, {"loss": report.loss[-1], "ce": report.ce_loss[-1]})
    predictor.eval()
    with torch.no_grad():
        probs = torch.cat([predictor.probabilities(glance[i : i + 256]) for i in range(0, len(glance), 256)])
    report.expected_keep = float((probs * keep_t).sum(-1).mean())
    report.seconds = time.perf_counter() - start
    predictor.info.update(
        {
            "target_keep": target_keep,
            "budget_weight": budget_weight,
            "epochs": epochs,
            "train_expected_keep": round(report.expected_keep, 4),
            "train_target_accuracy": round(float((probs.argmax(-1) == targets).float().mean()), 4),
        }
    )
    return predictor, report


def model_glance(model: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """The predictor's input for ``images`` [N, 3, H, W]: the model's patch embeddings [N, P, C]
    (computed without gradient, usable as training data)."""
    glance = find_adapter(model).patch_embeddings
    with torch.no_grad():
        return torch.cat([glance(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@dataclass
class BudgetedOutput:
    """Outputs of a per-image-budget forward, in input order.

    Attributes:
        outputs: [B, ...] what ``run`` returned for each image.
        budget_index: [B] the budget each image ran at (index into ``budgets``).
        keep: [B] that budget's kept fraction.
        group_sizes: images run per budget (a budget no image chose is absent).
    """

    outputs: Tensor
    budget_index: Tensor
    keep: Tensor
    group_sizes: dict[float, int]


def forward_with_budgets(
    model: nn.Module,
    predictor: BudgetPredictor,
    images: Tensor,
    run: Callable[[nn.Module, Tensor], Tensor] | None = None,
    *,
    budget_index: Tensor | None = None,
) -> BudgetedOutput:
    """Run each image of ``images`` [B, 3, H, W] at its own predicted budget.

    Images are grouped by budget; each group runs under ``tb.ToMe(keep=budget)`` (a budget of 1.0
    runs the unpatched model), with no padding, and the outputs go back to input order. ``run(model,
    x)`` makes each group's output (default: ``model(x)``; it must give one row per image).
    ``budget_index`` [B] overrides the predictor's choice. The model is left unpatched.
    """
    if is_patched(model):
        raise ValueError("the model is already patched by tokenbudget; call tb.remove(model) first")
    predictor.check_model(model)
    if images.ndim != 4:
        raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
    if run is None:
        run = _call_model
    with torch.no_grad():
        glance = find_adapter(model).patch_embeddings
        choice = predictor.choose(glance(images)) if budget_index is None else budget_index
    choice = choice.to(torch.long).cpu()
    if (
        choice.shape != (images.shape[0],)
        or int(choice.min()) < 0
        or int(choice.max()) >= len(predictor.budgets)
    ):
        raise ValueError(f"budget_index must be [B] indices into the {len(predictor.budgets)} budgets")
    outputs: Tensor | None = None
    groups = {}
    for k, keep in enumerate(predictor.budgets):
        members = torch.nonzero(choice == k).flatten()
        if len(members) == 0:
            continue
        groups[keep] = len(members)
        if keep < 1.0:
            apply(model, ToMe(keep=keep))
        try:
            out = run(model, images[members.to(images.device)])
        finally:
            remove(model)
        if outputs is None:
            outputs = out.new_empty((images.shape[0], *out.shape[1:]))
        outputs[members.to(out.device)] = out
    keep_t = predictor.keep_values()[choice]
    return BudgetedOutput(outputs, choice, keep_t, groups)


def _call_model(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)
