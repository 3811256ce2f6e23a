#!/usr/bin/env bash
# The test command of the README: installs into ./.venv if needed, lints with ruff, then runs the whole suite.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/slurm_setup.sh   # slurm-wlm + munge for tests/test_slurm.py (only as root; otherwise it says why it skips)
VENV=$(bash launch/install.sh | tail -n 1)
export PATH="$VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
"$VENV/bin/ruff" check .   # lint (ruff.toml): unused names, undefined names, line length
exec "$VENV/bin/python" -m pytest -q -ra tests "$@"
