"""Tiny random OpenCLIP models (no downloads): a CLIP with a ViT image tower, optionally avg-pooled."""

from __future__ import annotations

import torch

from conftest import randomize_parameters


def make_openclip(
    pool_type: str = "tok", ls_init_value: float | None = None, seed: int = 0
) -> torch.nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(
        layers=4,
        width=48,
        head_width=16,
        image_size=32,
        patch_size=4,
        pool_type=pool_type,
        ls_init_value=ls_init_value,
    )
    text = CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=2)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    return randomize_parameters(model, lambda name: name.endswith("gamma")).eval()
