"""The one contract every VLM token compressor keeps, and the input checks they share.

Input: the vision tokens of any backbone, ``tokens`` [B, N, C], whose first ``num_prefix`` tokens
are prefix tokens (class, registers) and whose other ``N - num_prefix`` tokens are patch tokens
laid out row-major on ``grid`` = (h, w). Budget ``k``: the number of output tokens made from the
patch tokens, one int for the batch or one per image.

Output: a :class:`CompressedTokens` whose ``.tokens`` are [B, num_prefix + k, C] (the prefix tokens
passed through in front; with the default ``num_prefix=0`` exactly [B, k, C]), or a list of
[num_prefix + k_b, C] tensors when budgets differ per image, and whose ``.assignment`` [B, N] says
for every input token which output token it went into (-1 where it was dropped). Prefix token i
maps to output i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

Budget = int | Sequence[int] | Tensor


@dataclass
class CompressedTokens:
    """Compressed vision tokens and the map from input tokens to them.

    ``tokens``: [B, num_prefix + k, C], or a list of B tensors [num_prefix + k_b, C] when the
    budget differs per image. ``assignment``: [B, N] int64, the output index of each input token or
    -1 where the token was dropped. ``num_prefix``: how many leading outputs are passed-through
    prefix tokens. ``scores``: optional [B, N] relevance or importance the compressor ranked by.
    """

    tokens: Tensor | list[Tensor]
    assignment: Tensor
    num_prefix: int = 0
    scores: Tensor | None = None

    @property
    def budgets(self) -> list[int]:
        """Output tokens made from patch tokens, per image (prefix tokens not counted)."""
        if isinstance(self.tokens, Tensor):
            return [self.tokens.shape[1] - self.num_prefix] * self.tokens.shape[0]
        return [t.shape[0] - self.num_prefix for t in self.tokens]

    def token_list(self) -> list[Tensor]:
        """The output tokens of each image, [num_prefix + k_b, C] each, whatever the storage."""
        return list(self.tokens.unbind(0)) if isinstance(self.tokens, Tensor) else list(self.tokens)

    def counts(self) -> list[Tensor]:
        """How many input tokens each output token stands for: per image, [num_prefix + k_b] int64."""
        out = []
        for row, tokens in zip(self.assignment, self.token_list(), strict=True):
            kept = row[row >= 0]
            out.append(torch.bincount(kept, minlength=tokens.shape[0]))
        return out


def infer_grid(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The patch grid (h, w): ``grid`` if given (checked against ``num_patches``), else a square."""
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"{num_patches} patch tokens do not form a square grid; pass grid=(h, w) with "
                f"h * w = {num_patches} (and num_prefix= for class/register tokens in front)"
            )
        return side, side
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or any(isinstance(v, bool) or not isinstance(v, Integral) for v in grid)
    ):
        raise TypeError(f"grid must be (h, w), two ints; got {grid!r}")
    h, w = (int(v) for v in grid)
    if h < 1 or w < 1 or h * w != num_patches:
        raise ValueError(
            f"grid {tuple(grid)} does not match the tokens: h * w = {h * w}, but there are {num_patches} "
            "patch tokens (N - num_prefix); pass the backbone's patch grid, e.g. (16, 16) for 256 tokens"
        )
    return h, w


def check_tokens(tokens: Tensor, num_prefix: int = 0, *, finite: bool = False) -> tuple[int, int, int]:
    """(B, N, C) of ``tokens``, which must be a real [B, N, C] tensor with B, C >= 1 and at least one
    patch token after the prefix; with ``finite=True`` also free of NaN and infinity."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"expected vision tokens, a tensor [B, N, C]; got {type(tokens).__name__}")
    if tokens.ndim != 3:
        raise ValueError(
            f"expected vision tokens [B, N, C], got shape {tuple(tokens.shape)}; add a batch dimension "
            "for one image"
        )
    if not tokens.is_floating_point():
        raise TypeError(f"vision tokens must be a float tensor, got dtype {tokens.dtype}")
    batch, n, channels = tokens.shape
    if batch == 0 or channels == 0:
        raise ValueError(
            f"got an empty batch of tokens {tuple(tokens.shape)}: need at least one image (B >= 1) with "
            "at least one channel (C >= 1)"
        )
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, Integral):
        raise TypeError(f"num_prefix must be an int (prefix tokens in front), got {num_prefix!r}")
    if num_prefix < 0 or num_prefix >= n:
        raise ValueError(
            f"num_prefix must be in [0, N) = [0, {n}): the tokens need at least one patch token after "
            f"the prefix; got {num_prefix}"
        )
    if finite:
        check_finite(tokens, "tokens")
    return batch, n, channels


def check_finite(x: Tensor, name: str) -> None:
    """``ValueError`` naming the first NaN or infinite entry of ``x`` ([B, N, ...] or [B, C])."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"NaN or infinity in {name} (first at index {where}): scores and choices made from it would be "
            "meaningless; clean the input (e.g. torch.nan_to_num) or find where it overflowed"
        )


def check_budget(k: Budget, batch: int, num_patches: int) -> list[int]:
    """The budget per image as a list of B ints, each in [1, num_patches]; clear errors otherwise."""
    if isinstance(k, Tensor):
        if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise TypeError(f"k must be an int or one int per image, got a {k.dtype} tensor")
        k = k.flatten().tolist() if k.ndim else int(k)
    if isinstance(k, bool) or not isinstance(k, (Integral, Sequence)) or isinstance(k, str):
        raise TypeError(f"k must be an int or one int per image, got {type(k).__name__}")
    values = [k] * batch if isinstance(k, Integral) else list(k)
    if any(isinstance(v, bool) or not isinstance(v, Integral) for v in values):
        raise TypeError(f"k must be an int or one int per image, got {values}")
    ks = [int(v) for v in values]
    if len(ks) != batch:
        raise ValueError(
            f"got {len(ks)} budgets for a batch of {batch} images; give one per image or one int"
        )
    for value in ks:
        if value < 1 or value > num_patches:
            raise ValueError(
                f"budget k={value} is outside [1, {num_patches}]: it must keep at least one token and at "
                f"most the {num_patches} patch tokens there are"
            )
    return ks


def prefix_assignment(batch: int, num_prefix: int, device: torch.device) -> Tensor:
    """[B, num_prefix] assignment of passed-through prefix tokens: prefix i -> output i."""
    return torch.arange(num_prefix, device=device).expand(batch, num_prefix)


def pack(
    prefix: Tensor, outputs: list[Tensor], assignment: Tensor, scores: Tensor | None = None
) -> CompressedTokens:
    """Join prefix tokens [B, P, C] with per-image outputs [k_b, C]: one tensor when all k_b agree."""
    num_prefix = prefix.shape[1]
    rows = [torch.cat([p, o], dim=0) for p, o in zip(prefix, outputs, strict=True)]
    same = len({r.shape[0] for r in rows}) == 1
    tokens: Tensor | list[Tensor] = torch.stack(rows) if same else rows
    return CompressedTokens(tokens, assignment, num_prefix, scores)
