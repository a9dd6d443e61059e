"""The learned core shared by the resampler and the autoencoder: nested query encoder, token decoder.

``LatentCompressor`` maps the P patch tokens [B, P, C] of a fixed grid to ``k <= k_max`` output
tokens [B, k, C] with ``k_max`` learned queries, and decodes any prefix of them back to all P
tokens. Three design points:

* **Position.** The patch tokens get a fixed 2-D sin-cos code of their grid cell after the input
  projection, so a query can tell where a token is (DINOv2's own position signal is mixed into its
  features and fades with depth). The decoder's P queries are the same code plus a learned bias.
* **Nested budgets.** Query i attends to every patch token and to queries 0..i only (a causal mask
  over the queries, in every layer), so outputs 0..k'-1 do not depend on queries k'..k_max-1: the
  first k' outputs of budget k *are* the outputs of budget k' (tested). Training samples k' per step.
* **Assignment.** In the last encoder layer every query i gives patch token j an attention weight
  A[i, j] (head-averaged softmax over the patch tokens and the visible queries, then renormalised
  over the patch tokens so that a query's attention to earlier queries does not shrink its share).
  With budget k, token j is assigned to ``argmax_{i < k} A[i, j]``: the output whose query read it
  most. Every patch token gets an output (none is dropped); the weights of queries i < k do not
  depend on k, so adding queries only moves tokens to the added ones.

Tokens are standardised per channel with the training set's mean and std (buffers saved with the
weights); outputs and decoder reconstructions live in the backbone's token space.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Budget, CompressedTokens, check_budget, check_tokens, infer_grid, pack, prefix_assignment

KINDS = ("resampler", "autoencoder")


def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2-D sin-cos position code [h * w, dim] (row-major): half the channels for y, half for x."""
    if dim % 4:
        raise ValueError(f"the width must be a multiple of 4 for a 2-D sin-cos code, got {dim}")
    h, w = grid
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # [dim/4]
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    ang_y = ys.flatten()[:, None] * freq[None]  # [P, dim/4]
    ang_x = xs.flatten()[:, None] * freq[None]
    return torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)


class CrossAttention(nn.Module):
    """Multi-head attention of ``queries`` [B, Q, D] over ``context`` [B, M, D] with a boolean
    ``visible`` [Q, M] mask; returns the output [B, Q, D] and the head-averaged weights [B, Q, M].

    The weights are computed explicitly (not by fused SDPA) because the assignment reads them."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, queries: Tensor, context: Tensor, visible: Tensor | None) -> tuple[Tensor, Tensor]:
        b, nq, d = queries.shape
        hd = d // self.heads
        q = self.q(queries).view(b, nq, self.heads, hd).transpose(1, 2)  # [B, H, Q, hd]
        k, v = self.kv(context).view(b, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # [B, H, M, hd] each
        logits = q @ k.transpose(-1, -2) / math.sqrt(hd)  # [B, H, Q, M]
        if visible is not None:
            logits = logits.masked_fill(~visible, float("-inf"))
        weights = logits.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, nq, d)
        return self.proj(out), weights.mean(dim=1)


class QueryBlock(nn.Module):
    """Pre-norm block: queries attend to [context, queries] under a mask, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(width)
        self.norm_ctx = nn.LayerNorm(width)
        self.attn = CrossAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(
        self, queries: Tensor, context: Tensor, visible: Tensor | None, self_attend: bool
    ) -> tuple[Tensor, Tensor]:
        q = self.norm_q(queries)
        ctx = self.norm_ctx(context)
        keys = torch.cat([ctx, q], dim=1) if self_attend else ctx  # [B, M (+ Q), D]
        out, weights = self.attn(q, keys, visible)
        queries = queries + out
        return queries + self.mlp(self.norm_mlp(queries)), weights


