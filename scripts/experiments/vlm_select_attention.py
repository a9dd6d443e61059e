"""Question-aware selection with the question's attention at LLM layer 1 (``tb.VisualSelect(query=
"attention")``) on the small VLM's first 450 held-out questions at 50 / 25 / 11 %, against full in
the same process (the rows scripts/vlm_table.sh does not name). Writes results/cpu/vlm/select_attention.json.

    PYTHONPATH=src python scripts/experiments/vlm_select_attention.py [MODEL_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import tokenbudget as tb
from tokenbudget.evaluate.vlm_answers import evaluate_vlm, load_vqa
from tokenbudget.models.vlm import load_vlm

torch.set_num_threads(2)
folder = sys.argv[1] if len(sys.argv) > 1 else str(Path.home() / ".cache/tokenbudget/vlm/tiny-llava-dinov2")
model, processor = load_vlm(folder, progress=False)
items = load_vqa(Path(folder) / "data" / "test.jsonl")[:450]
methods = [("select-attention", t, tb.VisualSelect(tokens=t, query="attention")) for t in (0.5, 0.25, 0.11)]
rows = evaluate_vlm(model, processor, items, methods, batch_size=16, timing=False)
for r in rows:
    kinds = {k: round(v["accuracy"], 3) for k, v in r.per_kind.items()}
    print(r.method, r.tokens, round(r.accuracy, 3), round(r.se, 3), kinds)
Path("results/cpu/vlm/select_attention.json").write_text(
    json.dumps([r.to_dict() for r in rows], indent=2) + "\n"
)
