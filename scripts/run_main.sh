#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the main job: for now the attention benchmark,
# which prints its table and appends its rows to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m benchmarks.bench_attention "$@"
