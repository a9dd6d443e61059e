"""Prefill time of a random LLaVA-shaped VLM (CLIP-L/14-336 sized grid: 576 visual tokens per image,
small widths) unpatched vs each visual-token cut at 64 tokens per image, interleaved, medians.

Random weights: this measures only what the cut saves (a shorter LLM prompt; TowerReduce also a
cheaper tower), not answer quality. Run: PYTHONPATH=src python scripts/vlm_cut_speed.py
"""

from __future__ import annotations

import statistics
import time

import torch
import transformers as T

import tokenbudget as tb

torch.manual_seed(0)
torch.set_num_threads(2)
vision = T.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                            image_size=336, patch_size=14)  # fmt: skip
text = T.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, pad_token_id=0)  # fmt: skip
config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=999, attn_implementation="sdpa")
model = T.LlavaForConditionalGeneration(config).eval()
n = (336 // 14) ** 2
ids = torch.tensor([[5, 6] + [999] * n + list(range(10, 40))] * 2)
batch = {
    "input_ids": ids,
    "attention_mask": torch.ones_like(ids),
    "pixel_values": torch.randn(2, 3, 336, 336),
}
configs = {
    "full": None,
    "random": tb.VisualRandom(tokens=64),
    "pool": tb.VisualPool(tokens=64),
    "visionzip": tb.VisionZip(tokens=64),
    "select": tb.VisualSelect(tokens=64),
    "select-attn": tb.VisualSelect(tokens=64, query="attention"),
    "tower-tome": tb.TowerReduce(tokens=64, reducer="tome"),
}
times: dict[str, list[float]] = {name: [] for name in configs}
with torch.no_grad():
    for rep in range(6):
        for name, cfg in configs.items():
            tb.remove(model) if cfg is None else tb.apply(model, cfg)
            start = time.perf_counter()
            model(**batch)
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - start)
base = statistics.median(times["full"])
print(f"prefill, batch 2, {n} visual tokens per image -> 64; median of {len(times['full'])}")
for name, values in times.items():
    print(
        f"{name:11s} {statistics.median(values) * 1000:8.1f} ms  speedup {base / statistics.median(values):.2f}x"
    )
