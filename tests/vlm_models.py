"""Tiny random transformers VLMs of every family tokenbudget's VLM cuts support (nothing downloaded).

``make_vlm(family, seed=0)`` returns ``(model, make_batch)``: ``make_batch()`` gives the keyword
inputs of a left-padded batch of 2 prompts, one image each (images of different sizes where the
family takes them), as the family's processor would lay them out: every image's placeholder run has
as many image tokens as the model makes features for it (counted by the unpatched model itself).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FAMILIES = ("llava", "llava_dinov2", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "paligemma")

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1  # the placeholder id; read back from model.config by the library
PAD = 0
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=PAD,
    max_position_embeddings=256,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _build(family: str, text_layers: int | None = None) -> torch.nn.Module:
    import transformers as T

    sdpa = {"attn_implementation": "sdpa"}
    text_kw = TEXT if text_layers is None else dict(TEXT, num_hidden_layers=text_layers)
    if family == "llava":
        config = T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(**VISION),
            text_config=T.LlamaConfig(**text_kw),
            image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            **sdpa,
        )
        return T.LlavaForConditionalGeneration(config)
    if family == "llava_dinov2":  # the small VLM's layout: a DINOv2 tower (class token, LayerScale)
        dino = dict(VISION, mlp_ratio=2)
        del dino["intermediate_size"]
        config = T.LlavaConfig(
            vision_config=T.Dinov2Config(**dino),
            text_config=T.LlamaConfig(**text_kw),
            image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            **sdpa,
        )
        return T.LlavaForConditionalGeneration(config)
    if family == "llava_next":
        config = T.LlavaNextConfig(
            vision_config=T.CLIPVisionConfig(**VISION),
            text_config=T.LlamaConfig(**text_kw),
            image_token_id=IMAGE_TOKEN,
            image_grid_pinpoints=PINPOINTS,
            **sdpa,
        )
        return T.LlavaNextForConditionalGeneration(config)
    if family == "llava_onevision":
        config = T.LlavaOnevisionConfig(
            vision_config=T.SiglipVisionConfig(**VISION),
            text_config=T.Qwen2Config(**text_kw),
            image_token_id=IMAGE_TOKEN,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            **sdpa,
        )
        return T.LlavaOnevisionForConditionalGeneration(config)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        text = dict(
            text_kw,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]},
        )
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_chans=3,
        )
        if family == "qwen2_vl":
            config = T.Qwen2VLConfig(
                text_config=text,
                vision_config=dict(vision, mlp_ratio=2),
                image_token_id=IMAGE_TOKEN,
                video_token_id=IMAGE_TOKEN - 1,
                **sdpa,
            )
            return T.Qwen2VLForConditionalGeneration(config)
        vision = dict(
            vision, intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1]
        )
        config = T.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE_TOKEN,
            video_token_id=IMAGE_TOKEN - 1,
            **sdpa,
        )
        return T.Qwen2_5_VLForConditionalGeneration(config)
    if family == "paligemma":
        text = dict(text_kw, head_dim=8)
        config = T.PaliGemmaConfig(
            vision_config=T.SiglipVisionConfig(**VISION),
            text_config=T.GemmaConfig(**text),
            image_token_id=IMAGE_TOKEN,
            projection_dim=32,
            **sdpa,
        )
        return T.PaliGemmaForConditionalGeneration(config)
    raise KeyError(f"unknown family {family!r}; choose from {FAMILIES}")


def _pixels(family: str, model: torch.nn.Module, gen: torch.Generator) -> dict:
    """Pixel inputs of two images (of different sizes where the family allows)."""
    if family in ("llava", "llava_dinov2", "paligemma"):
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=gen)}
    if family in ("llava_next", "llava_onevision"):
        # image 0: a wide 32x64 image (base view + 2 tiles); image 1: 32x32 (base view + 1 tile)
        sizes = torch.tensor([[32, 64], [32, 32]])
        return {"pixel_values": torch.randn(2, 3, 3, 32, 32, generator=gen), "image_sizes": sizes}
    vc = model.config.vision_config
    grids = torch.tensor([[1, 8, 8], [1, 8, 12]])  # patch grids; merged 2x2: 16 and 24 tokens
    width = 3 * vc.temporal_patch_size * vc.patch_size**2
    rows = int(grids.prod(-1).sum())
    return {"pixel_values": torch.randn(rows, width, generator=gen), "image_grid_thw": grids}


def make_vlm(
    family: str, seed: int = 0, text_layers: int | None = None
) -> tuple[torch.nn.Module, Callable[[], dict]]:
    """A tiny random ``family`` VLM (eval mode, SDPA) and a builder of a left-padded batch of 2.
    ``text_layers``: decoder layers of its language model (default ``TEXT``'s 2)."""
    torch.manual_seed(seed)
    model = _build(family, text_layers).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    pixels = _pixels(family, model, gen)
    with torch.no_grad():
        feats = model.model.get_image_features(**pixels, return_dict=True).pooler_output
    counts = [int(f.shape[0]) for f in feats]
    # row 0: 3 text + image + 4-token question; row 1: 1 text + image + 2-token question (left-padded)
    texts = [([5, 6, 7], [11, 12, 13, 14]), ([8], [15, 16])]
    rows = [pre + [IMAGE_TOKEN] * n + post for (pre, post), n in zip(texts, counts, strict=True)]
    length = max(map(len, rows))
    ids = torch.full((2, length), PAD)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    batch = {"input_ids": ids, "attention_mask": mask, **pixels}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        batch["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int()
    if family == "paligemma":
        batch["token_type_ids"] = torch.zeros_like(ids)

    def make_batch() -> dict:
        return {k: v.clone() for k, v in batch.items()}

    return model, make_batch


def row_alone(batch: dict, row: int) -> dict:
    """Row ``row`` of a ``make_vlm`` batch on its own: its tokens without the padding, its image."""
    real = batch["attention_mask"][row].bool()
    alone = {}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            alone[key] = value[row : row + 1, real]
    if "image_grid_thw" in batch:  # Qwen: the images' patches are concatenated, grid by grid
        grids = batch["image_grid_thw"]
        start = int(grids[:row].prod(-1).sum())
        alone["pixel_values"] = batch["pixel_values"][start : start + int(grids[row].prod())]
        alone["image_grid_thw"] = grids[row : row + 1]
    else:  # one image per row
        for key in ("pixel_values", "image_sizes"):
            if key in batch:
                alone[key] = batch[key][row : row + 1]
    return alone


def text_tokens(model: torch.nn.Module, batch: dict) -> list[int]:
    """Per row of ``batch``: its tokens that are neither padding nor image placeholders."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return ((ids != model.config.image_token_id) & (mask == 1)).sum(1).tolist()
