"""Early exit: a sample leaves the ViT at the first exit that is confident enough about it.

``tb.adaptive.EarlyExit(model, heads, thresholds)`` wraps a frozen timm ViT and its exit heads
(:mod:`tokenbudget.adaptive.exit_heads`). The forward runs the model's own modules block by
block (:mod:`tokenbudget.adaptive.blockwise`); after each exit layer the head reads the class
token, and every sample whose *confidence*, the maximum softmax probability of that head, is at
least the exit's threshold leaves with that head's logits. Those samples are removed from the
batch, so the later blocks run on fewer images. The last exit takes every sample still running.

Thresholds are calibrated to a budget, a target mean depth or mean FLOPs, with the budgeted
classification protocol of MSDNet as used by "Not All Images are Worth 16x16 Words" (DVT): a
sample leaves at exit ``e`` with probability ``q (1 - q)^e`` (the last exit takes the rest); ``q``
is solved so the expected cost meets the budget; then, exit by exit on a calibration set, the
threshold is set so that exactly that share of the calibration samples leaves there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters import find_adapter
from ..flops import block_flops
from .blockwise import blockwise_adapter, layer_class_tokens
from .exit_heads import ExitHeads, load_exit_heads


def max_softmax(logits: Tensor) -> Tensor:
    """Confidence of each row of ``logits`` [..., K]: its largest softmax probability [...]."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def simulate_exits(confidences: Tensor, thresholds: Sequence[float]) -> Tensor:
    """Exit index [N] of each sample given its confidence at every exit [N, E] and the thresholds
    of the first E - 1 exits: the first exit whose confidence is >= its threshold, else the last."""
    num_exits = confidences.shape[1]
    if len(thresholds) != num_exits - 1:
        raise ValueError(f"{num_exits} exits take {num_exits - 1} thresholds, got {len(thresholds)}")
    leave = confidences[:, :-1] >= torch.tensor(thresholds, dtype=confidences.dtype)  # [N, E-1]
    leave = torch.cat([leave, torch.ones_like(leave[:, :1])], dim=1)  # the last exit takes the rest
    return leave.int().argmax(dim=1)  # first True


def geometric_exit_fractions(q: float, num_exits: int) -> Tensor:
    """Share of samples leaving at each exit [E]: ``q (1 - q)^e`` for e < E - 1, the rest at the last."""
    e = torch.arange(num_exits - 1, dtype=torch.float64)
    early = q * (1 - q) ** e
    return torch.cat([early, (1 - early.sum()).clamp_min(0).reshape(1)])


def calibrate_thresholds(confidences: Tensor, costs: Sequence[float], target: float) -> list[float]:
    """Thresholds of the first E - 1 exits that make the mean cost of the calibration samples
    (confidences [N, E]) ``target``, given each exit's cost [E] (increasing: depth or FLOPs).

    MSDNet/DVT's budgeted protocol: ``q`` of :func:`geometric_exit_fractions` is bisected so that
    the expected cost is ``target``; then exit by exit the threshold is the confidence of the
    ``n_e``-th most confident sample still running, ``n_e`` that exit's share of the N samples
    (rounded cumulatively, so the shares add up to N). ``inf`` where no sample should leave.
    """
    costs_t = torch.tensor([float(c) for c in costs], dtype=torch.float64)
    n, num_exits = confidences.shape
    if len(costs_t) != num_exits or num_exits < 1:
        raise ValueError(f"{num_exits} exits need {num_exits} costs, got {len(costs_t)}")
    if n == 0:
        raise ValueError("calibration needs at least one sample")
    if not (costs_t[1:] > costs_t[:-1]).all():
        raise ValueError(f"exit costs must increase, got {costs_t.tolist()}")
    lo_cost, hi_cost = float(costs_t[0]), float(costs_t[-1])
    if not lo_cost - 1e-9 <= target <= hi_cost + 1e-9:
        raise ValueError(
            f"target cost {target:g} is out of reach: choose one between the first exit's {lo_cost:g} "
            f"and the last exit's {hi_cost:g}"
        )

    def expected(q: float) -> float:
        return float((geometric_exit_fractions(q, num_exits) * costs_t).sum())

    lo, hi = 0.0, 1.0  # expected() falls from the last exit's cost (q = 0) to the first's (q = 1)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) > target else (lo, mid)
    shares = geometric_exit_fractions((lo + hi) / 2, num_exits)
    goal = torch.round(shares.cumsum(0) * n).long()  # samples gone after each exit
    running = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for e in range(num_exits - 1):
        leaving = int(goal[e]) - int((~running).sum())
        candidates = confidences[running, e]
        if leaving <= 0 or len(candidates) == 0:
            thresholds.append(math.inf)
            continue
        threshold = float(candidates.sort(descending=True).values[min(leaving, len(candidates)) - 1])
        thresholds.append(threshold)
        running &= ~(confidences[:, e] >= threshold)
    return thresholds


