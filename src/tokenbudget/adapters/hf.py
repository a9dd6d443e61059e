"""Hugging Face transformers adapter: all knowledge of transformers' vision encoders lives here.

Patching composes around transformers' own modules and never copies an upstream forward:

* each encoder layer (``ViTLayer``, ``DeiTLayer``, ``Dinov2Layer``, ``Dinov2WithRegistersLayer``,
  ``CLIPEncoderLayer``, ``SiglipEncoderLayer``) gets an instance-level ``forward``
  (:class:`HFLayerForward`) that calls the layer's own norms, attention, LayerScale / drop-path /
  dropout and MLP, and reduces the tokens between attention and MLP. Module tree and state_dict
  keys are untouched;
* the keys come from a forward hook on the attention's own ``k_proj`` (nothing recomputed);
* proportional attention rides on the ``attention_mask`` argument the layers already take (an
  additive float bias [B, 1, 1, N]), which both the ``eager`` and the ``sdpa`` attention
  implementations add to the logits;
* SigLIP's attention-pooling head (no class token) gets the log token sizes as its
  ``nn.MultiheadAttention`` mask, so it pools merged tokens as it would pool the patches they cover.

Models are recognised by class name and module path, so nothing here imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..context import PatchContext
from ..flops import BlockDims
from .base import IMAGENET_MEAN, IMAGENET_STD, Adapter, register_adapter
from .blocks import KeyCapture, ReducingBlockForward, merged_sizes

INSTALL_HINT = "pip install 'tokenbudget[hf]'"


@dataclass(frozen=True)
class LayerLayout:
    """Names of one encoder layer's submodules, in the order the layer applies them."""

    norm1: str
    attention: str
    after_attention: tuple[str, ...]  # LayerScale / drop-path / dropout on the attention branch
    norm2: str
    mlp: str
    after_mlp: tuple[str, ...]


_VIT_LAYOUT = LayerLayout(
    "layernorm_before", "attention", ("dropout",), "layernorm_after", "mlp", ("dropout",)
)
_DINOV2_LAYOUT = LayerLayout(
    "norm1", "attention", ("layer_scale1", "drop_path"), "norm2", "mlp", ("layer_scale2", "drop_path")
)
_CLIP_LAYOUT = LayerLayout("layer_norm1", "self_attn", (), "layer_norm2", "mlp", ())

# Encoder layer class name -> its layout.
_LAYOUTS: dict[str, LayerLayout] = {
    "ViTLayer": _VIT_LAYOUT,
    "DeiTLayer": _VIT_LAYOUT,
    "Dinov2Layer": _DINOV2_LAYOUT,
    "Dinov2WithRegistersLayer": _DINOV2_LAYOUT,
    "CLIPEncoderLayer": _CLIP_LAYOUT,
    "SiglipEncoderLayer": _CLIP_LAYOUT,
}


@dataclass(frozen=True)
class BackboneLayout:
    """How one vision backbone (the module owning the encoder layers) is put together.

    Attributes:
        num_prefix: leading tokens that are never reduced (class, distillation), plus the config
            field ``registers`` names (register tokens), if any.
        registers: the config field counting register tokens, or ``None``.
        embeddings: submodules run on the pixels before the first layer, in order.
        final_norm: the norm its ``last_hidden_state`` ends with (``None``: none).
        mean, std: the normalisation of the family's image processor.
    """

    num_prefix: int
    embeddings: tuple[str, ...]
    final_norm: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    registers: str | None = None

    def prefix_tokens(self, config: Any) -> int:
        return self.num_prefix + (int(getattr(config, self.registers)) if self.registers else 0)


_HALF = (0.5, 0.5, 0.5)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image processor
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Vision backbones -> their layout.
_BACKBONES: dict[str, BackboneLayout] = {
    "ViTModel": BackboneLayout(1, ("embeddings",), "layernorm", _HALF, _HALF),
    # class and distillation token
    "DeiTModel": BackboneLayout(2, ("embeddings",), "layernorm", IMAGENET_MEAN, IMAGENET_STD),
    "Dinov2Model": BackboneLayout(1, ("embeddings",), "layernorm", IMAGENET_MEAN, IMAGENET_STD),
    "Dinov2WithRegistersModel": BackboneLayout(
        1, ("embeddings",), "layernorm", IMAGENET_MEAN, IMAGENET_STD, registers="num_register_tokens"
    ),
    "CLIPVisionModel": BackboneLayout(1, ("embeddings", "pre_layrnorm"), None, _CLIP_MEAN, _CLIP_STD),
    # no class token: attention-pooling head
    "SiglipVisionModel": BackboneLayout(0, ("embeddings",), "post_layernorm", _HALF, _HALF),
}

