#!/usr/bin/env bash
# The README's main command: installs into ./.venv if needed, then runs the demo (launch/demo.py):
# a teacher trained on the Python standard library, then a CE-only and a distilled student, compared held-out.
#   bash launch/demo.sh [demo.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash launch/install.sh | tail -n 1)
export PATH="$VENV/bin:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
exec "$VENV/bin/python" launch/demo.py "$@"
