"""Running a timm ViT one block at a time, composed around the model's own modules.

Early exit needs the class token after every block and needs to drop samples between blocks, so
it cannot call ``forward_features`` in one go. These helpers call the model's own
``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``, blocks and ``norm`` in the order
timm's ``VisionTransformer.forward_features`` does; no upstream forward is copied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..adapters.timm import matches as is_timm_vit
from ..patch import is_patched


def check_blockwise_model(model: nn.Module, *, need_class_token: bool = True) -> None:
    """``ValueError`` unless ``model`` is an unpatched timm ViT (with a class token if asked)."""
    if not is_timm_vit(model):
        raise ValueError(f"block-by-block running needs a timm VisionTransformer, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("the model is patched by tokenbudget; call tb.remove(model) first")
    if need_class_token and not getattr(model, "cls_token", None) is not None:
        raise ValueError(
            "exit heads read the class token, and this model has none (class_token=False); "
            "use a model with a class token"
        )


def embed_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """Tokens entering the first block [B, N, C] (prefix first), from normalised ``images`` [B, 3, H, W]."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def glance_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """The patch embeddings [B, N_patches, C] before position embedding and blocks: a cheap glance
    (one strided convolution, about 2 % of DINOv2-S's FLOPs at 224 px)."""
    x = model.patch_embed(images)
    # Models built with dynamic_img_size keep the grid: [B, H', W', C] -> [B, H' W', C].
    return x.flatten(1, 2) if x.ndim == 4 else x


def layer_class_tokens(
    model: nn.Module,
    images: Tensor,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """[N, depth + 2, C]: the class token after each block (rows 0..depth-1, before the final
    norm), then the harness feature of the full-token output, split in two rows: the normed class
    token (row depth) and the mean of the normed non-prefix tokens (row depth + 1)."""
    check_blockwise_model(model)
    prefix = model.num_prefix_tokens
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = embed_tokens(model, images[start : start + batch_size])
            rows = []
            for block in model.blocks:
                x = block(x)
                rows.append(x[:, 0])
            x = model.norm(x)
            rows += [x[:, 0], x[:, prefix:].mean(dim=1)]
            out.append(torch.stack(rows, dim=1).float())
            if progress is not None:
                progress(len(rows[0]))
    return torch.cat(out)
