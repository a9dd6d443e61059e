#!/usr/bin/env bash
# GPU throughput of baseline vs ToMe with timm's SDPA attention, fp32 and bf16, batch 1 and 256 (and a
# LLaVA-1.5-shaped VLM under every visual-token cut, last); each
# table has the fixed cost per merging block ("ovh ms": patched minus free-reduction ceiling time,
# per merging block). One short run (about 10 minutes on an H100).
# Usage on a machine with CUDA: bash scripts/bench_gpu.sh  -> results/gpu/*.txt (+ batch1_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=results/gpu
mkdir -p "$out"
tb=.venv/bin/tokenbudget
py=.venv/bin/python
export TIMM_FUSED_ATTN=1 # timm's F.scaled_dot_product_attention path (its default, set explicitly)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/machine.txt" || true
for dtype in fp32 bf16; do
  for model in vit_small_patch16_224 vit_base_patch16_224 dinov2_small; do
    "$tb" bench --model "$model" --r 8,16 --batch-size 1,256 --device cuda --dtype "$dtype" --samples 10 --quiet \
      | tee "$out/${model}_${dtype}.txt"
  done
  # Batch 1 in detail: r=16 and small budgets with the cost model off and on, and batch 256.
  PYTHONPATH=src "$py" scripts/experiments/bench_batch1.py --device cuda --dtype "$dtype" --big-batch 256 --samples 10 \
    --only r16,small-r,big --r 1,2,4,8,16 --out "$out/batch1_${dtype}.json" | tee "$out/batch1_${dtype}.txt"
done
# Every budget-scheduled method at 1.5x and 2x FLOPs-ideal, interleaved against one baseline.
"$tb" bench --model dinov2_small --methods tome,tome-detail,tofu,random,pool --keep 0.3808,0.0566 \
  --batch-size 256 --device cuda --dtype bf16 --samples 10 --quiet | tee "$out/dinov2_small_methods_bf16.txt"
# VLM: prefill of a LLaVA-1.5-7B-shaped model (random weights: 576 visual tokens, 32-layer Llama) unpatched
# vs every visual-token cut at 50 / 25 / 11 % of the visual tokens, and the language model's share.
PYTHONPATH=src "$py" scripts/bench_vlm.py --shape llava-1.5 --device cuda --dtype bf16 --batch-size 8 \
  --tokens 0.5,0.25,0.11 --samples 10 --out "$out/vlm_llava15_bf16.json" | tee "$out/vlm_llava15_bf16.txt"
