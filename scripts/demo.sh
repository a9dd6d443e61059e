#!/usr/bin/env bash
# Set up (first run only), then run the demo: Auto and ToMe on the embedded DINOv2 at a few budgets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tokenbudget demo "$@"
