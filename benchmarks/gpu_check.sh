#!/usr/bin/env bash
# First-GPU check (see benchmarks/gpu_check.py for what it records and what one GPU cannot show).
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget_s 480]   # one GPU, ~8 min, no network
#   bash benchmarks/gpu_check.sh --tiny --out DIR                # CPU, tiny shapes (tests/test_gpu_check.py)
# Uses ./.venv when present (launch/install.sh), else the python on PATH. Exit 0 on success; the results are
# DIR/gpu_check.json (default gpu_check_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29517}
unset RANK WORLD_SIZE LOCAL_RANK   # one process: world size 1
exec "$PY" benchmarks/gpu_check.py "$@"
