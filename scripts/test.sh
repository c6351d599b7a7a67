#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine (idempotent), then lint + the full suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -x .ci/setup-cluster.sh ]; then bash .ci/setup-cluster.sh; fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
