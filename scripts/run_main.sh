#!/usr/bin/env bash
# Sets everything up (see setup_env.sh) and runs the main job: three comparisons on the embedded
# digits with 5 seeds each (fastattnreg compare), each printing its table (95% intervals, paired
# differences to the reference row, each method's training epoch timed on the fused backend and
# on --backend reference) and writing runs/main/<benchmark>/ (metrics.json, results.csv,
# summary.csv, table.txt, accuracy.png, attention.png). Every method's settings come from
# scripts/tune.sh, on a validation split (docs/results.md).
# Each comparison trains its runs in two worker processes of one thread each (--workers 2, one
# per core of a 2-core machine; the same numbers as one process): the models are so small
# (batch 16 or 32 x 17 or 64 tokens x 64 channels) that a second thread per run costs more in
# synchronisation than it saves, and on a busy machine two spinning OpenMP threads made an epoch
# 10x slower.
# Each run is tested after every 5th epoch and after its last (--eval-every 5): evaluation never
# changes training, so the tables are those of testing after every epoch, and testing 450 images
# after each epoch took about a sixth of the job's CPU time (docs/results.md); accuracy.png and
# log.csv get fewer points.
# Extra arguments go to every `fastattnreg compare` (e.g. --resume after an interruption).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
mkdir -p runs/main
compare() {
  .venv/bin/python -m fastattnreg compare --seeds 0,1,2,3,4 --workers 2 --threads 1 \
    --eval-every 5 --overwrite "$@"
}
args=("$@")
# The 8x8 digits: the ViT classifies the mean of its patch tokens, on the fixed sin-cos
# embedding, as on digits32 (the preset itself keeps its class token, which GTA's class rows
# need in the transfer task below). Each method's rate (and link's weight and k) is its best
# on the validation split for this model (docs/results.md).
compare --methods baseline,structured,mimetic,refiner,link,link_advanced \
  --model-opt class_token=false --model-opt global_pool=avg --model-opt pos_embed=sincos \
  --method-opt baseline:lr=4e-3 --method-opt structured:lr=2e-3 \
  --method-opt mimetic:lr=1e-3 --method-opt refiner:lr=1e-3 \
  --method-opt link:lr=4e-3 --method-opt link_advanced:lr=4e-3 \
  --link-weight 0.03 --link-advanced-k 4 \
  --train-fraction 0.1 --data digits --out runs/main/digits "${args[@]}"
# Transfer (like for like): the task is digits 5-9 at 10%; the source of finetune and gta trains
# on every training image of digits 0-4 (it never sees the task's labels); gta's reference row
# is finetune, the others' the scratch baseline.
compare --methods baseline,finetune,gta --classes 5-9 \
  --train-fraction 0.1 --data digits --out runs/main/transfer "${args[@]}"
# digits32: each digit upscaled to 16x16 at a random place on a 32x32 canvas, 64 tokens of 4x4
# patches, classified from the mean of the patch tokens (the preset has no class token). 30% of
# the training split (404 images) and 30 epochs: at 20% the baseline stays near chance
# (docs/results.md). Batch 16 for every method and lr 1e-3 for structured (the others keep their
# defaults): the validation split's choices (scripts/tune.sh d32-batch, then d32).
compare --methods baseline,structured,refiner --train-fraction 0.3 --epochs 30 \
  --batch-size 16 --method-opt structured:lr=1e-3 \
  --data digits32 --out runs/main/digits32 "${args[@]}"
