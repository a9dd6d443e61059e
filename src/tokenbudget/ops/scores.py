"""Token importance scores computed from what attention already produced."""

from __future__ import annotations

from torch import Tensor


def class_attention(query: Tensor, keys: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """The class token's attention over all tokens, averaged over heads.

    Only the class token's row of the attention matrix is formed (``q_cls . K^T``), so the block's
    own attention can keep its fused kernel.

    Args:
        query: [B, H, 1, d] the class token's query (after any q norm, before scaling).
        keys: [B, H, N, d] the keys of every token (after any k norm).
        scale: the attention's logit scale (``head_dim ** -0.5``).
        bias: additive logit bias broadcastable to [B, H, 1, N] (e.g. proportional attention's
            log token size), or ``None``.

    Returns:
        [B, N] attention weights of the class token; each row sums to 1.
    """
    logits = (query @ keys.transpose(-2, -1)) * scale  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0].to(keys.dtype)
