"""TokenState (what one forward did to the tokens) and AdaptivePatchState (what it did to each image's patch size). A fresh state is made by every forward."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .ops.merge import token_map_to_source

#: weight left to a pruned key in the training-time masked attention (see TokenState.attention_bias)
DECISION_EPS = 1e-6


@dataclass
class TokenState:
    """Per-forward record of the token sequence.

    Attributes:
        batch_size: images in the forward.
        input_tokens: tokens entering the first block (prefix included).
        num_prefix: leading class/distillation/register tokens, never merged.
        grid: (rows, cols) of the patch grid at the input, when the model knows it.
        requested_per_layer: tokens each block was asked to merge.
        merged_per_layer: tokens each block merges (less than requested where a block can merge at
            most half of its non-prefix tokens).
        tokens_per_layer: token count after each block that has run in this forward.
        size: [B, N, 1] how many input tokens each current token stands for; ``None`` while all are 1.
        token_map: [B, N0] for each input token, the index of the current token containing it
            (only with ``trace_source=True``).
        positions: [B, N, 2] (row, col) centroid of the patches each token covers (only for
            strategies that match by position).
        decision: [B, N, 1] soft keep decisions (1 kept, 0 pruned) of learned pruning while it
            trains: pruned tokens stay in the batch but are masked out of attention.
        padding: [B, N] bool, True for the size-0 padding tokens of a ragged batch (the entropy
            guard lets images merge different numbers of tokens); ``None`` while there is none.
            Padding is masked out of attention as a key, with or without proportional attention.
        guard_layers: per block where the entropy guard ran, ``(merged [B], withheld [B],
            padding [B])``: real merges of each image, merges the guard withheld from the plan,
            and padding tokens after the block.
        skipped_layers: blocks the budget had merge that the cost model (``cost_model="auto"``)
            left unmerged because merging there cost more than it saved; their merges moved into
            the blocks that pay (``merged_per_layer`` is the schedule that ran).
    """

    batch_size: int
    input_tokens: int
    num_prefix: int
    grid: tuple[int, int] | None
    requested_per_layer: list[int]
    merged_per_layer: list[int]
    tokens_per_layer: list[int] = field(default_factory=list)
    size: Tensor | None = None
    token_map: Tensor | None = None
    positions: Tensor | None = None
    device: torch.device | None = None
    decision: Tensor | None = None
    padding: Tensor | None = None
    guard_layers: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    skipped_layers: list[int] = field(default_factory=list)
    _bias: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        """Current token count."""
        return self.tokens_per_layer[-1] if self.tokens_per_layer else self.input_tokens

    @property
    def clamped_layers(self) -> list[int]:
        """Blocks that merged fewer tokens than requested."""
        pairs = zip(self.requested_per_layer, self.merged_per_layer, strict=True)
        return [i for i, (req, got) in enumerate(pairs) if got < req]

    @property
    def sizes(self) -> Tensor:
        """[B, N] token sizes (all ones before any merge)."""
        if self.size is None:
            return torch.ones(self.batch_size, self.num_tokens, device=self.device)
        return self.size[..., 0]

    @property
    def source(self) -> Tensor | None:
        """[B, N, N0] bool: which input tokens each current token contains (``None`` unless traced)."""
        if self.token_map is None:
            return None
        return token_map_to_source(self.token_map, self.num_tokens)

    def _per_image(self, slot: int) -> Tensor:
        """[B, L] one of the guard's per-image records over the blocks that ran (0 where it did not
        run; for padding, the count carries over blocks that did not reduce)."""
        rows, current = [], torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        for layer in range(len(self.tokens_per_layer)):
            record = self.guard_layers.get(layer)
            if record is not None:
                current = record[slot]
            elif slot != 2:
                current = torch.zeros_like(current)
            rows.append(current)
        if not rows:
            return torch.zeros(self.batch_size, 0, dtype=torch.long, device=self.device)
        return torch.stack(rows, dim=1)

    @property
    def real_tokens_per_layer(self) -> Tensor:
        """[B, L] each image's token count after each block (``tokens_per_layer`` minus its padding)."""
        width = torch.tensor(self.tokens_per_layer, dtype=torch.long, device=self.device)
        return width.expand(self.batch_size, -1) - self._per_image(2)

    @property
    def withheld_per_layer(self) -> Tensor:
        """[B, L] merges the entropy guard withheld from the plan, per image and block."""
        return self._per_image(1)

    def padding_bias(self, dtype: torch.dtype) -> Tensor | None:
        """[B, 1, 1, N] additive attention mask: 0 for real tokens, -inf for padding (``None`` without
        padding): masks padding out as a key when proportional attention is off."""
        if self.padding is None:
            return None
        zeros = torch.zeros(self.padding.shape, dtype=dtype, device=self.padding.device)
        return zeros.masked_fill(self.padding, float("-inf"))[:, None, None, :]

    def attention_bias(self, dtype: torch.dtype) -> Tensor | None:
        """Proportional attention bias [B, 1, 1, N]: log(size) added to every query's logits.

        ``None`` while every size is 1 (log 1 = 0), so unmerged blocks run exactly as upstream.
        """
        if self.decision is not None:
            return self._decision_bias(dtype)
        if self.size is None:
            return None
        cached = self._bias
        if cached is None or cached[0] is not self.size or cached[1].dtype != dtype:
            # Blocks that merge nothing reuse the bias of the latest merge.
            cached = (self.size, self.size.log().to(dtype).transpose(1, 2).unsqueeze(1))
            self._bias = cached
        return cached[1]

    def _decision_bias(self, dtype: torch.dtype) -> Tensor:
        """log(decision + eps) (+ log size) [B, 1, 1, N]: the masked softmax of DynamicViT as a bias.

        softmax(a + log(D + eps)) = exp(a) (D + eps) / sum exp(a) (D + eps): pruned keys (D = 0) get
        weight ~eps, and the gradient to D is exp(a_j) / sum(...) times the upstream term, finite
        at D = 0 (the eps cancels), unlike log(D) whose gradient is infinite there.
        """
        bias = (self.decision + DECISION_EPS).log()
        if self.size is not None:
            bias = bias + self.size.log()
        return bias.to(dtype).transpose(1, 2).unsqueeze(1)

    def summary(self) -> dict:
        """JSON-friendly description (no tensors)."""
        return {
            "batch_size": self.batch_size,
            "input_tokens": self.input_tokens,
            "num_prefix": self.num_prefix,
            "grid": list(self.grid) if self.grid else None,
            "requested_per_layer": list(self.requested_per_layer),
            "merged_per_layer": list(self.merged_per_layer),
            "tokens_per_layer": list(self.tokens_per_layer),
            "clamped_layers": self.clamped_layers,
            **({"real_tokens_per_layer": self.real_tokens_per_layer.tolist()} if self.guard_layers else {}),
            **({"skipped_layers": list(self.skipped_layers)} if self.skipped_layers else {}),
        }


