"""Token entropy: how spread out a set of tokens is, as a fraction of the most it could be.

Definition (per image). Tokens ``x_1..x_N`` [C] with sizes ``s_1..s_N`` (how many input patches each
stands for; 1 for unmerged tokens) are L2-normalised, ``u_i = x_i / ||x_i||``, and weighted by their
share of the patches, ``w_i = s_i / sum_j s_j``. Their size-weighted second-moment matrix

    rho = sum_i w_i u_i u_i^T            [C, C], symmetric, positive semi-definite, trace 1

has eigenvalues ``lambda_k >= 0`` summing to 1: a probability distribution over directions in
feature space. The token entropy is its Shannon entropy (the von Neumann entropy of ``rho``)

    H = -sum_k lambda_k log lambda_k

divided by its maximum ``log(min(n, C))``, where ``n`` is the number of tokens with a positive size
and a non-zero vector: ``H <= log rank(rho) <= log(min(n, C))``, with equality exactly when the
``n`` tokens have equal sizes and are mutually orthogonal (or, for ``n > C``, when ``rho = I / C``).
So the result lies in [0, 1]: 0 when every token points the same way, 1 for orthogonal tokens of
equal size. Fewer than two such tokens give 0.

How sizes count: a merged token of size ``s`` weighs exactly as ``s`` copies of itself would, so a
merge of identical tokens leaves ``rho`` (hence ``H``) unchanged, while a merge of dissimilar tokens
lowers ``H``. Tokens of size 0 (the padding of ragged batches) are ignored entirely, in ``n`` too.

Computation: ``rho``'s non-zero spectrum equals that of the N x N Gram matrix ``K_ij = sqrt(w_i w_j)
u_i . u_j``, so the smaller of the two matrices is decomposed (``torch.linalg.eigvalsh``, in float32
or float64). Eigenvalues below the numerical-rank tolerance ``max(N, C) * eps(dtype)`` (relative to
their sum) are round-off and count as 0: identical tokens then give exactly 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def token_entropy(x: Tensor, sizes: Tensor | None = None) -> Tensor:
    """Each image's token entropy as a fraction of its maximum, in [0, 1] (see the module docstring).

    Args:
        x: [B, N, C] tokens (any float dtype; computed in float32, or float64 for float64 input).
        sizes: [B, N] or [B, N, 1] non-negative token sizes (patches each token stands for);
            ``None`` weighs every token equally. Size-0 tokens are ignored.

    Returns:
        [B] float32 (float64 for float64 input): ``H / log(min(n, C))`` per image, 0 where fewer
        than two tokens have a positive size and a non-zero vector.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"token_entropy expects a tensor of tokens [B, N, C], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"token_entropy expects tokens [B, N, C], got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"token_entropy expects real tokens, got dtype {x.dtype}")
    batch, num_tokens, channels = x.shape
    if not bool(torch.isfinite(x).all()):
        where = tuple(int(i) for i in (~torch.isfinite(x)).nonzero()[0])
        raise ValueError(
            f"tokens contain NaN or infinity (first at index {where}); the entropy of their directions is "
            "undefined: clean the input (e.g. torch.nan_to_num) or find where it overflowed"
        )
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.detach().to(dtype)
    if sizes is None:
        weight = torch.ones(batch, num_tokens, dtype=dtype, device=x.device)
    else:
        if not isinstance(sizes, Tensor) or sizes.is_complex():
            raise TypeError(f"sizes must be a real tensor [B, N] or [B, N, 1], got {type(sizes).__name__}")
        weight = sizes.detach().to(dtype)
        if weight.dim() == 3 and weight.shape[-1] == 1:
            weight = weight[..., 0]
        if weight.shape != (batch, num_tokens):
            raise ValueError(
                f"sizes must be [B, N] or [B, N, 1] for tokens {tuple(x.shape)}, got {tuple(sizes.shape)}"
            )
        if bool((weight < 0).any()) or not bool(torch.isfinite(weight).all()):
            raise ValueError("sizes must be finite and non-negative (0 marks a padding token)")
    if num_tokens == 0 or channels == 0 or batch == 0:
        return torch.zeros(batch, dtype=dtype, device=x.device)  # no token to spread: entropy 0
    # Each token divided by its largest entry first: the directions are the same, and norms of very
    # large or very small tokens no longer overflow or underflow.
    x = x / x.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    norm = x.norm(dim=-1)  # [B, N]
    valid = (weight > 0) & (norm > 0)
    count = valid.sum(dim=1)  # [B] tokens that count
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    # rows u_i * sqrt(w_i): [B, N, C]; zero rows for ignored tokens
    rows = x / norm.clamp_min(torch.finfo(dtype).tiny).unsqueeze(-1) * weight.sqrt().unsqueeze(-1)
    if num_tokens <= channels:
        gram = rows @ rows.transpose(1, 2)  # [B, N, N]
    else:
        gram = rows.transpose(1, 2) @ rows  # [B, C, C]: same non-zero spectrum
    eig = torch.linalg.eigvalsh(gram).clamp_min(0)  # [B, K]
    eig = eig / eig.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    tolerance = max(num_tokens, channels) * torch.finfo(dtype).eps
    eig = torch.where(eig > tolerance, eig, torch.zeros_like(eig))
    eig = eig / eig.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    entropy = -(eig * eig.clamp_min(torch.finfo(dtype).tiny).log()).sum(dim=-1)  # [B]
    max_entropy = count.clamp(max=channels).to(dtype).log()  # log(min(n, C)); 0 for n <= 1
    fraction = entropy / max_entropy.clamp_min(math.log(2))
    return torch.where(count > 1, fraction.clamp(0, 1), torch.zeros_like(fraction)) + 0.0  # no -0.0
