"""Query relevance of tokens and top-k selection, optionally diverse (maximal marginal relevance).

Pure tensor functions: ``relevance`` scores tokens against one query vector per image, ``top_k``
and ``mmr_select`` pick the indices of the tokens to keep from one image's scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCORES = ("cosine", "dot")


def unit_vectors(x: Tensor, dim: int = -1) -> Tensor:
    """``x`` scaled to unit L2 norm along ``dim`` (zero vectors stay zero), without overflow or
    underflow: each vector is first divided by its largest magnitude, so 1e30 and 1e-30 entries
    give the same directions as ordinary ones (``F.normalize`` squares them first). Computed and
    returned in float64 for float64 input, else in float32."""
    x = x if x.dtype == torch.float64 else x.float()
    top = x.abs().amax(dim=dim, keepdim=True)
    scaled = x / top.clamp_min(torch.finfo(x.dtype).tiny)
    return F.normalize(scaled, dim=dim)


def relevance(tokens: Tensor, query: Tensor, score: str = "cosine") -> Tensor:
    """Relevance [B, N] of ``tokens`` [B, N, C] to ``query`` [B, C]: cosine similarity or dot product."""
    if score not in SCORES:
        raise ValueError(f"unknown relevance score {score!r}; use one of {SCORES}")
    if score == "cosine":
        x, q = unit_vectors(tokens).float(), unit_vectors(query).float()
    else:
        x, q = tokens.float(), query.float()
    return (x @ q[:, :, None])[..., 0]  # [B, N, C] @ [B, C, 1] -> [B, N]


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices [k] of the ``k`` highest of ``scores`` [N], best first (ties: the earlier token)."""
    # A stable descending sort makes ties deterministic: equal scores keep the earlier token first.
    return torch.sort(scores, descending=True, stable=True).indices[:k]


def mmr_select(keys: Tensor, scores: Tensor, k: int, diversity: float) -> Tensor:
    """Greedy maximal marginal relevance: indices [k] in the order they were picked.

    Each step keeps the token with the highest ``scores[i] - diversity * max_j cos(keys[i], keys[j])``
    over the tokens ``j`` already kept, so a near-duplicate of a kept token loses ``diversity`` times
    its similarity. ``keys`` [N, D] is the representation redundancy is measured in, ``scores`` [N]
    the relevance; ``diversity=0`` is plain top-k.
    """
    if diversity < 0:
        raise ValueError(f"diversity must be >= 0 (0 = plain top-k), got {diversity}")
    if diversity == 0:
        return top_k(scores, k)
    unit = unit_vectors(keys).float()  # [N, D]
    scores = scores.float()
    redundancy = torch.full_like(scores, float("-inf"))  # [N] max similarity to the kept tokens
    taken = torch.zeros_like(scores, dtype=torch.bool)
    picked = []
    for step in range(k):
        gain = scores if step == 0 else scores - diversity * redundancy
        best = int(gain.masked_fill(taken, float("-inf")).argmax())
        picked.append(best)
        taken[best] = True
        redundancy = torch.maximum(redundancy, unit @ unit[best])
    return torch.tensor(picked, dtype=torch.long, device=scores.device)
