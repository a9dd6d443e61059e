"""OpenCLIP adapter: all knowledge of open_clip's ViT image tower lives here.

Patching composes around open_clip's own modules and never copies an upstream forward:

* each ``ResidualAttentionBlock`` of the image tower (``model.visual.transformer.resblocks``) gets an
  instance-level ``forward`` (:class:`OpenCLIPBlockForward`) that calls the block's own ``ln_1``,
  ``attention`` (its ``nn.MultiheadAttention``), ``ls_1`` and ``ln_2``, ``mlp``, ``ls_2``, and
  reduces the tokens between attention and MLP. The text tower is never touched, so
  ``encode_text`` is unchanged and ``encode_image`` / ``forward`` run on reduced image tokens;
* keys: ``nn.MultiheadAttention`` projects q, k and v inside one fused call that no hook can see
  into, so for blocks that merge, the keys are computed for the metric alone from the key rows of
  the module's own ``in_proj_weight`` / ``in_proj_bias`` (one extra [N, C] x [C, C] matmul per
  merging block, about 1/12 of that block's FLOPs); the attention itself is still the module's;
* proportional attention rides on the block's ``attn_mask`` argument as a float bias, expanded to
  the [B * heads, N, N] form ``nn.MultiheadAttention`` takes;
* ``pool_type='avg'`` towers average the patch tokens weighted by size (``_global_pool``).

Models are recognised by module path, so nothing here imports open_clip.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..context import PatchContext
from ..flops import BlockDims
from ..ops.merge import size_weighted_mean
from .base import Adapter, register_adapter
from .blocks import GridGuard, ReducingBlockForward, merged_sizes

INSTALL_HINT = "pip install 'tokenbudget[openclip]'"

SUPPORTED = (
    "OpenCLIP CLIP / CustomTextCLIP models with open_clip's own ViT image tower "
    "(open_clip.transformer.VisionTransformer with ResidualAttentionBlock), or that tower itself"
)


def matches(model: nn.Module) -> bool:
    """True for models defined in open_clip (checked by module path, importing nothing)."""
    return type(model).__module__.startswith("open_clip.")


def _is_open_clip(module: object, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("open_clip.")


def _find_visual(model: nn.Module) -> nn.Module:
    if _is_open_clip(model, "VisionTransformer"):
        return model
    visual = getattr(model, "visual", None)
    if _is_open_clip(visual, "VisionTransformer"):
        return visual
    if _is_open_clip(visual, "TimmModel"):
        raise ValueError(
            "this OpenCLIP model's image tower is a timm model: patch model.visual.trunk (timm adapter), "
            "e.g. tb.apply(model.visual.trunk, config)"
        )
    raise ValueError(f"tokenbudget cannot patch open_clip's {type(model).__name__}: it supports {SUPPORTED}")


class OpenCLIPBlockForward(ReducingBlockForward):
    """Instance-level ``forward`` of one open_clip ``ResidualAttentionBlock`` (self-attention)."""

    def call(
        self,
        q_x: Tensor,
        k_x: Tensor | None = None,
        v_x: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        if k_x is not None or v_x is not None:
            raise NotImplementedError("a patched image-tower block runs self-attention only (k_x, v_x unset)")
        return self.run(q_x, attn_mask)

    def attention_branch(self, x: Tensor, attn_bias: Tensor | None) -> Tensor:
        block = self.block
        h = block.ln_1(x)  # [B, N, C]
        if self.wants_keys():
            self.give_keys(_key_metric(block.attn, h))
        mask = None
        if attn_bias is not None:
            mask = _per_head_mask(attn_bias, block.attn.num_heads, x.shape[1])
        return block.ls_1(block.attention(q_x=h, attn_mask=mask))

    def mlp_branch(self, x: Tensor) -> Tensor:
        block = self.block
        return block.ls_2(block.mlp(block.ln_2(x)))


def _key_metric(attn: nn.MultiheadAttention, h: Tensor) -> Tensor:
    """ToMe metric [B, N, d]: the keys ``attn`` computes from ``h`` [B, N, C], summed over heads.

    Read from the key rows of the module's own projection (``nn.MultiheadAttention`` computes
    them inside its fused forward, out of reach of a hook).
    """
    dim = attn.embed_dim
    if attn.in_proj_weight is not None:
        weight = attn.in_proj_weight[dim : 2 * dim]
        bias = attn.in_proj_bias[dim : 2 * dim] if attn.in_proj_bias is not None else None
    else:  # separate q/k/v projections (kdim != embed_dim)
        weight = attn.k_proj_weight
        bias = attn.in_proj_bias[dim : 2 * dim] if attn.in_proj_bias is not None else None
    keys = F.linear(h, weight, bias)  # [B, N, C]
    batch, tokens, _ = keys.shape
    return keys.view(batch, tokens, attn.num_heads, -1).sum(dim=2)


def _per_head_mask(bias: Tensor, heads: int, queries: int) -> Tensor:
    """Additive bias [B, 1, 1|Q, N] -> the [B * heads, Q, N] float mask ``nn.MultiheadAttention`` takes."""
    if bias.dim() != 4:
        return bias  # the caller's own mask, handed through unchanged (nothing is reduced)
    batch, keys = bias.shape[0], bias.shape[-1]
    return bias.expand(batch, heads, queries, keys).reshape(batch * heads, queries, keys)


class WeightedGlobalPool:
    """Replaces the tower's ``_global_pool``: ``pool_type='avg'`` weights merged tokens by size."""

    def __init__(self, visual: nn.Module, ctx: PatchContext) -> None:
        self.visual = visual
        self.ctx = ctx
        self.original = type(visual)._global_pool  # unbound; called with the tower

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        visual = self.visual
        size = merged_sizes(self.ctx, x)  # [B, N, 1] or None
        if size is None or visual.pool_type != "avg":
            return self.original(visual, x)  # 'tok' and 'none' do not depend on sizes
        tokens = x[:, 1:]  # [B, N - 1, C] without the class token
        return size_weighted_mean(tokens, size[:, 1:]), tokens


