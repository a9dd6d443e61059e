"""Saccades: spend tokens progressively where the question looks or where the model is unsure.

First pass: every slot gets a few coarse tokens (``coarse_per_slot``, its patches merged within the
slot). Then, step by step, pick the slot to look at next and give it ``step`` more tokens, i.e.
merge that slot's full-resolution patch tokens again to a finer level (a larger per-slot budget):

* with a ``query`` (a vector in the token space): the slot whose weight ``relevance * uncertainty /
  tokens already given to it`` is largest, relevance being the softmax over slots of cosine(query, slot mean) / temperature;
  the *target* (the slot the answer is about) is the most relevant slot;
* without a query: the slot with the largest ``uncertainty / tokens already given to it`` (diminishing
  returns: a slot that stays unsure at any resolution, like plain background, cannot take the whole
  budget); the target is the least confident slot.

Uncertainty is the entropy of a classifier's prediction for the slot (a :class:`KnnClassifier`:
vote shares of the k nearest reference features to the mean of the slot's current tokens); without
a classifier it is the slot's residual, the squared error of its current tokens against its patches
(sum over patches of ||z_i - z_token(i)||^2 on L2-normalised features), which falls to 0 at full
resolution. Stops when the target's confidence (its top vote share) reaches ``threshold``, when the
total budget is spent, or when every slot is at full resolution. :class:`SaccadeTrace` records the
tokens spent at every step; it prints as a table and plots with matplotlib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import torch
from torch import Tensor

from ..ops.select import unit_vectors
from ..ops.slot_merge import merge_to_budget
from .allocate import query_relevance, relevance_weights
from .base import check_finite, check_tokens
from .slots import Slots


class KnnClassifier:
    """Cosine k-NN over a reference bank: ``probs(features [Q, C]) -> vote shares [Q, classes]``."""

    def __init__(self, bank: Tensor, labels: Tensor, k: int = 10, num_classes: int | None = None) -> None:
        if not isinstance(bank, Tensor) or not isinstance(labels, Tensor):
            raise TypeError("bank and labels must be tensors: features [M, C] and class ids [M]")
        if bank.ndim != 2 or labels.shape != bank.shape[:1] or len(bank) == 0 or bank.shape[1] == 0:
            raise ValueError(
                f"bank must be [M, C] (M, C >= 1) with labels [M], got {tuple(bank.shape)} and {tuple(labels.shape)}"
            )
        if not bank.is_floating_point():
            raise TypeError(f"bank must be a float tensor of features, got dtype {bank.dtype}")
        if labels.is_floating_point() or labels.dtype == torch.bool or bool((labels < 0).any()):
            raise ValueError("labels must be integer class ids >= 0")
        check_finite(bank, "the bank features")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (neighbours that vote), got {k!r}")
        classes = int(labels.max()) + 1
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < classes
        ):
            raise ValueError(
                f"num_classes must be an int >= {classes} (the largest label + 1), got {num_classes!r}"
            )
        self.bank = unit_vectors(bank).float()
        self.labels = labels.long()
        self.k = min(k, len(bank))
        self.num_classes = num_classes or classes

    def probs(self, features: Tensor) -> Tensor:
        """Vote shares [Q, classes] of the k nearest bank features to each of ``features`` [Q, C]."""
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[1] != self.bank.shape[1]:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(
                f"features must be [Q, {self.bank.shape[1]}] (the bank's width), got {shape}; embed them with "
                "the backbone the bank was built from"
            )
        check_finite(features, "the features")
        sims = unit_vectors(features).float() @ self.bank.T  # [Q, M]
        top_sim, top = sims.topk(self.k, dim=1)
        votes = torch.zeros(len(features), self.num_classes)
        # Ties between equal vote counts go to the nearer neighbours (tiny similarity bonus).
        votes.scatter_add_(1, self.labels[top], 1.0 + 1e-3 * top_sim)
        return votes / votes.sum(1, keepdim=True)


@dataclass
class SaccadeStep:
    """One step: the slot looked at (-1 for the coarse pass), its new token count, the tokens spent
    so far, and the target slot's confidence and predicted class (NaN / -1 without a classifier)."""

    step: int
    slot: int
    slot_tokens: int
    tokens_spent: int
    confidence: float
    prediction: int


