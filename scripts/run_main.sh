#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the main job: two comparisons on the embedded
# digits with 5 seeds each (fastattnreg compare), each printing its table (95% intervals, paired
# differences to the reference row, each method's training epoch timed on the fused backend and
# on --backend reference) and writing runs/main/<benchmark>/ (metrics.json, results.csv,
# summary.csv, accuracy.png, attention.png). The methods' defaults come from
# scripts/tune.sh (docs/results.md).
# Extra arguments go to `fastattnreg compare` (e.g. --resume after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# One thread: the 8x8-digit ViTs are so small (batch 32 x 17 tokens x 64 channels) that a
# second thread costs more in synchronisation than it saves, and on a busy machine two spinning
# OpenMP threads made an epoch 10x slower.
.venv/bin/python -m fastattnreg compare \
  --methods baseline,structured,mimetic,refiner,link,link_advanced --seeds 0,1,2,3,4 \
  --train-fraction 0.1 --data digits --threads 1 --out runs/main/digits --overwrite "$@"
# Transfer (like for like): the task is digits 5-9 at 10%; the source of finetune and gta trains
# on every training image of digits 0-4 (it never sees the task's labels); gta's reference row
# is finetune, the others' the scratch baseline.
.venv/bin/python -m fastattnreg compare \
  --methods baseline,finetune,gta --classes 5-9 --seeds 0,1,2,3,4 \
  --train-fraction 0.1 --data digits --threads 1 --out runs/main/transfer --overwrite "$@"
