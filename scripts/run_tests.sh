#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the whole test suite, C++ unit tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