# Models that may hold a backbone: their outputs read the class token or the pooling head we
# weight, never an unweighted mean over (merged) patch tokens.
_WRAPPERS = {
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "CLIPModel",
    "CLIPVisionModelWithProjection",
    "SiglipModel",
}

SUPPORTED = (
    "Hugging Face transformers ViTModel, ViTForImageClassification, DeiTModel, "
    "DeiTForImageClassification(WithTeacher), Dinov2Model, Dinov2WithRegistersModel, CLIPVisionModel, "
    "CLIPVisionModelWithProjection, CLIPModel (vision tower), SiglipVisionModel and SiglipModel (vision tower)"
)


def matches(model: nn.Module) -> bool:
    """True for models defined in transformers (checked by module path, importing nothing)."""
    return type(model).__module__.startswith("transformers.")


def _find_backbone(model: nn.Module) -> tuple[str, nn.Module]:
    name = type(model).__name__
    if name in _BACKBONES:
        return "", model
    if name not in _WRAPPERS:
        raise ValueError(
            f"tokenbudget cannot patch transformers' {name}: it supports {SUPPORTED}. Heads that average "
            "patch tokens (e.g. Dinov2ForImageClassification) would weight merged tokens wrongly; patch "
            "the backbone inside (e.g. model.dinov2) and pool its last_hidden_state with tb.last_state sizes"
        )
    found = [(path, m) for path, m in model.named_modules() if type(m).__name__ in _BACKBONES]
    if len(found) != 1:
        raise ValueError(f"expected one vision backbone inside {name}, found {[p for p, _ in found]}")
    return found[0]


