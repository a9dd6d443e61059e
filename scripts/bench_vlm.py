"""Prefill time of a VLM unpatched vs each visual-token cut, interleaved, medians; and the language
model's share of the unpatched prefill (what a cut before the LLM can save at most).

Two kinds of model:
- ``--model DIR``: a saved transformers VLM and its processor (e.g. the small VLM that
  ``tokenbudget train-vlm`` writes), on the first ``--batch-size`` questions of ``--data``.
- ``--shape llava-1.5``: LLaVA-1.5-7B's shapes (CLIP ViT-L/14 at 336 px: 576 visual tokens; a 32-layer
  4096-wide Llama) with random weights: for a GPU (bf16); ``--shape small`` is a reduced LLaVA for CPUs.
  Random weights: this measures what each cut saves, not answers.

    python scripts/bench_vlm.py --model ~/.cache/tokenbudget/vlm/tiny-llava-dinov2 --tokens 0.25
    python scripts/bench_vlm.py --shape llava-1.5 --device cuda --dtype bf16 --tokens 0.25,64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import tokenbudget as tb

SHAPES = {
    # vision: CLIP ViT-L/14-336; text: Llama-2-7B
    "llava-1.5": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14),
                  dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32)),
    "small": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                   image_size=336, patch_size=14),
              dict(vocab_size=1000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=8)),
}  # fmt: skip


def shaped_model(
    shape: str, batch_size: int, device: str, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict]:
    """A random LLaVA of ``shape`` and a prompt batch: 5 text tokens, the image, a 30-token question."""
    import transformers as T

    vision, text = SHAPES[shape]
    image_token = text["vocab_size"] - 1
    config = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(**vision),
        text_config=T.LlamaConfig(**text, pad_token_id=0),
        image_token_id=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = T.LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    n = (vision["image_size"] // vision["patch_size"]) ** 2
    ids = torch.tensor(
        [[1, 5, 6, 7, 8] + [image_token] * n + list(range(10, 40))] * batch_size, device=device
    )
    pixels = torch.randn(
        batch_size, 3, vision["image_size"], vision["image_size"], device=device, dtype=dtype
    )
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def saved_model(path: str, data: str, batch_size: int, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """A saved VLM and a left-padded batch of its first ``batch_size`` questions (chat template)."""
    from PIL import Image

    from tokenbudget.evaluate.vlm_answers import load_vqa, prompts_for
    from tokenbudget.models.vlm import load_vlm

    model, processor = load_vlm(path, device=device)
    model = model.to(dtype)
    items = load_vqa(data)[:batch_size]
    images = [Image.open(item.image).convert("RGB") for item in items]
    prompts = prompts_for(processor, [item.question for item in items])
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
    return model, dict(batch)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a saved VLM folder (model + processor)")
    source.add_argument("--shape", choices=sorted(SHAPES), help="a random LLaVA of these shapes")
    parser.add_argument("--data", help="questions JSONL for --model (default: DIR/data/test.jsonl)")
    parser.add_argument("--methods", default="full,random,pool,visionzip,select,fastv,tome")
    parser.add_argument("--tokens", default="0.25", help="comma list of fractions or counts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=7, help="timed rounds after one warm-up round")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.model:
        data = args.data or str(Path(args.model) / "data" / "test.jsonl")
        model, batch = saved_model(args.model, data, args.batch_size, args.device, dtype)
    else:
        model, batch = shaped_model(args.shape, args.batch_size, args.device, dtype)
    budgets = [float(t) if "." in t else int(t) for t in args.tokens.split(",")]
    configs = {"full": None}
    for method in args.methods.split(","):
        if method != "full":
            for budget in budgets:
                configs[f"{method}@{budget}"] = tb.vlm_config(method, budget)
    vision = {k: batch[k] for k in ("pixel_values", "image_sizes") if k in batch}
    times: dict[str, list[float]] = {name: [] for name in [*configs, "tower+projector"]}
    with torch.inference_mode():
        for rep in range(args.samples + 1):
            for name, config in configs.items():
                tb.remove(model) if config is None else tb.apply(model, config)
                sync(args.device)
                start = time.perf_counter()
                model(**batch)
                sync(args.device)
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
            tb.remove(model)
            start = time.perf_counter()
            model.model.get_image_features(**vision)  # the vision side alone, unpatched
            sync(args.device)
            if rep:
                times["tower+projector"].append(time.perf_counter() - start)
    full = statistics.median(times["full"])
    vision_share = statistics.median(times["tower+projector"]) / full
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"  # fmt: skip
    what = args.model or f"random LLaVA, {args.shape} shapes"
    print(f"prefill of {what}; batch {args.batch_size}, {args.dtype}, {device}; median of {args.samples}")
    print(f"language model's share of the unpatched prefill: {1 - vision_share:.2f} (vision side {vision_share:.2f})")  # fmt: skip
    rows = []
    for name, values in times.items():
        if name == "tower+projector":
            continue
        median = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [median, median, median]
        rows.append({"method": name, "ms": median * 1000, "speedup": full / median,
                     "speedup_iqr": [full / quartiles[2], full / quartiles[0]]})  # fmt: skip
        print(f"{name:16s} {median * 1000:9.1f} ms  speedup {full / median:5.2f}x  "
              f"(IQR {full / quartiles[2]:.2f}-{full / quartiles[0]:.2f})")  # fmt: skip
    if args.out:
        record = {"model": what, "device": device, "dtype": args.dtype, "batch_size": args.batch_size,
                  "language_model_share": 1 - vision_share, "rows": rows}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
