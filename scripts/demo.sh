#!/usr/bin/env bash
# The main job on the built-in default: a small random Llama checkpoint, run with tp=2 and pp=2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DEMO=${DEMO_DIR:-.demo}
.venv/bin/python -m configs.demo "$DEMO/tiny-llama"
.venv/bin/shardserve generate --model "$DEMO/tiny-llama" --tp 2 --pp 2 --max-tokens 24 \
  "The giant model is served" "Tensor parallel ranks"
