"""Reading one timm block's class-token attention during an ordinary (unpatched) forward.

Forward hooks on the block's ``attn.q_norm`` and ``attn.k_norm`` (identity modules when the model
has no q/k norm, but always called by timm's Attention) hand over the per-head queries and keys
[B, H, N, d]; only the class token's row of the attention matrix is formed from them
(:func:`~tokenbudget.ops.scores.class_attention`), so the block keeps its fused attention kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..ops.scores import class_attention


def class_token_attention(
    model: nn.Module,
    images: Tensor,
    block: int = -1,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Head-averaged attention of the class token over all tokens in timm block ``block``: [B, N].

    ``images``: model input [B, 3, H, W]. Rows sum to 1; column 0 is the class token itself.
    ``progress(n)`` is called after each batch with the number of images in it.
    """
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[block], "attn", None) if blocks is not None else None
    if attn is None or not hasattr(attn, "q_norm") or not hasattr(attn, "k_norm"):
        raise ValueError(
            f"{type(model).__name__} has no timm ViT blocks with attn.q_norm / attn.k_norm to read class "
            "attention from (timm VisionTransformer models have them)"
        )
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"{type(model).__name__} has no class token, so there is no class-token attention")
    seen: dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            seen[name] = output  # [B, H, N, d]

        return hook

    handles = [attn.q_norm.register_forward_hook(keep("q")), attn.k_norm.register_forward_hook(keep("k"))]
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                model.forward_features(batch)
                # The class token is first in timm's token order.
                out.append(class_attention(seen["q"][:, :, :1], seen["k"], attn.scale).float())
                if progress is not None:
                    progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)