@dataclass
class SaccadeTrace:
    """Tokens spent at every step and why the saccades stopped ("threshold", "budget", "full")."""

    steps: list[SaccadeStep] = field(default_factory=list)
    stopped: str = ""

    @property
    def tokens(self) -> list[int]:
        return [s.tokens_spent for s in self.steps]

    def __str__(self) -> str:
        lines = ["step  slot  slot tokens  tokens spent  confidence  prediction"]
        for s in self.steps:
            slot = "coarse" if s.slot < 0 else str(s.slot)
            lines.append(
                f"{s.step:>4}  {slot:>6}  {s.slot_tokens:>9}  {s.tokens_spent:>12}  {s.confidence:>10.3f}  {s.prediction:>10}"
            )
        lines.append(f"stopped: {self.stopped}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of tokens spent and target confidence per step."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError(
                "plotting a saccade trace needs matplotlib: pip install 'tokenbudget[plots]'"
            ) from None
        fig, ax = plt.subplots(figsize=(5, 3))
        steps = [s.step for s in self.steps]
        ax.step(steps, self.tokens, where="post", label="tokens spent")
        ax.set_xlabel("step")
        ax.set_ylabel("tokens spent")
        conf = [s.confidence for s in self.steps]
        if not all(math.isnan(c) for c in conf):
            twin = ax.twinx()
            twin.plot(steps, conf, "o-", color="tab:orange", label="target confidence")
            twin.set_ylabel("target confidence")
            twin.set_ylim(0, 1.05)
        ax.set_title(f"saccades (stopped: {self.stopped})")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@dataclass
class SaccadeResult:
    """The final tokens [num_prefix + k, C] grouped by slot, each output's slot id [k], the
    ``assignment`` [P] (for each patch token, its row in ``tokens``, prefix rows counted), the
    per-slot ``budgets`` [S], the ``target`` slot and the ``trace``."""

    tokens: Tensor
    slot_ids: Tensor
    assignment: Tensor
    budgets: Tensor
    target: int
    trace: SaccadeTrace


class Saccade:
    """Progressive per-slot refinement of one image's tokens (see the module docstring).

    Args:
        total: the most tokens to spend (patch tokens; prefix tokens come free).
        coarse_per_slot: tokens per slot in the first pass (fewer if a slot has fewer patches).
        step: tokens added to the chosen slot per saccade.
        threshold: stop once the target slot's confidence reaches it, in [0, 1] (needs a
            classifier); ``None`` never stops early.
        classifier: a :class:`KnnClassifier` (or anything with ``probs([Q, C]) -> [Q, classes]``).
        temperature: softmax temperature of query relevance.
    """

    def __init__(
        self,
        total: int,
        *,
        coarse_per_slot: int = 1,
        step: int = 2,
        threshold: float | None = 0.9,
        classifier: KnnClassifier | None = None,
        temperature: float = 0.05,
    ) -> None:
        for name, value in (("total", total), ("coarse_per_slot", coarse_per_slot), ("step", step)):
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if threshold is not None and (isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0):
            raise ValueError(
                f"threshold is the target's confidence (a vote share) at which to stop, in [0, 1], or None to "
                f"never stop early; got {threshold!r}"
            )
        if isinstance(temperature, bool) or not 0 < temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number > 0 (e.g. 0.05), got {temperature!r}")
        if classifier is not None and not callable(getattr(classifier, "probs", None)):
            raise TypeError(
                "classifier must have probs(features [Q, C]) -> [Q, classes], like tb.vlm.KnnClassifier"
            )
        self.total, self.coarse, self.step = int(total), int(coarse_per_slot), int(step)
        self.threshold = None if threshold is None else float(threshold)
        self.classifier, self.temperature = classifier, float(temperature)

    def __call__(
        self, tokens: Tensor, slots: Slots, *, num_prefix: int = 0, query: Tensor | None = None
    ) -> SaccadeResult:
        """Run the saccades on ``tokens`` [1, N, C] (or [N, C]) with its ``slots`` (a batch of one)."""
        tokens = tokens[None] if isinstance(tokens, Tensor) and tokens.ndim == 2 else tokens
        batch, n, _ = check_tokens(tokens, num_prefix, finite=True)
        if not isinstance(slots, Slots):
            raise TypeError(
                f"slots must be a tb.vlm.Slots (e.g. from tb.vlm.cluster_slots), got {type(slots).__name__}"
            )
        if batch != 1 or slots.assignment.shape != (1, n - num_prefix):
            raise ValueError(
                f"Saccade runs on one image: tokens [1, N, C] and its Slots (batch of one) covering the "
                f"N - num_prefix patch tokens; got tokens {tuple(tokens.shape)} and slots "
                f"{tuple(slots.assignment.shape)}"
            )
        patches = tokens[0, num_prefix:].float()  # [P, C]
        labels = slots.assignment[0]  # [P]
        counts = torch.bincount(labels, minlength=slots.max_slots)  # [S]
        present = counts > 0
        members = [(labels == s).nonzero().squeeze(1) for s in range(slots.max_slots)]
        budgets = torch.minimum(counts, torch.full_like(counts, self.coarse))
        if int(budgets.sum()) > self.total:
            raise ValueError(
                f"the coarse pass alone needs {int(budgets.sum())} tokens ({int(present.sum())} slots x "
                f"{self.coarse}), more than total={self.total}; raise total or lower coarse_per_slot"
            )
        normed = unit_vectors(patches)
        means = torch.stack([patches[m].mean(0) if len(m) else torch.zeros_like(patches[0]) for m in members])
        relevance = None
        if query is not None:
            relevance = relevance_weights(
                query_relevance(means[None], query)[0][None], present[None], self.temperature
            )[0]
        merged = {
            s: merge_to_budget(patches[members[s]], int(budgets[s]))
            for s in range(len(members))
            if present[s]
        }

        def uncertainty_and_confidence() -> tuple[Tensor, Tensor, Tensor]:
            slot_ids = [s for s in merged]
            if self.classifier is None:
                residual = torch.zeros(len(counts))
                for s, (out, _, pos) in merged.items():
                    z_out = unit_vectors(out)[pos]
                    residual[s] = (normed[members[s]] - z_out).square().sum()
                nan = torch.full((len(counts),), float("nan"))
                return residual, nan, torch.full((len(counts),), -1)
            probs = self.classifier.probs(torch.stack([merged[s][0].mean(0) for s in slot_ids]))  # [S', K]
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
            unc, conf = torch.zeros(len(counts)), torch.ones(len(counts))
            pred = torch.full((len(counts),), -1)
            idx = torch.tensor(slot_ids)
            unc[idx], conf[idx], pred[idx] = entropy, probs.amax(1), probs.argmax(1)
            return unc, conf, pred

        def target_slot(conf: Tensor) -> int:
            if relevance is not None:
                return int(relevance.argmax())
            if self.classifier is None:
                return -1
            return int(torch.where(present, conf, torch.full_like(conf, 2.0)).argmin())

        trace, step, last = SaccadeTrace(), 0, -1
        while True:
            unc, conf, pred = uncertainty_and_confidence()
            target = target_slot(conf)
            t_conf = float(conf[target]) if target >= 0 and self.classifier is not None else float("nan")
            t_pred = int(pred[target]) if target >= 0 else -1
            spent = int(budgets.sum())
            slot_tokens = int(budgets[last]) if last >= 0 else spent
            trace.steps.append(SaccadeStep(step, last, slot_tokens, spent, t_conf, t_pred))
            room = present & (budgets < counts)
            if self.threshold is not None and not math.isnan(t_conf) and t_conf >= self.threshold:
                trace.stopped = "threshold"
                break
            if spent >= self.total:
                trace.stopped = "budget"
                break
            if not room.any():
                trace.stopped = "full"
                break
            # Uncertainty per token already spent on the slot: diminishing returns, so a slot that
            # stays unsure however fine it gets (plain background) cannot soak up the whole budget.
            score = (unc + 1e-6) / budgets.clamp_min(1)
            if relevance is not None:
                score = score * relevance
            last = int(torch.where(room, score, torch.full_like(score, -1.0)).argmax())
            budgets[last] += min(self.step, int(counts[last] - budgets[last]), self.total - spent)
            merged[last] = merge_to_budget(patches[members[last]], int(budgets[last]))
            step += 1
        return self._result(tokens[0, :num_prefix], merged, members, budgets, target, trace, len(labels))

    @staticmethod
    def _result(
        prefix: Tensor,
        merged: dict,
        members: list[Tensor],
        budgets: Tensor,
        target: int,
        trace: SaccadeTrace,
        n: int,
    ) -> SaccadeResult:
        """Join the per-slot outputs in slot order behind the prefix tokens, with the patch -> output map."""
        parts, ids = [prefix.float()], []
        assignment = torch.empty(n, dtype=torch.long)
        start = prefix.shape[0]
        for s in sorted(merged):
            out, _, position = merged[s]
            assignment[members[s]] = position + start
            start += out.shape[0]
            parts.append(out)
            ids.append(torch.full((out.shape[0],), s, dtype=torch.long))
        return SaccadeResult(torch.cat(parts), torch.cat(ids), assignment, budgets, target, trace)
