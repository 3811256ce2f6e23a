#!/usr/bin/env bash
# The test command of the README: installs into ./.venv if needed, then runs the whole suite.
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash launch/install.sh | tail -n 1)
export PATH="$PWD/$VENV/bin:$PATH"
exec "$VENV/bin/python" -m pytest -q -ra tests "$@"
