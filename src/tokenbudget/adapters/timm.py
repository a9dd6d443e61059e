"""timm adapter: all knowledge of timm's VisionTransformer lives here.

Patching composes around timm's own modules and never copies an upstream forward:

* each ``Block`` gets an instance-level ``forward`` (:class:`ReducingBlockForward`) that calls the
  block's own ``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``,
  ``drop_path2`` and reduces the tokens between attention and MLP. Module tree and state_dict keys
  are untouched, so checkpoints load into a patched model and ``isinstance`` checks still hold;
* the attention keys (after timm's q/k norm, exactly as the attention used them) are read by a
  forward hook on ``attn.k_norm`` (``nn.Identity`` when q/k norm is off), so nothing is recomputed
  and timm's fused SDPA path stays on; proportional attention rides on the ``attn_mask`` argument;
* ``model.pool`` weights average pooling by token size; ``forward_intermediates`` and
  ``get_intermediate_layers`` (which reshape tokens back to the patch grid) are guarded.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..context import PatchContext
from ..flops import BlockDims
from ..ops.merge import size_weighted_mean
from ..ops.scores import class_attention
from .base import IMAGENET_MEAN, IMAGENET_STD, Adapter, register_adapter
from .blocks import GridGuard, KeyCapture, ReducingBlockForward, merged_sizes

SUPPORTED = (
    "timm VisionTransformer models built from timm's pre-norm Block and Attention: vit_*, deit_* "
    "(distilled too), DINOv2 vit_*_dinov2* (with or without registers), CLIP-style vit_*_clip_*, and "
    "models created with qk_norm=True"
)


def _timm_vit_classes() -> tuple[type, type, type]:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def matches(model: nn.Module) -> bool:
    """True for timm VisionTransformer instances (checked by class path, importing nothing new)."""
    return any(
        cls.__name__ == "VisionTransformer" and cls.__module__.startswith("timm.models.vision_transformer")
        for cls in type(model).__mro__
    )


class TimmBlockForward(ReducingBlockForward):
    """Instance-level ``forward`` for one timm ``Block``: the block's own ``norm1``, ``attn``, ``ls1``,
    ``drop_path1`` and ``norm2``, ``mlp``, ``ls2``, ``drop_path2``, reduced in between."""

    def call(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.run(x, attn_mask, masked=is_causal, is_causal=is_causal)

    def attention_branch(self, x: Tensor, attn_bias: Tensor | None, is_causal: bool = False) -> Tensor:
        block = self.block
        return block.drop_path1(
            block.ls1(block.attn(block.norm1(x), attn_mask=attn_bias, is_causal=is_causal))
        )

    def class_attention(self, attn_bias: Tensor | None) -> Tensor:
        # EViT's score: the class token's attention row [B, N] (head average), from the class query
        # and the per-head keys exactly as this block's attention used them (same bias).
        local = self.ctx.local
        query, keys = local.query, local.head_keys  # [B, H, 1, d], [B, H, N, d]
        local.query = local.head_keys = None
        return class_attention(query, keys, self.block.attn.scale, attn_bias)

    def mlp_branch(self, x: Tensor) -> Tensor:
        block = self.block
        return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class ClassQueryCapture:
    """Forward hooks on ``attn.q_norm`` and ``attn.k_norm`` for class attention: hand the block
    wrapper the class token's query [B, H, 1, d] and the per-head keys [B, H, N, d]."""

    def __init__(self, ctx: PatchContext, slot: str) -> None:
        self.ctx = ctx
        self.slot = slot  # "query" or "head_keys"

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> None:
        local = self.ctx.local
        if getattr(local, "want_query", False):
            # The class token is always first in timm.
            setattr(local, self.slot, output[:, :, :1] if self.slot == "query" else output)


def _heads_summed(keys: Tensor) -> Tensor:
    """timm's ``k_norm`` output [B, H, N, d] -> ToMe metric [B, N, d] (summed over heads)."""
    return keys.sum(dim=1)


class WeightedPool:
    """Replaces ``model.pool``: average pooling weighted by token size once tokens are merged."""

    def __init__(self, model: nn.Module, ctx: PatchContext) -> None:
        self.model = model
        self.ctx = ctx
        self.original = type(model).pool  # unbound; called with the model

    def __call__(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        model = self.model
        size = merged_sizes(self.ctx, x)  # [B, N, 1] or None
        if size is None:
            return self.original(model, x, pool_type)
        if getattr(model, "attn_pool", None) is not None:
            raise NotImplementedError(
                "attention pooling (global_pool='map') does not take token sizes; with merged tokens "
                "use global_pool='token' or 'avg', or read forward_features' output"
            )
        pool_type = model.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):
            return self.original(model, x, pool_type)  # 'token', 'max', '' do not depend on sizes
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        tokens = x[:, start:]  # [B, M, C]
        avg = size_weighted_mean(tokens, size[:, start:])
        if pool_type == "avgmax":
            return 0.5 * (tokens.amax(dim=1) + avg)
        return avg