@dataclass
class AdaptivePatchState:
    """Per-image record of one forward under :class:`tokenbudget.AdaptivePatch` (input order).

    Attributes:
        scores: [B] complexity scores.
        patch_sizes: [B] patch side in px each image ran at (``mode="resolution"``: the patch size
            it stands in for; the image was resized to ``grid * native_patch`` px instead).
        grids: per image, (rows, cols) of its patch grid.
        num_prefix: class / distillation / register tokens in front of every sequence.
        num_layers: blocks of the model.
        mode: ``"patch"`` (resampled patch embedding) or ``"resolution"`` (resized input).
    """

    scores: Tensor
    patch_sizes: Tensor
    grids: list[tuple[int, int]]
    num_prefix: int
    num_layers: int
    mode: str

    @property
    def batch_size(self) -> int:
        return len(self.grids)

    @property
    def patch_tokens(self) -> list[int]:
        """Patch tokens of each image (prefix excluded): 64 / 256 / 1024 for DINOv2 at 28 / 14 / 7 px."""
        return [rows * cols for rows, cols in self.grids]

    @property
    def tokens(self) -> list[int]:
        """Tokens of each image entering the first block, prefix included."""
        return [n + self.num_prefix for n in self.patch_tokens]

    @property
    def mean_tokens(self) -> float:
        """Mean tokens per image (prefix included) through every block."""
        return sum(self.tokens) / max(self.batch_size, 1)

    @property
    def tokens_per_layer(self) -> list[float]:
        """Mean tokens per image after each block: blocks do not reduce, so it is constant."""
        return [self.mean_tokens] * self.num_layers

    def summary(self) -> dict:
        """JSON-friendly description (no tensors)."""
        return {
            "batch_size": self.batch_size,
            "mode": self.mode,
            "scores": [round(float(s), 6) for s in self.scores],
            "patch_sizes": [int(p) for p in self.patch_sizes],
            "tokens": self.tokens,
            "mean_tokens": self.mean_tokens,
        }


@dataclass
class PerImageState(TokenState):
    """What one forward of a ``tb.PerImage`` model did, per image (input order).

    The :class:`TokenState` fields describe the batch as ``forward_features`` returns it: as wide as
    its widest image, shorter images padded with size-0 tokens (``padding``, ``sizes``).

    Attributes:
        levels: [B] level index of each image (into ``level_speedups``).
        level_speedups: the levels, as FLOPs-ideal speedups.
        scores: [B] glance scores (need).
        speedups: [B] each image's budget: the FLOPs-ideal speedup of its level.
        flops: [B] each image's block FLOPs over the unreduced model's.
        image_tokens_per_layer: [B, L] each image's tokens after each block.
        group_sizes: level speedup -> images run at it.
    """

    levels: Tensor | None = None
    level_speedups: tuple[float, ...] = ()
    scores: Tensor | None = None
    speedups: Tensor | None = None
    flops: Tensor | None = None
    image_tokens_per_layer: Tensor | None = None
    group_sizes: dict[float, int] = field(default_factory=dict)

    @property
    def real_tokens_per_layer(self) -> Tensor:
        """[B, L] each image's token count after each block."""
        return self.image_tokens_per_layer

    @property
    def mean_flops(self) -> float:
        """Mean block FLOPs fraction of the batch."""
        return float(self.flops.double().mean())

    def summary(self) -> dict:
        return {
            **super().summary(),
            "levels": [int(v) for v in self.levels],
            "speedups": [float(v) for v in self.speedups],
            "scores": [round(float(v), 6) for v in self.scores],
            "mean_flops": self.mean_flops,
            "group_sizes": {str(k): v for k, v in self.group_sizes.items()},
        }


@dataclass
class VLMState:
    """What one call of a VLM patched with a visual-token cut did (``tb.last_state(vlm)``).

    Attributes:
        method: the config's method name (``"visionzip"``, ``"vlm-pool"``, ...).
        available: visual tokens of each image before the cut (the images of the call, in order).
        visual_tokens: visual tokens of each image that reached the language model.
        kv_visual_tokens: for cuts inside the LLM (FastV), the visual entries per image held by the
            layers after the cut; ``None`` otherwise.
    """

    method: str
    available: list[int]
    visual_tokens: list[int]
    kv_visual_tokens: list[int] | None = None
