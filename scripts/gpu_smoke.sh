#!/usr/bin/env bash
# GPU smoke check (one command, a few minutes): parity tests on CUDA with NCCL (the layouts that
# fit the GPUs present: NCCL wants one GPU per rank), then the decode benchmark in bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NGPU=$($PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.device_count())")
$PY -c "import torch; print(torch.cuda.get_device_name(0), '|', $NGPU, 'GPU(s) | torch', torch.__version__)"
SHARDSERVE_TEST_MAX_WORLD=$NGPU $PY -m pytest -q -p no:cacheprovider tests/test_parity.py
$PY -m benchmarks.bench_decode --params 200m --dtype bf16 --batches 1,8,32
