#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the main job: every method on 10% of the
# embedded digits with 3 seeds (fastattnreg compare), which prints the comparison table and
# writes runs/main/ (metrics.json, results.csv, summary.csv, accuracy.png, attention.png).
# Extra arguments go to `fastattnreg compare` (e.g. --resume after an interruption).
# The attention benchmark that used to run here: .venv/bin/python -m benchmarks.bench_attention
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One thread: the 8x8-digit ViTs are so small (batch 32 x 17 tokens x 64 channels) that a
# second thread costs more in synchronisation than it saves, and on a busy machine two spinning
# OpenMP threads made an epoch 10x slower.
exec .venv/bin/python -m fastattnreg compare \
  --methods baseline,structured,mimetic,refiner,gta,link --seeds 0,1,2 \
  --train-fraction 0.1 --data digits --threads 1 --out runs/main --overwrite "$@"
