#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: sets up as the README's commands do
# (scripts/setup_env.sh), runs the CUDA test group (every test with "cuda" in its name: the
# Triton kernels on the GPU against float64 references, opcheck, torch.compile), then the GPU
# benchmarks (attention with and without exported maps, with a key-padding mask and with dropout;
# attention_match; refined_attention) for ours against SDPA, FlashAttention where installed and
# naive eager PyTorch, in fp16, bf16 and fp32, with TFLOP/s and peak memory. Writes
# benchmarks/results/gpu-<device>.csv and prints its table. Sized for about 8 minutes on an H100
# (shapes, repeats and dtypes below).
# Without an NVIDIA GPU it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}  # the probe; tests point it at a missing file
if ! "$NVIDIA_SMI" -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU found ($NVIDIA_SMI -L fails); nothing to run"
  exit 0
fi

start=$(date +%s)
bash scripts/setup_env.sh
PY=.venv/bin/python
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: error: $NVIDIA_SMI sees a GPU but torch.cuda.is_available() is False" >&2
  exit 1
fi
device=$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
echo "[gpu_check] device $device"

export FASTATTNREG_REQUIRE_CPP=${FASTATTNREG_REQUIRE_CPP:-1}
echo "[gpu_check] CUDA test group"
"$PY" -m pytest -q -rs tests -k cuda

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
