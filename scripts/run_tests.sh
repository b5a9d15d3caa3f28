#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the whole test suite, C++ unit tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# --durations: the slowest tests in the CI log, to keep the suite well under its time budget.
exec .venv/bin/python -m pytest -q --durations=25 "$@"
