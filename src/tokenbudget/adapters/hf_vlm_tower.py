"""TowerReduce: one of tokenbudget's ViT reducers inside a VLM's own CLIP / SigLIP vision tower,
through the Hugging Face adapter (:mod:`tokenbudget.adapters.hf`), with a schedule that leaves
exactly the budget at the layer the projector reads."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config.base import config_class
from ..config.vlm import TowerReduce
from ..ops.visual_budget import visual_token_counts
from ..schedule import schedule_to_target
from . import hf_vlm_parts as parts


def prepare_tower(
    base: nn.Module, family: Any, config: TowerReduce
) -> tuple[tuple[Any, Any] | None, tuple[int, int]]:
    """((adapter, context) of the reducer in ``base.vision_tower`` or ``None`` when it keeps every
    token, (visual tokens per image before, after)). Only one-view families: anyres packing and Qwen's packed tower need every grid whole."""
    if family.layout == "qwen":
        raise NotImplementedError(
            "TowerReduce cannot run inside Qwen's vision tower: it packs every image into one sequence with "
            "windowed attention and merges 2x2 patch groups that must stay whole; use tb.VisionZip, "
            "tb.VisualPool, tb.VisualSelect or tb.VisualRandom (cuts after the tower) on Qwen2-VL / 2.5-VL"
        )
    if family.layout == "anyres":
        raise NotImplementedError(
            f"TowerReduce cannot run inside {family.name}'s vision tower: its anyres packing reshapes every "
            "tile's tokens back into a full grid; use tb.VisionZip, tb.VisualPool, tb.VisualSelect or "
            "tb.VisualRandom (cuts after the tower)"
        )
    from . import prepare_blocks  # the package's installer of per-block reductions

    mconfig = base.config
    tower = base.vision_tower
    layers = parts.tower_layers(tower)
    # several read layers (concatenated features): reduce only before the shallowest, so they all
    # hold the same tokens
    read = parts.feature_layer_index(mconfig, len(layers), deepest=False)
    side = int(mconfig.vision_config.image_size) // int(mconfig.vision_config.patch_size)
    prefix = 1 if parts.has_class_token(tower) else 0
    full = getattr(mconfig, "vision_feature_select_strategy", "full") == "full"
    visual = side * side + (prefix if full else 0)  # tokens per image the projector gets
    k = visual_token_counts(config.tokens, [visual])[0]
    target = k + (0 if full else prefix)  # tokens after the read layer, class token included
    if target < prefix + 1 and prefix:
        raise ValueError(
            f"TowerReduce: with select strategy 'full' the class token is one of the {k} tokens; give >= 2"
        )
    if k == visual:  # nothing to cut: leave the tower untouched (bit-identical outputs)
        return None, (visual, k)
    cls = config_class(config.reducer)
    try:
        schedule = schedule_to_target(side * side + prefix, prefix, read + 1, target)
    except ValueError as error:
        raise ValueError(
            f"TowerReduce: {error} (the {read + 1} vision layers up to the one the projector reads); give a "
            "larger budget, or cut after the projector (tb.VisionZip, tb.VisualPool, ...)"
        ) from None
    inner = cls(r=schedule + [0] * (len(layers) - read - 1), **dict(config.options or {}))
    return prepare_blocks(tower, inner), (visual, k)
