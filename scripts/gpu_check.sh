#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: sets up (below), runs the CUDA test group (every
# test with "cuda" in its name: the Triton kernels on the GPU against float64 references,
# opcheck, torch.compile), then the GPU benchmarks (attention with and without exported maps,
# with a key-padding mask and with dropout; attention_match; refined_attention) for ours against
# SDPA, FlashAttention where installed and naive eager PyTorch, in fp16, bf16 and fp32, with
# TFLOP/s and peak memory. Writes benchmarks/results/gpu-<device>.csv and prints its table. Sized
# for about 8 minutes on an H100 (shapes, repeats and dtypes below). The benchmarks run even when
# a test fails; the script then exits with the tests' status.
# Without an NVIDIA GPU it says so in one line and exits 0.
#
# The Python it runs with, the first that applies:
#   1. GPU_CHECK_PYTHON, where set: that interpreter, with its own torch;
#   2. .venv, where it exists (the README's commands made it): refreshed by scripts/setup_env.sh;
#   3. the machine's python3, where its torch is a CUDA build that sees the GPU: GPU machines
#      made from a cloud image often carry such a PyTorch and may reach no package index, and
#      setup_env.sh (which installs torch==2.14.1) cannot run there;
#   4. otherwise a new .venv from scripts/setup_env.sh, as the README's commands make it.
# For 1 and 3 nothing is installed into that interpreter's environment: the C++ extension is
# built in place (setup.py build_ext --inplace, against that torch) and the checkout goes on
# PYTHONPATH. The tests then need pytest, timm, hypothesis, numpy and matplotlib there; the
# script names any that is missing before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}  # the probe; tests point it at a missing file
if ! "$NVIDIA_SMI" -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU found ($NVIDIA_SMI -L fails); nothing to run"
  exit 0
fi

start=$(date +%s)
sees_gpu() { "$1" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  PY=$GPU_CHECK_PYTHON
elif [ ! -x .venv/bin/python ] && command -v python3 >/dev/null && sees_gpu python3; then
  PY=$(command -v python3)
else
  bash scripts/setup_env.sh
  PY=.venv/bin/python
fi
if ! sees_gpu "$PY"; then
  echo "gpu_check: error: $NVIDIA_SMI sees a GPU but torch.cuda.is_available() is False in $PY" >&2
  exit 1
fi
if [ "$PY" != .venv/bin/python ]; then
  missing=$("$PY" -c "
import importlib.util
names = ('pytest', 'timm', 'hypothesis', 'numpy', 'matplotlib', 'setuptools', 'ninja')
print(' '.join(n for n in names if importlib.util.find_spec(n) is None))")
  if [ -n "$missing" ]; then
    echo "gpu_check: error: $PY lacks $missing (the tests and the build need them)" >&2
    exit 1
  fi
  echo "[gpu_check] building the C++ extension in place for $PY"
  "$PY" setup.py -q build_ext --inplace
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch, triton; print('[gpu_check] torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda)"
device=$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
echo "[gpu_check] device $device"

export FASTATTNREG_REQUIRE_CPP=${FASTATTNREG_REQUIRE_CPP:-1}
# The test group compiles several hundred Triton kernel variants: pytest-xdist workers, where
# it is installed, compile them in parallel (up to 8, one per two cores).
workers=()
if "$PY" -c "import xdist" 2>/dev/null; then
  n=$(( $(nproc) / 2 )); [ "$n" -gt 8 ] && n=8
  [ "$n" -ge 2 ] && workers=(-n "$n")
fi
echo "[gpu_check] CUDA test group"
tests_rc=0
"$PY" -m pytest -q -rs "${workers[@]}" tests -k cuda || tests_rc=$?

runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
common=(--device cuda --repeats 10 --warmup 3)
for dtype in float16 bfloat16 float32; do
  # FlashAttention takes fp16 / bf16 only.
  attn_providers=triton,triton_head_mean,naive,sdpa,triton_keypad,sdpa_keypad,triton_drop,sdpa_drop
  if [ "$dtype" != float32 ] && "$PY" -c "import flash_attn" 2>/dev/null; then
    attn_providers="$attn_providers,flash_attn"
  fi
  echo "[gpu_check] benchmarks $dtype"
  "$PY" -m benchmarks.bench_attention "${common[@]}" --dtype "$dtype" \
    --shapes 32x6x197x64,8x12x577x64 --providers "$attn_providers" --csv "$runs/attention.csv"
  "$PY" -m benchmarks.bench_match "${common[@]}" --dtype "$dtype" --shapes 32x6x197x64 \
    --kinds kl --providers triton,naive --csv "$runs/match.csv"
  "$PY" -m benchmarks.bench_refiner "${common[@]}" --dtype "$dtype" --shapes 32x6x197x64 \
    --settings train --providers triton,naive --csv "$runs/refiner.csv"
done

"$PY" -m benchmarks.gpu_table --out "benchmarks/results/gpu-$device.csv" \
  "$runs/attention.csv" "$runs/match.csv" "$runs/refiner.csv"
echo "[gpu_check] done in $(( $(date +%s) - start )) s"
if [ "$tests_rc" -ne 0 ]; then
  echo "gpu_check: the CUDA test group failed (pytest exit status $tests_rc); see its log above" >&2
  exit "$tests_rc"
fi
