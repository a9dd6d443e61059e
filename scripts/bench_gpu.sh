#!/usr/bin/env bash
# GPU throughput of baseline vs ToMe (SDPA on), fp32 and bf16; one short run (about 5 minutes on an H100).
# Usage on a machine with CUDA: bash scripts/bench_gpu.sh  -> results/gpu/*.txt
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=results/gpu
mkdir -p "$out"
tb=.venv/bin/tokenbudget
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/machine.txt" || true
for dtype in fp32 bf16; do
  for model in vit_small_patch16_224 vit_base_patch16_224 dinov2_small; do
    "$tb" bench --model "$model" --r 8,16 --batch-size 1,256 --device cuda --dtype "$dtype" --samples 10 --quiet \
      | tee "$out/${model}_${dtype}.txt"
  done
done
# Every budget-scheduled method at 1.5x and 2x FLOPs-ideal, interleaved against one baseline.
"$tb" bench --model dinov2_small --methods tome,tome-detail,tofu,random,pool --keep 0.3808,0.0566 \
  --batch-size 256 --device cuda --dtype bf16 --samples 10 --quiet | tee "$out/dinov2_small_methods_bf16.txt"