def exit_costs(model: nn.Module, layers: Sequence[int], num_classes: int) -> list[float]:
    """FLOPs of a sample that leaves at each exit after ``layers``, as a fraction of the backbone's
    (patch embedding and all blocks at the default token count): patch embedding, the blocks up to
    the exit and every head it was scored by (LayerNorm ~8C + linear 2CK each)."""
    adapter = find_adapter(model)
    tokens = adapter.default_num_tokens
    if tokens is None:
        raise ValueError("exit costs need the model's default patch grid (a fixed input size)")
    patch = adapter.embedding_flops()
    blocks = [block_flops(tokens, tokens, dims) for dims in adapter.block_dims()]
    width = adapter.embed_dim
    head = 2 * width * num_classes + 8 * width
    full = patch + sum(blocks)
    return [(patch + sum(blocks[: layer + 1]) + head * (i + 1)) / full for i, layer in enumerate(layers)]


@dataclass
class ExitOutput:
    """What one early-exit forward did, per input image (input order).

    Attributes:
        logits: [B, K] the logits of the head each image left at.
        exit_index: [B] which exit (index into ``EarlyExit.exits``).
        exit_layer: [B] the block (0-based) after which it left; ``exit_layer + 1`` blocks ran on it.
        confidence: [B] its max softmax probability at that exit.
        batch_per_block: images each block ran on (falls as samples leave).
    """

    logits: Tensor
    exit_index: Tensor
    exit_layer: Tensor
    confidence: Tensor
    batch_per_block: list[int] = field(default_factory=list)


