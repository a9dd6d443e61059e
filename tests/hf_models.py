"""Tiny random Hugging Face vision models of every family the HF adapter supports (no downloads)."""

from __future__ import annotations

import torch

from conftest import randomize_parameters

# 32 px images, 4 px patches: an 8x8 grid, 64 patch tokens, 4 layers (as the tiny timm models).
COMMON = dict(
    hidden_size=48,
    num_hidden_layers=4,
    num_attention_heads=3,
    intermediate_size=96,
    image_size=32,
    patch_size=4,
)
DINO = dict(
    hidden_size=48, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=2, image_size=32, patch_size=4
)

# family -> (prefix tokens, output field compared)
FAMILIES = {
    "vit": (1, "logits"),
    "deit_teacher": (2, "logits"),
    "dinov2": (1, "pooler_output"),
    "dinov2_registers": (5, "pooler_output"),
    "clip_vision": (1, "pooler_output"),
    "clip_projection": (1, "image_embeds"),
    "siglip_vision": (0, "pooler_output"),
}


def make_hf(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    impl = {"attn_implementation": attn_implementation}
    if family == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(**COMMON, num_labels=10, **impl))
    elif family == "deit_teacher":
        model = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**COMMON, num_labels=10, **impl))
    elif family == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(**DINO, **impl))
    elif family == "dinov2_registers":
        model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**DINO, num_register_tokens=4, **impl))
    elif family == "clip_vision":
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**COMMON, **impl))
    elif family == "clip_projection":
        model = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**COMMON, projection_dim=16, **impl))
    elif family == "siglip_vision":
        model = T.SiglipVisionModel(T.SiglipVisionConfig(**COMMON, **impl))
    else:
        raise KeyError(family)
    # Randomise every parameter (LayerScale included) so that each one changes the output.
    return randomize_parameters(model, lambda name: "lambda1" in name).eval()


def output(model: torch.nn.Module, family: str, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return getattr(model(images), FAMILIES[family][1])
