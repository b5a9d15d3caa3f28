#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the main job: three comparisons on the embedded
# digits with 5 seeds each (fastattnreg compare), each printing its table (95% intervals, paired
# differences to the reference row, each method's training epoch timed on the fused backend and
# on --backend reference) and writing runs/main/<benchmark>/ (metrics.json, results.csv,
# summary.csv, table.txt, accuracy.png, attention.png). The methods' defaults come from
# scripts/tune.sh on the 8x8 digits (docs/results.md).
# The 64-token digits32 comparison runs on the second core beside the two 8x8 ones (each run
# uses one thread), with its output in runs/main/digits32.log; its table is printed at the end.
# Extra arguments go to `fastattnreg compare` (e.g. --resume after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
mkdir -p runs/main
# digits32: each digit upscaled to 16x16 at a random place on a 32x32 canvas, 64 tokens of 4x4
# patches. 30% of the training split (404 images) and 30 epochs: at 20% the baseline stays near
# chance (docs/results.md).
.venv/bin/python -m fastattnreg compare \
  --methods baseline,structured,refiner --seeds 0,1,2,3,4 --train-fraction 0.3 --epochs 30 \
  --data digits32 --threads 1 --out runs/main/digits32 --overwrite "$@" \
  > runs/main/digits32.log 2>&1 &
digits32=$!
trap 'kill "$digits32" 2>/dev/null || true' EXIT  # an 8x8 failure stops it too
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
if ! wait "$digits32"; then
  tail -n 40 runs/main/digits32.log >&2
  echo "[main] the digits32 comparison failed; its log: runs/main/digits32.log" >&2
  exit 1
fi
trap - EXIT
cat runs/main/digits32/table.txt