#: OpenAI CLIP's normalisation, open_clip's default when a tower does not set its own
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@register_adapter
class OpenCLIPAdapter(Adapter):
    """Finds and patches the image-tower blocks of an OpenCLIP model."""

    name = "openclip"
    supported = SUPPORTED
    order = 2

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return matches(model)

    def __init__(self, model: nn.Module) -> None:
        visual = _find_visual(model)
        transformer = visual.transformer
        if not getattr(transformer, "batch_first", True):
            raise ValueError("tokenbudget patches batch-first open_clip transformers only (batch_first=True)")
        blocks = list(transformer.resblocks)
        for i, block in enumerate(blocks):
            if not _is_open_clip(block, "ResidualAttentionBlock") or not isinstance(
                block.attn, nn.MultiheadAttention
            ):
                raise ValueError(
                    f"cannot patch image-tower block {i}: {type(block).__name__} is not open_clip's "
                    f"ResidualAttentionBlock; tokenbudget supports {SUPPORTED}"
                )
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(
                "this OpenCLIP image tower pools with an attentional pooler (CoCa-style), which does not "
                f"take token sizes; tokenbudget supports {SUPPORTED} with pool_type 'tok' or 'avg'"
            )
        self.model = model
        self.visual = visual
        self.blocks = blocks
        self.num_prefix = 1  # the class embedding
        self.grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.patch_size = tuple(int(p) for p in visual.patch_size)

    # -- structure ---------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.blocks[0].attn.embed_dim)

    @property
    def num_heads(self) -> int:
        return int(self.blocks[0].attn.num_heads)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    def block_dims(self) -> list[BlockDims]:
        dims = []
        for block in self.blocks:
            attn = block.attn  # nn.MultiheadAttention: q, k, v all of width embed_dim
            dims.append(BlockDims(attn.embed_dim, attn.embed_dim, block.mlp.c_fc.out_features))
        return dims

    def patch_conv(self) -> nn.Conv2d | None:
        return self.visual.conv1 if isinstance(self.visual.conv1, nn.Conv2d) else None

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean = getattr(self.visual, "image_mean", None) or _CLIP_MEAN
        std = getattr(self.visual, "image_std", None) or _CLIP_STD
        return tuple(mean), tuple(std)

    # -- running -----------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        # The tower's own steps up to the tokens: embeddings, transformer, final norm (ln_post).
        visual = self.visual
        return visual.ln_post(visual.transformer(visual._embeds(images)))

    def embed(self, images: Tensor) -> Tensor:
        return self.visual._embeds(images)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.visual.ln_post(x)

    def patch_embeddings(self, images: Tensor) -> Tensor:
        return self.visual.conv1(images).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h * w, C]

    # -- patching ----------------------------------------------------------------------------
    def install(self, ctx: PatchContext) -> None:
        for layer, block in enumerate(self.blocks):
            block.forward = OpenCLIPBlockForward(block, layer, ctx)
        self.visual._global_pool = WeightedGlobalPool(self.visual, ctx)
        if not ctx.strategy.config.is_identity:
            self.visual.forward_intermediates = GridGuard("forward_intermediates")

    def uninstall(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        for name in ("_global_pool", "forward_intermediates"):
            self.visual.__dict__.pop(name, None)
