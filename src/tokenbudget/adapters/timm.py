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
from ..ops.scores import class_attention

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


class ReducingBlockForward:
    """Instance-level ``forward`` for one timm ``Block``: the block's own submodules, with the
    tokens reduced between attention and MLP as the strategy says."""

    def __init__(self, block: nn.Module, layer: int, ctx: PatchContext) -> None:
        self.block = block
        self.layer = layer
        self.ctx = ctx
        self.is_last = layer == ctx.num_layers - 1

    def __call__(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        ctx, block, layer = self.ctx, self.block, self.layer
        strategy = ctx.strategy
        state = ctx.state_for_block(layer, x)  # x: [B, N, C]
        r = state.merged_per_layer[layer]
        # Strategies that act without removing tokens (learned pruning while training) say so.
        acts_at = getattr(strategy, "acts_at", None)
        acts = acts_at(layer, state) if acts_at is not None else r > 0
        if attn_mask is not None or is_causal:
            if any(state.merged_per_layer) or acts:
                raise NotImplementedError(
                    "attn_mask / is_causal cannot be combined with token reduction (the mask is for the "
                    "unreduced tokens); call the model without a mask or use a zero budget"
                )
        elif strategy.prop_attn or state.decision is not None:
            # [B, 1, 1, N]: log(size) and/or log of soft keep decisions; None before any merge
            attn_mask = state.attention_bias(x.dtype)
        local = ctx.local
        class_attn = acts and getattr(strategy, "needs_class_attention", False)
        want_keys = local.want_keys = acts and (strategy.needs_keys or class_attn)
        local.want_query = class_attn
        attn_out = block.attn(block.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + block.drop_path1(block.ls1(attn_out))
        if acts:
            metric = None
            if class_attn:
                # EViT's score: the class token's attention row [B, N] (head average), from the class
                # query and the keys exactly as this block's attention used them (same bias).
                metric = class_attention(local.query, local.keys, block.attn.scale, attn_mask)
            elif want_keys:
                # ToMe's metric: keys [B, H, N, d] averaged over heads. Summed here: the cosine
                # similarity that uses them does not see the 1/H scale, and a divide is saved.
                metric = local.keys.sum(dim=1)
            local.keys = local.query = None
            local.want_keys = local.want_query = False
            x = strategy.reduce(x, metric, state, layer)  # [B, N - r, C]
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        state.tokens_per_layer.append(x.shape[1])
        if self.is_last:
            ctx.finish(state)
        return x


class KeyCapture:
    """Forward hook on ``attn.k_norm``: hands the keys to the block wrapper of the same thread."""

    def __init__(self, ctx: PatchContext) -> None:
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> None:
        local = self.ctx.local
        if getattr(local, "want_keys", False):
            local.keys = output


class QueryCapture:
    """Forward hook on ``attn.q_norm``: hands the class token's query [B, H, 1, d] to the block wrapper."""

    def __init__(self, ctx: PatchContext) -> None:
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> None:
        local = self.ctx.local
        if getattr(local, "want_query", False):
            local.query = output[:, :, :1]  # the class token is always first in timm


class WeightedPool:
    """Replaces ``model.pool``: average pooling weighted by token size once tokens are merged."""

    def __init__(self, model: nn.Module, ctx: PatchContext) -> None:
        self.model = model
        self.ctx = ctx
        self.original = type(model).pool  # unbound; called with the model

    def __call__(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        model = self.model
        state = self.ctx.last_state()
        merged = state is not None and state.size is not None
        if merged and (x.shape[0], x.shape[1]) != (state.batch_size, state.num_tokens):
            if x.shape[1] != state.input_tokens:
                raise ValueError(
                    f"pool/forward_head got {x.shape[1]} tokens, but the latest forward of this patched "
                    f"model in this thread left {state.num_tokens}; pass forward_features' output to "
                    "forward_head in the same thread"
                )
            merged = False  # tokens from an unreduced source: nothing to weight
        if not merged:
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
        tokens, size = x[:, start:], state.size[:, start:].to(x.dtype)  # [B, M, C], [B, M, 1]
        avg = (tokens * size).sum(dim=1) / size.sum(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (tokens.amax(dim=1) + avg)
        return avg


class GridGuard:
    """Replaces entry points that reshape tokens back to the patch grid (not defined after merging)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{self.name} reshapes tokens back to the patch grid, which merged tokens no longer fill; "
            "use forward_features (and tb.last_state(model) for sizes and the source map), or "
            "tb.remove(model) first"
        )


class TimmAdapter:
    """Finds and patches the blocks of a timm VisionTransformer."""

    name = "timm"

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

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def has_class_token(self) -> bool:
        """True when the first token is a class token (timm: ``cls_token`` is a parameter)."""
        return getattr(self.model, "cls_token", None) is not None

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def default_num_tokens(self) -> int | None:
        """Tokens entering the first block at the model's default image size."""
        if self.grid is None:
            return None
        return self.grid[0] * self.grid[1] + self.num_prefix

    def install(self, ctx: PatchContext) -> None:
        model = self.model
        for layer, block in enumerate(self.blocks):
            block.forward = ReducingBlockForward(block, layer, ctx)
            self._hooks.append(block.attn.k_norm.register_forward_hook(KeyCapture(ctx)))
            if getattr(ctx.strategy, "needs_class_attention", False):
                self._hooks.append(block.attn.q_norm.register_forward_hook(QueryCapture(ctx)))
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
