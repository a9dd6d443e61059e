"""What the VLM cuts read from a transformers VLM's vision side: each image's token layout (its grid)
and, for VisionZip, per-token attention scores and keys of the vision layer the projector reads.

Attention is recomputed from the layer's own projections on the hidden states a forward pre-hook
sees (``q_proj`` / ``k_proj``, or Qwen's ``qkv`` with its own rotary function), so the tower keeps
running SDPA; nothing here copies an upstream forward.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn


def _module_function(module: nn.Module, name: str) -> Any:
    """A function of the transformers module that defines ``module``'s class (e.g. its rope helper)."""
    fn = getattr(sys.modules[type(module).__module__], name, None)
    if fn is None:
        raise NotImplementedError(
            f"{type(module).__module__} has no {name}; this transformers version is not supported by VisionZip"
        )
    return fn


def feature_layer_index(config: Any, num_layers: int, *, deepest: bool = True) -> int:
    """0-based index of the vision layer whose output the projector reads (``vision_feature_layer``:
    hidden_states[i] is the output of layer i - 1; a list of layers: its deepest, or with
    ``deepest=False`` its shallowest)."""
    given = getattr(config, "vision_feature_layer", -1)
    layers = list(given) if isinstance(given, (list, tuple)) else [given]
    indices = [(x if x >= 0 else num_layers + 1 + x) - 1 for x in layers]
    if not all(0 <= i < num_layers for i in indices):
        raise ValueError(
            f"vision_feature_layer {given} reads no layer of the {num_layers}-layer vision tower"
        )
    return max(indices) if deepest else min(indices)


def tower_layers(tower: nn.Module) -> list[nn.Module]:
    """The encoder layers of a CLIP / SigLIP (``encoder.layers``) or DINOv2 (``encoder.layer``) tower."""
    encoder = getattr(tower, "vision_model", tower).encoder
    layers = getattr(encoder, "layers", None)
    return list(layers if layers is not None else encoder.layer)


def layer_attention(layer: nn.Module) -> nn.Module:
    """The self-attention module of one tower layer (CLIP / SigLIP ``self_attn``, DINOv2 ``attention``),
    whose forward takes the normed hidden states [B, N, C] first."""
    attention = getattr(layer, "self_attn", None)
    return attention if attention is not None else layer.attention


def has_class_token(tower: nn.Module) -> bool:
    """Whether the tower puts a class token first (CLIP ``class_embedding``, DINOv2 ``cls_token``)."""
    embeddings = getattr(tower, "vision_model", tower).embeddings
    return hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")


class CrossAttentionScores:
    """Forward pre-hook on one CLIP / SigLIP self-attention: per crop, the score of each token
    (the class token's attention to it, or with no class token the attention it receives, averaged
    over queries) [crops, N] and its key averaged over heads [crops, N, d]."""

    def __init__(self, class_token: bool) -> None:
        self.class_token = class_token
        self.scores: Tensor | None = None
        self.keys: Tensor | None = None

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]  # [B, N, C]
        batch, n, _ = h.shape
        heads = getattr(module, "num_heads", None) or module.num_attention_heads
        dim = module.head_dim
        scale = getattr(module, "scale", None) or module.scaling
        q = module.q_proj(h).view(batch, n, heads, dim).transpose(1, 2).float()
        k = module.k_proj(h).view(batch, n, heads, dim).transpose(1, 2).float()
        attn = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1).mean(1)  # [B, N, N]
        self.scores = attn[:, 0] if self.class_token else attn.mean(1)
        self.keys = k.mean(1)


