"""Tiny timm ViTs covering every block feature the patch must keep (fast on a CPU)."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

# 32 px images, 4 px patches: an 8x8 grid, 64 patch tokens, 4 blocks.
TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)

VARIANTS: dict[str, tuple[type, dict]] = {
    "vit": (VisionTransformer, {}),
    "deit_distilled": (VisionTransformerDistilled, {}),
    "dinov2_layerscale": (VisionTransformer, {"init_values": 0.5}),
    "dinov2_registers": (VisionTransformer, {"init_values": 0.5, "reg_tokens": 4, "no_embed_class": True}),
    "qk_norm": (VisionTransformer, {"qk_norm": True}),
    "clip_prenorm": (VisionTransformer, {"pre_norm": True, "global_pool": "token"}),
    "avgpool_cls": (VisionTransformer, {"global_pool": "avg", "fc_norm": True}),
    "avgpool_no_cls": (VisionTransformer, {"class_token": False, "global_pool": "avg", "fc_norm": True}),
}


def make_tiny(variant: str, seed: int = 0) -> torch.nn.Module:
    cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    model = cls(**TINY, **extra).eval()
    # timm zero-initialises some weights (e.g. the head): randomise everything so that every
    # parameter, LayerScale and q/k norm included, changes the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(params=list(VARIANTS))
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return make_tiny(request.param)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)