class EarlyExit(nn.Module):
    """A frozen timm ViT with exit heads: each sample leaves at its first confident exit.

    Args:
        model: an unpatched timm ``VisionTransformer`` with a class token (kept frozen, in eval mode).
        heads: :class:`ExitHeads` trained for it, or the path of saved heads (``train-exits --out``).
        thresholds: confidence (max softmax) each non-final exit needs: one float for all, or one per
            exit but the last (``len(exits) - 1``). ``0`` sends every sample out at the first exit,
            ``inf`` runs every sample to the last one. ``None``: the thresholds stored with the heads
            by ``train-exits --target-flops`` (else ``inf``).
        exits: the exit layers to use, a subset of the heads' layers (default: all of them).

    ``forward(images)`` returns an :class:`ExitOutput`; :meth:`calibrate` sets the thresholds for a
    target mean depth or FLOPs.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: ExitHeads | str | Path,
        thresholds: float | Sequence[float] | None = None,
        exits: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.adapter = blockwise_adapter(model)
        if not isinstance(heads, ExitHeads):
            heads = load_exit_heads(heads)
        heads.check_model(model)
        self.model = model.eval().requires_grad_(False)
        self.heads = heads.eval().requires_grad_(False)
        exits = tuple(sorted(int(e) for e in (exits if exits is not None else heads.layers)))
        missing = [e for e in exits if e not in heads.layers]
        if not exits or missing:
            raise ValueError(
                f"exits {list(exits)} must be a non-empty subset of the heads' {list(heads.layers)}"
            )
        self.exits = exits
        if thresholds is None:
            stored = heads.info.get("thresholds")
            thresholds = stored if stored is not None and len(stored) == len(exits) - 1 else math.inf
        self.thresholds = thresholds

    @property
    def thresholds(self) -> list[float]:
        """Confidence each exit but the last needs (the last takes every sample still running)."""
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, value: float | Sequence[float]) -> None:
        values = [float(value)] * (len(self.exits) - 1) if isinstance(value, (int, float)) else list(value)
        if len(values) != len(self.exits) - 1:
            raise ValueError(
                f"{len(self.exits)} exits take {len(self.exits) - 1} thresholds (the last exit takes "
                f"every sample left), got {len(values)}"
            )
        if any(math.isnan(v) for v in values):
            raise ValueError("thresholds must be numbers, got NaN")
        self._thresholds = tuple(float(v) for v in values)

    def costs(self, unit: str = "flops") -> list[float]:
        """Cost of leaving at each exit: ``"flops"`` (fraction of the backbone's) or ``"depth"`` (blocks)."""
        if unit == "depth":
            return [float(layer + 1) for layer in self.exits]
        if unit == "flops":
            return exit_costs(self.model, self.exits, self.heads.num_classes)
        raise ValueError(f"cost unit must be 'flops' or 'depth', got {unit!r}")

    def confidences(self, layer_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(confidence [N, E], logits [N, E, K]) of every exit from class tokens after each block
        ([N, depth(+2), C], as :func:`~tokenbudget.adaptive.blockwise.layer_class_tokens` gives)."""
        if layer_tokens.ndim != 3 or layer_tokens.shape[1] < self.heads.depth:
            raise ValueError(
                f"expected class tokens after each of the {self.heads.depth} blocks [N, depth, C], "
                f"got {tuple(layer_tokens.shape)}"
            )
        with torch.no_grad():
            logits = torch.stack([self.heads.head(e)(layer_tokens[:, e].float()) for e in self.exits], dim=1)
        return max_softmax(logits), logits

    def calibrate(
        self, data: Tensor, *, target_depth: float | None = None, target_flops: float | None = None
    ) -> list[float]:
        """Set (and return) the thresholds that give calibration ``data`` a mean depth (blocks) of
        ``target_depth`` or a mean FLOPs fraction of ``target_flops`` (give one).

        ``data``: images [N, 3, H, W], or their cached class tokens after each block [N, depth(+2), C]."""
        if (target_depth is None) == (target_flops is None):
            raise ValueError("give one calibration target: target_depth or target_flops")
        if data.ndim == 4:
            data = layer_class_tokens(self.model, data)
        confidences, _ = self.confidences(data)
        unit, target = ("depth", target_depth) if target_depth is not None else ("flops", target_flops)
        self.thresholds = calibrate_thresholds(confidences, self.costs(unit), float(target))
        return self.thresholds

    def forward(self, images: Tensor) -> ExitOutput:
        """Classify ``images`` [B, 3, H, W] (normalised for the model), each leaving at its first
        confident exit. Samples that leave are dropped from the batch before the next block."""
        if images.ndim != 4:
            raise ValueError(f"expected images [B, 3, H, W], got shape {tuple(images.shape)}")
        batch = images.shape[0]
        logits_out = images.new_zeros(batch, self.heads.num_classes)
        exit_index = torch.full((batch,), -1, dtype=torch.long, device=images.device)
        confidence = images.new_zeros(batch)
        running = torch.arange(batch, device=images.device)  # input positions of the rows of x
        x = self.adapter.embed(images)  # [B, N, C]
        batch_per_block = []
        last = len(self.exits) - 1
        for layer, block in enumerate(self.adapter.blocks):
            batch_per_block.append(len(running))
            x = block(x)
            if layer not in self.exits:
                continue
            e = self.exits.index(layer)
            logits = self.heads.head(layer)(x[:, 0])  # [b, K]
            conf = max_softmax(logits)
            leave = conf >= self._thresholds[e] if e < last else torch.ones_like(conf, dtype=torch.bool)
            gone = running[leave]
            logits_out[gone] = logits[leave].to(logits_out.dtype)
            confidence[gone] = conf[leave].to(confidence.dtype)
            exit_index[gone] = e
            x, running = x[~leave], running[~leave]
            if len(running) == 0:
                break
        layers = torch.tensor(self.exits, device=images.device)
        return ExitOutput(logits_out, exit_index, layers[exit_index], confidence, batch_per_block)
