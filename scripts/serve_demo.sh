#!/usr/bin/env bash
# The serving main job: build the demo repository (a small random Llama with a tokenizer, tp=2,
# pp=2), start `shardserve serve` on it, stream one request with tritonclient, print the text, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m configs.demo_repo run "${DEMO_DIR:-.demo}/repo" "$@"
