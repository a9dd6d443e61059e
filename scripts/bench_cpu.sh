#!/usr/bin/env bash
# The CPU numbers in the README: every table there is a file under results/ written by this script.
# Takes about 15 minutes on 2 cores. Run nothing else meanwhile (timings share the cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=results/cpu
mkdir -p "$out"
tb=.venv/bin/tokenbudget
run() { local name=$1; shift; echo "== $name: tokenbudget $*"; "$tb" "$@" --quiet | tee "$out/$name.txt"; }
{ lscpu | grep -E "Model name|^CPU\(s\)"; .venv/bin/python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } > "$out/machine.txt"
run vit_small bench --model vit_small_patch16_224 --r 4,8,16 --batch-size 1,32 --threads 2 --samples 12
run vit_small_small_r bench --model vit_small_patch16_224 --r 1,2 --batch-size 1 --threads 2 --samples 20
run vit_base bench --model vit_base_patch16_224 --r 8,16 --batch-size 1,32 --threads 2 --samples 7
run dinov2_small bench --model dinov2_small --r 4,8,16 --batch-size 1,32 --threads 2 --samples 12
echo "== demo"; .venv/bin/tokenbudget demo --out demo_output --threads 2 --report "$out/demo.txt"
