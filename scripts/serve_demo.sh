#!/usr/bin/env bash
# The serving main job: build the demo repository (the giant model demo_llm, a small random Llama
# with a tokenizer at tp=2, pp=2, next to python preprocess/postprocess models and the demo_chat
# ensemble chaining them), start `shardserve serve` on it, stream from demo_llm and through the
# ensemble with tritonclient, print the text, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m configs.demo_repo run "${DEMO_DIR:-.demo}/repo" "$@"