class PackedAttentionScores:
    """Forward pre-hook on a Qwen2-VL / Qwen2.5-VL vision attention (packed sequence [S, C] with
    ``cu_seqlens``): the attention each patch receives within its image [S] and its keys [S, d]."""

    def __init__(self) -> None:
        self.scores: Tensor | None = None
        self.keys: Tensor | None = None

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs["hidden_states"]
        cu = kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        s = h.shape[0]
        q, k, _ = module.qkv(h).reshape(s, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = _module_function(module, "apply_rotary_pos_emb_vision")(q, k, cos, sin)
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [H, S, d]
        scores = torch.empty(s, device=h.device)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            attn = torch.softmax(q[:, a:b] @ k[:, a:b].transpose(-1, -2) * module.scaling, dim=-1)
            scores[a:b] = attn.mean(0).mean(0)  # heads, then queries
        self.scores, self.keys = scores, k.mean(0)


def qwen_unit_scores(
    visual: nn.Module, capture: PackedAttentionScores, grid_thw: Tensor
) -> tuple[Tensor, Tensor]:
    """Per merged (LLM) token, in the order the projector emits them: the mean score [T] and mean key
    [T, d] of its ``merge**2`` patches (Qwen2.5-VL's window permutation undone)."""
    unit = visual.spatial_merge_size**2
    scores = capture.scores.view(-1, unit).mean(1)
    keys = capture.keys.view(-1, unit, capture.keys.shape[-1]).mean(1)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: the blocks see the units in window order
        window_index, _ = _module_function(visual, "get_vision_window_index")(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
            kwargs={},
        )
        order = torch.argsort(window_index.to(scores.device))
        scores, keys = scores[order], keys[order]
    return scores, keys


def square_layout(n: int, side: int) -> list[tuple[int, int]] | None:
    """Grid segments of ``n`` tokens of one square view of side ``side`` (a leading class token apart)."""
    if n == side * side:
        return [(side, side)]
    if n == side * side + 1:
        return [(1, 1), (side, side)]
    return None


def anyres_layout(index: Tensor, base: int, side: int) -> list[tuple[int, int]]:
    """Grid segments of one LLaVA-NeXT / OneVision image from its packed index map [n] (-1: newline):
    the base view, then the high-resolution tiles as rows that each end with a newline token."""
    layout = square_layout(base, side) or [(1, base)]
    rest = index[base:]
    if rest.numel():
        rows = int((rest < 0).sum())
        layout.append(
            (rows, rest.numel() // rows) if rows and rest.numel() % rows == 0 else (1, rest.numel())
        )
    return layout


def anyres_index_map(
    base_model: nn.Module, crops: list[int], tokens: int, image_sizes: Tensor
) -> list[Tensor]:
    """For each image of a LLaVA-NeXT / OneVision call, the crop-token index [n_i] (into the tower's
    crops x ``tokens`` flattened) behind each of its packed features, -1 for newline tokens: the
    model's own ``pack_image_features`` run on the indices instead of the features (so unpadding and
    the tile layout are the model's; OneVision's bilinear downscaling of very large images gives
    the nearest index)."""
    flat = torch.arange(sum(crops) * tokens, dtype=torch.float32).view(sum(crops), tokens, 1)
    split = list(torch.split(flat, crops))
    newline = torch.tensor([-1.0])
    config = base_model.config
    if "vision_aspect_ratio" in base_model.pack_image_features.__code__.co_varnames:
        packed, _ = base_model.pack_image_features(
            split, image_sizes, image_newline=newline, vision_aspect_ratio=config.vision_aspect_ratio
        )
    else:
        packed, _ = base_model.pack_image_features(
            split,
            image_sizes,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_newline=newline,
        )
    return [p.view(-1).round().long() for p in packed]


def anyres_crops(base_model: nn.Module, image_sizes: Tensor) -> list[int]:
    """Crops (base view + tiles) the vision tower sees per image of a LLaVA-NeXT / OneVision call."""
    fn = _module_function(base_model, "image_size_to_num_patches")
    config = base_model.config
    return [
        int(
            fn(
                image_size=s,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
        )
        for s in image_sizes
    ]


class _Stop(Exception):
    """Raised by :class:`LayerQueries` once it has what it needs: the rest of the LLM need not run."""


class LayerQueries:
    """Forward pre-hook on one LLM decoder layer's self-attention: its rotated queries and keys
    [B, H, L, d] (keys repeated over the query groups), computed with the layer's own projections,
    q/k norms and rope function; then stops the forward (nothing after that layer runs)."""

    def __init__(self) -> None:
        self.q: Tensor | None = None
        self.k: Tensor | None = None
        self.scaling = 1.0

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, L, C]
        cos, sin = kwargs["position_embeddings"]
        batch, length, _ = h.shape
        d = module.head_dim
        q = module.q_proj(h).view(batch, length, -1, d)
        k = module.k_proj(h).view(batch, length, -1, d)
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = _module_function(module, "apply_rotary_pos_emb")(q, k, cos, sin)
        self.q, self.k = q.float(), k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()
        self.scaling = float(getattr(module, "scaling", d**-0.5))
        raise _Stop


def llm_layer_queries(language_model: nn.Module, embeds: Tensor, mask: Tensor, positions: Tensor, layer: int) -> LayerQueries:  # fmt: skip
    """Run ``language_model`` on ``embeds`` [B, L, C] up to decoder layer ``layer`` and return its
    attention's queries and keys (see :class:`LayerQueries`)."""
    capture = LayerQueries()
    layers = language_model.layers
    attention = layers[min(layer, len(layers) - 1)].self_attn
    handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if capture.q is None:
        raise NotImplementedError(f"{type(language_model).__name__}'s decoder layer {layer} was not reached")
    return capture
