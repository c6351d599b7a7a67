#!/usr/bin/env bash
# The test command: sets up everything on a fresh machine (idempotent), then lint + the full suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# OpenMPI, Slurm + munge, iproute2 for the launch tests; libb64 for Triton's perf_analyzer
bash .ci/setup-cluster.sh
if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
