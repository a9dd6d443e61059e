#!/usr/bin/env bash
# The VLM table: answers of the small VLM (tokenbudget train-vlm) on its held-out questions under every
# visual-token cut at 50 / 25 / 11 % of the visual tokens, against full in the same process; then the
# prefill time of each cut at 25 % (interleaved medians) and the language model's share of the prefill.
# Usage: bash scripts/vlm_table.sh [MODEL_DIR] [QUESTIONS]   -> results/cpu/vlm/*
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=${1:-$HOME/.cache/tokenbudget/vlm/tiny-llava-dinov2}
questions=${2:-450}
out=results/cpu/vlm
mkdir -p "$out"
if [ ! -f "$model/config.json" ]; then
  echo "no model in $model: build it with: .venv/bin/tokenbudget train-vlm --out $model" >&2
  exit 2
fi
.venv/bin/tokenbudget eval-vlm --model "$model" --data "$model/data/test.jsonl" --limit "$questions" \
  --methods full,random,pool,visionzip,select,fastv,tome,auto --tokens 0.5,0.25,0.11 --batch-size 16 \
  --no-timing --quiet --out "$out/answers.json" | tee "$out/answers.txt"
PYTHONPATH=src .venv/bin/python scripts/bench_vlm.py --model "$model" --tokens 0.25 --batch-size 16 \
  --methods full,random,pool,visionzip,select,fastv,tome,auto --samples 5 --out "$out/prefill.json" \
  | tee "$out/prefill.txt"
