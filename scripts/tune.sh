#!/usr/bin/env bash
# The tuning budget of the main job (docs/results.md, "How the defaults were chosen"): every
# method gets 4 values of its one main hyper-parameter, 2 seeds each, trained on 70% of the
# main job's training subset and scored on the other 30% (--val-fraction 0.3: the test split is
# never read). Stage 1 tunes the learning rate of the methods that have no weight of their own;
# stage 2 tunes the regularisers' weights at the learning rate the code's defaults give them,
# so run it after the stage-1 choices are the defaults; stage 3 tunes link_advanced's k, whose
# first run is a link run, at link's chosen weight. Each setting writes
# runs/tune/<benchmark>/<method>/<flag>=<value>/summary.csv; scripts/tune_table.py reads them.
# Stage d32-batch tunes the batch size of the main job's digits32 methods (baseline,
# structured, refiner) on its setting (--data digits32 --train-fraction 0.3 --epochs 30) at
# their default rates (8, 16, 32: more and smaller steps in the same 30 epochs); stage d32 then
# tunes their learning rate at batch 16, the batch size d32-batch chose for all three. Both run
# two settings at a time, one per core; neither is part of `all`.
# Stage pooled spends the 8x8 budget on the model the main job's 8x8 comparison trains, the
# mean of the patch tokens on the fixed sin-cos embedding: the rates of baseline, structured,
# mimetic and refiner, then link's weight and link_advanced's k at the baseline's chosen rate,
# 4e-3 (runs/tune/digits-pooled/); two settings at a time; not part of `all`.
# Usage: bash scripts/tune.sh [1|2|3|all|d32|d32-batch|pooled] [extra compare arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
stage=${1:-all}
shift || true
common=(--seeds 0,1 --train-fraction 0.1 --val-fraction 0.3 --data digits --threads 1
        --time-epochs 0 --no-progress --overwrite)

tune() {  # benchmark, method, flag, values...
  local bench=$1 method=$2 flag=$3
  shift 3
  local task=()  # after the common arguments: these override them
  [ "$bench" = transfer ] && task=(--classes 5-9)
  [ "$bench" = digits32 ] && task=(--data digits32 --train-fraction 0.3 --epochs 30)
  [ "$bench" = digits-pooled ] && task=(--model-opt class_token=false
    --model-opt global_pool=avg --model-opt pos_embed=sincos)
  for value in "$@"; do
    "$PY" -m fastattnreg compare --methods "$method" "$flag" "$value" "${common[@]}" \
      "${task[@]}" --out "runs/tune/$bench/$method/${flag#--}=$value" "${extra[@]}"
  done
}

extra=("$@")
lrs=(5e-4 1e-3 2e-3 4e-3)
if [ "$stage" = 1 ] || [ "$stage" = all ]; then
  for method in baseline structured mimetic refiner; do tune digits "$method" --lr "${lrs[@]}"; done
  tune transfer baseline --lr "${lrs[@]}"
  tune transfer finetune --lr 2.5e-4 5e-4 1e-3 2e-3
fi
if [ "$stage" = 2 ] || [ "$stage" = all ]; then
  tune transfer gta --gta-weight 0.001 0.01 0.1 1.0
  tune digits link --link-weight 0.03 0.1 0.3 1.0
fi
if [ "$stage" = 3 ] || [ "$stage" = all ]; then
  tune digits link_advanced --link-advanced-k 1 2 4 8
fi
# The digits32 stages run two settings at a time (one thread each); `wait -n` fails the stage
# when a run fails.
running=0
start() {  # tune's arguments, one value: in the background, at most two at a time
  if [ "$running" -ge 2 ]; then wait -n; running=$((running - 1)); fi
  tune "$@" > /dev/null &
  running=$((running + 1))
}
finish() { while [ "$running" -gt 0 ]; do wait -n; running=$((running - 1)); done; }
if [ "$stage" = d32 ]; then
  extra=(--batch-size 16 "${extra[@]}")  # an extra --batch-size given to the script wins
  for method in baseline structured refiner; do
    for lr in "${lrs[@]}"; do start digits32 "$method" --lr "$lr"; done
  done
  finish
fi
if [ "$stage" = pooled ]; then
  for method in baseline structured mimetic refiner; do
    for lr in "${lrs[@]}"; do start digits-pooled "$method" --lr "$lr"; done
  done
  finish
  extra=(--lr 4e-3 "${extra[@]}")  # the links train at the baseline's chosen rate
  for weight in 0.03 0.1 0.3 1.0; do start digits-pooled link --link-weight "$weight"; done
  finish
  extra=(--link-weight 0.03 "${extra[@]}")  # link's chosen weight
  for k in 1 2 4 8; do start digits-pooled link_advanced --link-advanced-k "$k"; done
  finish
fi
if [ "$stage" = d32-batch ]; then
  for method in baseline structured refiner; do
    for batch in 8 16 32; do start digits32 "$method" --batch-size "$batch"; done
  done
  finish
fi
