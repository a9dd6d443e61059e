"""Tiny random VLMs of every family FastV supports, built from transformers config classes (nothing
downloaded), and a left-padded batch of two prompts (one image each) plus each row on its own."""

from __future__ import annotations

import torch
import transformers as T

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
PAD, IMAGE, VIDEO, START, END = 0, 63, 62, 61, 60
_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: the score row repeats k heads
    vocab_size=64,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)


def _clip(image_size: int, patch_size: int) -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def make_vlm(family: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A random VLM of ``family`` with a 4-layer language model, in eval mode."""
    pinpoints = [[16, 32], [32, 16]]
    if family == "llava":
        config = T.LlavaConfig(
            vision_config=_clip(32, 8),
            text_config=T.LlamaConfig(**_TEXT),
            image_token_index=IMAGE,
            image_seq_length=16,
            vision_feature_select_strategy="default",
        )
        cls = T.LlavaForConditionalGeneration
    elif family == "llava_next":
        config = T.LlavaNextConfig(
            vision_config=_clip(16, 4),
            text_config=T.LlamaConfig(**_TEXT),
            image_token_index=IMAGE,
            image_grid_pinpoints=pinpoints,
        )
        cls = T.LlavaNextForConditionalGeneration
    elif family == "llava_onevision":
        config = T.LlavaOnevisionConfig(
            vision_config=_clip(16, 4),
            text_config=T.Qwen2Config(**_TEXT),
            image_token_index=IMAGE,
            video_token_index=VIDEO,
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="default",
        )
        cls = T.LlavaOnevisionForConditionalGeneration
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        # head_dim 8: the three mrope sections (time, height, width) split its 4 frequencies
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
        text = {**_TEXT, "rope_parameters": rope}
        ids = dict(
            image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END
        )
        common = dict(num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=32, **common)
            config, cls = (
                T.Qwen2VLConfig(text_config=text, vision_config=vision, **ids),
                T.Qwen2VLForConditionalGeneration,
            )
        else:
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=32,
                window_size=16,
                fullatt_block_indexes=[1],
                **common,
            )
            config = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            cls = T.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


def _images(model: torch.nn.Module, family: str, gen: torch.Generator) -> tuple[dict, list[dict], int]:
    """Two images: (the batch's image inputs, each row's, visual tokens per image)."""
    if family == "llava":
        size = model.config.vision_config.image_size
        pixels = torch.randn(2, 3, size, size, generator=gen)
        per_image = (size // model.config.vision_config.patch_size) ** 2
        return {"pixel_values": pixels}, [{"pixel_values": pixels[b : b + 1]} for b in range(2)], per_image
    if family.startswith("qwen"):
        vision = model.config.vision_config
        grid = torch.tensor([[1, 8, 8], [1, 8, 8]])
        patches = int(grid[0].prod())
        width = 3 * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(2 * patches, width, generator=gen)
        rows = [
            {"pixel_values": pixels[b * patches : (b + 1) * patches], "image_grid_thw": grid[b : b + 1]}
            for b in range(2)
        ]
        per_image = patches // vision.spatial_merge_size**2
        return {"pixel_values": pixels, "image_grid_thw": grid}, rows, per_image
    # anyres: a base view and two tiles of a 16 x 32 image; the model says how many tokens that is
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, 3, size, size, generator=gen)
    sizes = torch.tensor([[size, 2 * size]] * 2)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, return_dict=True)
    per_image = int(features.pooler_output[0].shape[0])
    rows = [{"pixel_values": pixels[b : b + 1], "image_sizes": sizes[b : b + 1]} for b in range(2)]
    return {"pixel_values": pixels, "image_sizes": sizes}, rows, per_image


def vlm_batch(model: torch.nn.Module, family: str, seed: int = 1) -> tuple[dict, list[dict], int]:
    """(a left-padded batch of 2 prompts with one image each, each row alone unpadded, visual tokens
    per image)."""
    gen = torch.Generator().manual_seed(seed)
    images, image_rows, n = _images(model, family, gen)
    block = [START, *([IMAGE] * n), END] if family.startswith("qwen") else [IMAGE] * n
    prompts = [[5, 6, *block, 7, 8, 9, 10], [11, *block, 12, 13]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    text = {"input_ids": ids, "attention_mask": mask}
    if family.startswith("qwen"):  # the processor's token types: mrope positions need them
        text["mm_token_type_ids"] = (ids == IMAGE).long()
    rows = []
    for b in range(2):
        valid = mask[b].bool()
        rows.append({**{k: v[b : b + 1, valid] for k, v in text.items()}, **image_rows[b]})
    return {**text, **images}, rows, n