class LatentCompressor(nn.Module):
    """k_max learned queries compress P patch tokens [B, P, C] to k of them; a decoder maps any first
    k back to all P tokens. See the module docstring for position, nesting and the assignment.

    Args:
        dim: token width C of the backbone.
        grid: the patch grid (h, w) the compressor is trained for (P = h * w).
        k_max: the number of learned queries, the largest budget.
        width: internal width D of the attention layers.
        depth: encoder layers.
        heads: attention heads.
        decoder_depth: decoder layers (P positional queries attending to the k outputs); default
            the class's ``DECODER_DEPTH``.
        kind: "resampler" or "autoencoder" (what it was trained as; recorded in its config); a
            subclass fixes it (``KIND``) and refuses another.
        num_prefix: prefix tokens the training tokens had (informational; any count is accepted).
        info: free-form training record, saved in the JSON config.
    """

    KIND: ClassVar[str | None] = None  # fixed by Resampler and TokenAutoencoder
    DECODER_DEPTH: ClassVar[int] = 1

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        k_max: int,
        *,
        width: int = 256,
        depth: int = 2,
        heads: int = 4,
        decoder_depth: int | None = None,
        kind: str | None = None,
        num_prefix: int = 1,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if kind is None:
            kind = self.KIND or "resampler"
        elif self.KIND is not None and kind != self.KIND:
            raise ValueError(f"a {type(self).__name__} has kind {self.KIND!r}, got {kind!r}")
        decoder_depth = self.DECODER_DEPTH if decoder_depth is None else decoder_depth
        if kind not in KINDS:
            raise ValueError(f"unknown compressor kind {kind!r}; use one of {KINDS}")
        h, w = (int(v) for v in grid)
        if h < 1 or w < 1:
            raise ValueError(f"grid must be two positive ints, got {grid}")
        if not 1 <= k_max <= h * w:
            raise ValueError(f"k_max must be in [1, {h * w}] (the patch count), got {k_max}")
        if depth < 1 or decoder_depth < 1:
            raise ValueError(f"depth and decoder_depth must be >= 1, got {depth} and {decoder_depth}")
        self.dim, self.grid, self.k_max = int(dim), (h, w), int(k_max)
        self.width, self.depth, self.heads, self.decoder_depth = (
            int(width),
            int(depth),
            int(heads),
            int(decoder_depth),
        )
        self.kind, self.num_prefix = kind, int(num_prefix)
        self.info = dict(info or {})
        # Per-channel standardisation of the backbone tokens (set from the training set).
        self.register_buffer("token_mean", torch.zeros(self.dim))
        self.register_buffer("token_std", torch.ones(self.dim))
        self.register_buffer("position", sincos_2d(self.grid, self.width), persistent=False)  # [P, D]
        self.embed = nn.Sequential(nn.LayerNorm(self.dim), nn.Linear(self.dim, self.width))
        self.queries = nn.Parameter(torch.randn(self.k_max, self.width) * 0.02)
        self.encoder = nn.ModuleList(QueryBlock(self.width, self.heads) for _ in range(self.depth))
        self.out = nn.Sequential(nn.LayerNorm(self.width), nn.Linear(self.width, self.dim))
        # Decoder: P positional queries read the k outputs (standardised token space).
        self.decoder_embed = nn.Linear(self.dim, self.width)
        self.decoder_query_bias = nn.Parameter(torch.zeros(self.width))
        self.decoder = nn.ModuleList(QueryBlock(self.width, self.heads) for _ in range(self.decoder_depth))
        self.decoder_out = nn.Sequential(nn.LayerNorm(self.width), nn.Linear(self.width, self.dim))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this module (saved as JSON beside the weights)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "grid": list(self.grid),
            "k_max": self.k_max,
            "width": self.width,
            "depth": self.depth,
            "heads": self.heads,
            "decoder_depth": self.decoder_depth,
            "num_prefix": self.num_prefix,
            "info": self.info,
        }

    def set_token_statistics(self, patches: Tensor) -> None:
        """Standardise with the per-channel mean and std of ``patches`` [..., C] (the training tokens)."""
        flat = patches.reshape(-1, patches.shape[-1]).float()
        self.token_mean.copy_(flat.mean(0))
        self.token_std.copy_(flat.std(0).clamp_min(1e-6))

    def standardize(self, tokens: Tensor) -> Tensor:
        return (tokens - self.token_mean) / self.token_std

    def destandardize(self, tokens: Tensor) -> Tensor:
        return tokens * self.token_std + self.token_mean

    def check_patches(self, patches: Tensor) -> None:
        """``ValueError`` unless ``patches`` [B, P, C] has the width and patch count trained for."""
        if patches.shape[-1] != self.dim:
            raise ValueError(
                f"this {self.kind} was trained for {self.dim}-d tokens, got {patches.shape[-1]}-d; "
                "train one for this backbone with tokenbudget train-compressor"
            )
        if patches.shape[1] != self.num_patches:
            raise ValueError(
                f"this {self.kind} was trained for {self.num_patches} patch tokens (grid {self.grid}), got "
                f"{patches.shape[1]} (after num_prefix); use the same backbone and image size, or train one"
            )

    def encode(self, patches: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The first ``k`` outputs for ``patches`` [B, P, C] in standardised token space, [B, k, C], and
        the last layer's head-averaged attention of each query on the patch tokens (summing to 1 over
        the patch tokens), [B, k, P]."""
        if not 1 <= k <= self.k_max:
            raise ValueError(
                f"budget k={k} is outside [1, {self.k_max}]: this {self.kind} has {self.k_max} learned "
                "queries; train one with a larger --k-max"
            )
        context = self.embed(self.standardize(patches.float())) + self.position  # [B, P, D]
        queries = self.queries[:k].expand(patches.shape[0], -1, -1)  # [B, k, D]
        num_patches = context.shape[1]
        # Query i sees every patch token and queries 0..i (nested budgets).
        causal = torch.ones(k, k, dtype=torch.bool, device=patches.device).tril()
        visible = torch.cat([causal.new_ones(k, num_patches), causal], dim=1)  # [k, P + k]
        weights = None
        for block in self.encoder:
            queries, weights = block(queries, context, visible, self_attend=True)
        on_patches = weights[..., :num_patches]  # [B, k, P]
        return self.out(queries), on_patches / on_patches.sum(-1, keepdim=True).clamp_min(1e-12)

    def decode(self, outputs: Tensor) -> Tensor:
        """All P tokens [B, P, C] (standardised) reconstructed from the outputs [B, k, C] (standardised)."""
        latents = self.decoder_embed(outputs)  # [B, k, D]
        queries = (self.position + self.decoder_query_bias).expand(outputs.shape[0], -1, -1)  # [B, P, D]
        for block in self.decoder:
            queries, _ = block(queries, latents, None, self_attend=False)
        return self.decoder_out(queries)

    def decode_tokens(self, outputs: Tensor) -> Tensor:
        """All P patch tokens [B, P, C] rebuilt from compressed outputs [B, k, C], both in token space."""
        return self.destandardize(self.decode(self.standardize(outputs.float()))).to(outputs.dtype)

    def reconstruct(
        self, tokens: Tensor, k: Budget, *, grid: tuple[int, int] | None = None, num_prefix: int = 0
    ) -> Tensor:
        """Patch tokens [B, P, C] of ``tokens`` [B, N, C] rebuilt from their first k outputs (token space)."""
        ks, outputs, _ = self._checked_encode(tokens, k, grid, num_prefix)
        return torch.cat([self.decode_tokens(outputs[b : b + 1, :kb]) for b, kb in enumerate(ks)])

    def _checked_encode(
        self, tokens: Tensor, k: Budget, grid: tuple[int, int] | None, num_prefix: int
    ) -> tuple[list[int], Tensor, Tensor]:
        """Checked budgets per image and one encoder pass at the largest: (ks, outputs [B, k, C] in
        token space, last-layer weights [B, k, P])."""
        batch, n, _ = check_tokens(tokens, num_prefix)
        patches = tokens[:, num_prefix:]
        self.check_patches(patches)
        grid = infer_grid(n - num_prefix, grid)
        if tuple(grid) != self.grid:
            raise ValueError(f"this {self.kind} was trained for grid {self.grid}, got grid {tuple(grid)}")
        ks = check_budget(k, batch, n - num_prefix)
        # One pass with the largest budget serves every image: the first k_b outputs are budget k_b's.
        outputs, weights = self.encode(patches, max(ks))
        return ks, self.destandardize(outputs).to(tokens.dtype), weights

    def compress(
        self, tokens: Tensor, k: Budget, *, grid: tuple[int, int] | None = None, num_prefix: int = 0
    ) -> CompressedTokens:
        """Compress ``tokens`` [B, N, C] (``num_prefix`` prefix tokens first, passed through) to ``k``
        outputs per image (one int or one per image, each <= k_max): the :class:`CompressedTokens`
        contract, with ``.scores`` [B, N] the largest attention weight any kept query gave each token."""
        ks, outputs, weights = self._checked_encode(tokens, k, grid, num_prefix)
        return self._pack(tokens, num_prefix, ks, outputs, weights)

    def compress_nested(
        self, tokens: Tensor, budgets: list[int], *, grid: tuple[int, int] | None = None, num_prefix: int = 0
    ) -> dict[int, CompressedTokens]:
        """``{k: compress(tokens, k)}`` for every int k in ``budgets`` from one encoder pass at the
        largest (exact, because the budgets are nested)."""
        _, outputs, weights = self._checked_encode(tokens, max(budgets), grid, num_prefix)
        batch = tokens.shape[0]
        return {
            k: self._pack(tokens, num_prefix, check_budget(k, batch, self.num_patches), outputs, weights)
            for k in budgets
        }

    @staticmethod
    def _pack(
        tokens: Tensor, num_prefix: int, ks: list[int], outputs: Tensor, weights: Tensor
    ) -> CompressedTokens:
        """The contract from outputs [B, >= k_b, C] and last-layer weights [B, >= k_b, P]: image b keeps
        its first k_b outputs, and each patch token goes to the one of them that weighs it most."""
        batch = tokens.shape[0]
        rows, score_rows, kept = [], [], []
        for b, kb in enumerate(ks):
            best, index = weights[b, :kb].max(dim=0)  # [P]
            rows.append(index + num_prefix)
            score_rows.append(best)
            kept.append(outputs[b, :kb])
        prefix = tokens[:, :num_prefix]
        assignment = torch.cat(
            [prefix_assignment(batch, num_prefix, tokens.device), torch.stack(rows)], dim=1
        )
        scores = torch.cat(
            [torch.ones(batch, num_prefix, device=tokens.device), torch.stack(score_rows)], dim=1
        )
        return pack(prefix, kept, assignment, scores)