@register_adapter
class TimmAdapter(Adapter):
    """Finds and patches the blocks of a timm VisionTransformer."""

    name = "timm"
    supports_class_attention = True  # TimmBlockForward.class_attention
    supported = SUPPORTED
    order = 0

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return matches(model)

    def __init__(self, model: nn.Module) -> None:
        vit_cls, block_cls, attn_cls = _timm_vit_classes()
        if not isinstance(model, vit_cls):
            raise ValueError(f"tokenbudget cannot patch {type(model).__name__}: it supports {SUPPORTED}")
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
            raise ValueError(
                f"{type(model).__name__} has no blocks to patch (expected model.blocks, an nn.Sequential)"
            )
        for i, block in enumerate(blocks):
            if type(block).forward is not block_cls.forward:
                raise ValueError(
                    f"cannot patch block {i} of {type(model).__name__}: its type {type(block).__name__} is "
                    f"not timm's pre-norm Block (post-norm and parallel blocks are not supported); "
                    f"tokenbudget supports {SUPPORTED}"
                )
            attn = getattr(block, "attn", None)
            if type(attn).forward is not attn_cls.forward or not hasattr(attn, "k_norm"):
                raise ValueError(
                    f"cannot patch block {i}: its attention {type(attn).__name__} is not timm's Attention, "
                    f"whose keys ToMe reads; tokenbudget supports {SUPPORTED}"
                )
        self.model = model
        self.blocks = list(blocks)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 1))
        grid = getattr(model.patch_embed, "grid_size", None)
        self.grid = (int(grid[0]), int(grid[1])) if grid is not None else None
        self.patch_size = tuple(int(p) for p in model.patch_embed.patch_size)
        self._hooks: list[Any] = []

    # -- structure ---------------------------------------------------------------------------
    @property
    def has_class_token(self) -> bool:
        """True when the first token is a class token (timm: ``cls_token`` is a parameter)."""
        return getattr(self.model, "cls_token", None) is not None

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    @property
    def image_size(self) -> tuple[int, int] | None:
        size = getattr(self.model.patch_embed, "img_size", None)
        return (int(size[0]), int(size[1])) if size is not None else None

    def block_dims(self) -> list[BlockDims]:
        dims = []
        for block in self.blocks:
            qkv = block.attn.qkv  # [C] -> [3A]: q, k and v stacked
            dims.append(BlockDims(qkv.in_features, qkv.out_features // 3, block.mlp.fc1.out_features))
        return dims

    def patch_conv(self) -> nn.Conv2d | None:
        proj = getattr(self.model.patch_embed, "proj", None)
        return proj if isinstance(proj, nn.Conv2d) else None

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))

    # -- running -----------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        return self.model.forward_features(images)

    def embed(self, images: Tensor) -> Tensor:
        # The steps of timm's forward_features before the blocks, each the model's own module.
        model = self.model
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.model.norm(x)

    def patch_embeddings(self, images: Tensor) -> Tensor:
        x = self.model.patch_embed(images)
        # Models built with dynamic_img_size keep the grid: [B, H', W', C] -> [B, H' W', C].
        return x.flatten(1, 2) if x.ndim == 4 else x

    def input_transform(self) -> Any:
        """timm's own eval transform (resize, centre crop at the model's crop_pct, normalise) at
        :attr:`image_size`."""
        from timm.data import create_transform, resolve_data_config

        config = resolve_data_config(model=self.model)
        size = self.image_size
        if size is not None:
            config["input_size"] = (3, *size)  # the built size, not the pretrained config's
        return create_transform(**config)

    # -- patching ----------------------------------------------------------------------------
    def install(self, ctx: PatchContext) -> None:
        model = self.model
        for layer, block in enumerate(self.blocks):
            block.forward = TimmBlockForward(block, layer, ctx)
            self._hooks.append(block.attn.k_norm.register_forward_hook(KeyCapture(ctx, _heads_summed)))
            if getattr(ctx.strategy, "needs_class_attention", False):
                attn = block.attn
                self._hooks.append(attn.q_norm.register_forward_hook(ClassQueryCapture(ctx, "query")))
                self._hooks.append(attn.k_norm.register_forward_hook(ClassQueryCapture(ctx, "head_keys")))
        if hasattr(type(model), "pool"):
            model.pool = WeightedPool(model, ctx)
        for name in ("forward_intermediates", "get_intermediate_layers"):
            if hasattr(type(model), name) and not ctx.strategy.config.is_identity:
                setattr(model, name, GridGuard(name))

    def uninstall(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        for name in ("pool", "forward_intermediates", "get_intermediate_layers"):
            self.model.__dict__.pop(name, None)
