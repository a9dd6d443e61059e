"""A merge that keeps the spread of the token set: merged tokens regain the contrast averaging took.

Averaging ``k`` dissimilar tokens gives a token closer to the image's mean token than its members
(about ``1/sqrt(k)`` as far, for unrelated deviations): the merged sequence has less spread, less
contrast, than the sequence it stands for, and later blocks see a smoother image than the real
one. :func:`merge_moment_preserving` moves each merged token away from the image's mean token,
along its own deviation, until the group carries the second moment of its members again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .match import Matching
from .merge import merge_weighted


def merge_moment_preserving(
    x: Tensor,
    size: Tensor | None,
    matching: Matching,
    num_prefix: int,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Size-weighted merge of tokens ``x`` [B, N, C] that keeps the spread of the token set.

    With ``mu`` the size-weighted mean of the non-prefix tokens of the image (which merging does
    not change), a group of members ``x_i`` with sizes ``s_i`` and total ``S`` becomes

        mu + g (m - mu) + c,   m = sum_i s_i x_i / S,   g = sqrt(sum_i s_i |x_i - mu|^2 / (S |m - mu|^2))

    The gain ``g`` gives the group the second moment about ``mu`` of its members
    (``S |g (m - mu)|^2 = sum_i s_i |x_i - mu|^2``); ``g >= 1`` always (a group's mean is never
    further from ``mu`` than its members' root mean square) and is capped at
    ``sqrt(S / max_i s_i)``, the gain that restores a mean of unrelated deviations, so a group
    whose members cancel out is not blown up. ``c`` is one offset shared by the merged tokens of
    the image that puts the size-weighted mean of the tokens back at ``mu`` exactly (gains on
    deviations that happen to share a direction would move it); it changes the second moment only
    to second order. Tokens that received no merge, and prefix tokens, are left as
    :func:`~tokenbudget.ops.merge.merge_weighted` leaves them; sizes add up as there.

    Returns ``(x_merged [B, N - r, C], size_merged [B, N - r, 1])``.
    """
    batch, num_tokens, _ = x.shape
    merged, new_size = merge_weighted(x, size, matching)  # [B, N - r, C], [B, N - r, 1]
    if matching.r == 0:
        return merged, new_size
    weight = torch.ones_like(x[..., :1]) if size is None else size.to(x.dtype)  # [B, N, 1]
    tokens, w = x[:, num_prefix:], weight[:, num_prefix:]
    mu = (tokens * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True)  # [B, 1, C]
    spread = weight * (x - mu).square().sum(dim=-1, keepdim=True)  # [B, N, 1] s_i |x_i - mu|^2
    group_spread = matching.merge(spread, mode="sum")  # [B, N - r, 1]
    largest = matching.merge(weight, mode="amax")  # [B, N - r, 1] largest member size
    deviation = merged - mu
    current = new_size.to(x.dtype) * deviation.square().sum(dim=-1, keepdim=True)
    gain = (group_spread / current.clamp_min(eps)).sqrt()
    gain = torch.minimum(gain.clamp_min(1.0), (new_size.to(x.dtype) / largest).sqrt())
    _, _, dst = matching.flat_indices
    received = torch.zeros(batch * (num_tokens - matching.r), 1, dtype=torch.bool, device=x.device)
    received = received.index_fill_(0, dst, True).view(batch, -1, 1)
    moved = received.to(x.dtype) * new_size.to(x.dtype) * (gain - 1.0) * deviation  # [B, N - r, C]
    received_size = (received.to(x.dtype) * new_size.to(x.dtype)).sum(dim=1, keepdim=True)  # [B, 1, 1]
    offset = -moved.sum(dim=1, keepdim=True) / received_size.clamp_min(eps)  # [B, 1, C]
    # Untouched tokens keep their exact values (mu + 1 * (m - mu) would round).
    return torch.where(received, mu + gain * deviation + offset, merged), new_size