class HFLayerForward(ReducingBlockForward):
    """Instance-level ``forward`` of one transformers encoder layer, laid out as ``layout`` says."""

    def __init__(self, block: nn.Module, layer: int, ctx: PatchContext, layout: LayerLayout) -> None:
        super().__init__(block, layer, ctx)
        get = block.get_submodule
        self.norm1, self.attention, self.norm2, self.mlp = (
            get(layout.norm1),
            get(layout.attention),
            get(layout.norm2),
            get(layout.mlp),
        )
        self.after_attention = [get(n) for n in layout.after_attention]
        self.after_mlp = [get(n) for n in layout.after_mlp]

    def call(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.run(hidden_states, attention_mask, **kwargs)

    def attention_branch(self, x: Tensor, attn_bias: Tensor | None, **kwargs: Any) -> Tensor:
        y, _ = self.attention(self.norm1(x), attention_mask=attn_bias, **kwargs)  # (output, weights)
        for module in self.after_attention:
            y = module(y)
        return y

    def mlp_branch(self, x: Tensor) -> Tensor:
        y = self.mlp(self.norm2(x))
        for module in self.after_mlp:
            y = module(y)
        return y


class _HeadsSummed:
    """``k_proj`` output [B, N, H * d] -> ToMe metric [B, N, d] (keys summed over heads)."""

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim

    def __call__(self, keys: Tensor) -> Tensor:
        batch, tokens, _ = keys.shape
        return keys.view(batch, tokens, -1, self.head_dim).sum(dim=2)


class SizeWeightedAttentionPool:
    """Forward pre-hook on an attention-pooling head's ``nn.MultiheadAttention`` (query: learned
    probe, keys/values: the tokens): adds log(size) to its logits, so a merged token counts for the
    patches it covers, exactly as proportional attention does inside the blocks."""

    def __init__(self, ctx: PatchContext) -> None:
        self.ctx = ctx

    def __call__(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        query, key = args[0], args[1]  # [B, Q, C], [B, N, C] (batch_first)
        size = merged_sizes(self.ctx, key)  # [B, N, 1] or None
        if size is None:
            return None
        if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
            raise NotImplementedError("the pooling head already has a mask; cannot add token sizes to it")
        batch, queries, heads = query.shape[0], query.shape[1], module.num_heads
        bias = size.log().to(query.dtype).transpose(1, 2)  # [B, 1, N]
        # nn.MultiheadAttention takes a 3-D float mask as [B * heads, Q, N], added to the logits.
        mask = bias.unsqueeze(1).expand(batch, heads, queries, -1).reshape(batch * heads, queries, -1)
        return args, {**kwargs, "attn_mask": mask}


@register_adapter
class HFAdapter(Adapter):
    """Finds and patches the encoder layers of a transformers vision model."""

    name = "hf"
    supported = SUPPORTED
    order = 1

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return matches(model)

    def __init__(self, model: nn.Module) -> None:
        path, backbone = _find_backbone(model)
        layers = [m for m in backbone.modules() if type(m).__name__ in _LAYOUTS]
        if not layers:
            raise ValueError(
                f"{type(backbone).__name__} has no encoder layers tokenbudget knows ({list(_LAYOUTS)})"
            )
        layout = _LAYOUTS[type(layers[0]).__name__]
        attention = layers[0].get_submodule(layout.attention)
        if not (hasattr(attention, "k_proj") and hasattr(attention, "head_dim")):
            raise ValueError(
                f"{type(attention).__name__} has no k_proj / head_dim: tokenbudget supports the attention "
                f"modules of transformers 5.x ({INSTALL_HINT})"
            )
        config = backbone.config
        self.model = model
        self.backbone = backbone
        self.backbone_layout = _BACKBONES[type(backbone).__name__]
        self.layers = layers
        self.blocks = layers
        self.layout = layout
        self.num_prefix = self.backbone_layout.prefix_tokens(config)
        self.attn_implementation = getattr(config, "_attn_implementation", None) or "eager"
        side = int(config.image_size) // int(config.patch_size)
        self.grid = (side, side)
        self.patch_size = (int(config.patch_size),) * 2
        self._hooks: list[Any] = []

    # -- structure ---------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.backbone.config.num_attention_heads)

    @property
    def image_size(self) -> tuple[int, int]:
        side = int(self.backbone.config.image_size)
        return (side, side)

    def block_dims(self) -> list[BlockDims]:
        dims = []
        for layer in self.layers:
            attention = layer.get_submodule(self.layout.attention)
            mlp = layer.get_submodule(self.layout.mlp)
            q = attention.q_proj  # [C] -> [A]
            dims.append(BlockDims(q.in_features, q.out_features, mlp.fc1.out_features))
        return dims

    def patch_conv(self) -> nn.Conv2d | None:
        convs = [m for m in self.backbone.get_submodule("embeddings").modules() if isinstance(m, nn.Conv2d)]
        return convs[0] if len(convs) == 1 else None

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.backbone_layout.mean, self.backbone_layout.std

    # -- running -----------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        return self.backbone(pixel_values=images).last_hidden_state

    def embed(self, images: Tensor) -> Tensor:
        x = images
        for name in self.backbone_layout.embeddings:
            x = self.backbone.get_submodule(name)(x)
        return x

    def final_norm(self, x: Tensor) -> Tensor:
        name = self.backbone_layout.final_norm
        return x if name is None else self.backbone.get_submodule(name)(x)

    def patch_embeddings(self, images: Tensor) -> Tensor:
        conv = self.patch_conv()
        if conv is None:
            return super().patch_embeddings(images)
        return conv(images).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h * w, C]

    # -- patching ----------------------------------------------------------------------------
    def install(self, ctx: PatchContext) -> None:
        if ctx.strategy.prop_attn and self.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                f"proportional attention adds a float bias to the attention logits, which the "
                f"{self.attn_implementation!r} attention implementation does not take; load the model with "
                "attn_implementation='sdpa' or 'eager', or use prop_attn=False"
            )
        if getattr(ctx.strategy, "guard", None) is not None and self.attn_implementation not in (
            "eager",
            "sdpa",
        ):
            raise ValueError(
                f"the entropy guard masks size-0 padding with a float attention bias, which the "
                f"{self.attn_implementation!r} attention implementation does not take; load the model with "
                "attn_implementation='sdpa' or 'eager', or use entropy_floor=None"
            )
        for layer, block in enumerate(self.layers):
            block.forward = HFLayerForward(block, layer, ctx, self.layout)
            attention = block.get_submodule(self.layout.attention)
            capture = KeyCapture(ctx, _HeadsSummed(int(attention.head_dim)))
            self._hooks.append(attention.k_proj.register_forward_hook(capture))
        head = getattr(self.backbone, "head", None)
        if isinstance(getattr(head, "attention", None), nn.MultiheadAttention):  # SigLIP
            pool = SizeWeightedAttentionPool(ctx)
            self._hooks.append(head.attention.register_forward_pre_hook(pool, with_kwargs=True))

    def uninstall(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for block in self.layers:
            block.__dict__.pop("forward", None)
