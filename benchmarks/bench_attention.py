"""Benchmark of fastattnreg.attention against the two things users run today.

Providers, all at (B, H, N, D) with q, k, v requiring grad and random upstream gradients:
  fastattnreg            fused C++ kernel, no maps                 (compare with sdpa)   CPU
  fastattnreg_head_mean  fused C++ kernel + head-mean maps (B,N,N) (compare with naive)  CPU
  triton                 fused Triton kernels, no maps              (compare with sdpa)   CUDA
  triton_head_mean       fused Triton kernels + head-mean maps      (compare with naive)  CUDA
  flash_attn             FlashAttention-2 (flash_attn_func), no maps, when installed    CUDA
  naive                  eager PyTorch keeping the maps, the way ViT regulariser code does it
  sdpa                   torch's scaled_dot_product_attention, no maps: the speed ceiling
  *_keypad               the same with a bool key-padding mask (B, 1, 1, N): every odd batch
                         element pads its last N/4 keys (fastattnreg, triton, sdpa)
  *_drop                 the same with attention dropout p = 0.1 (fastattnreg, triton, sdpa)
  fastattnreg_float32    fastattnreg in float32 whatever --dtype: the baseline of a bf16 run
                         (asked for by name, with --providers)                                CPU
  fastattnreg_amx        fastattnreg with FASTATTNREG_SIMD=amx: the AMX kernels where the CPU
                         has AMX tiles (asked for by name; "fastattnreg" runs them too there)  CPU
  fastattnreg_avx512_bf16  fastattnreg with FASTATTNREG_SIMD=avx512_bf16: the bf16-operand
                         kernels where the CPU has them (asked for by name)                   CPU
By default only the providers for --device run; one asked for on the wrong device is skipped
with a note. Under each table: TFLOP/s per provider and mode, counting 4*B*H*N^2*D for the
forward and 2.5x that for the backward (the FlashAttention convention; maps not counted).

Run from the repo root: `python -m benchmarks.bench_attention` (the project's main job);
on a GPU e.g. `python -m benchmarks.bench_attention --device cuda --dtype bfloat16`.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Sequence

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Provider, Result, Shape, autograd_case
import fastattnreg

OP = "attention"
DEFAULT_SHAPES = "32x6x197x64,64x3x65x64"  # ViT-S/16 at 224 px; a small ViT at 65 tokens
DEFAULT_CSV = harness.REPO_ROOT / "benchmarks" / "results" / "attention.csv"
# Targets from the project's goals, checked on fwd+bwd: (numerator, denominator, what, limit).
TARGETS = (
    ("fastattnreg", "sdpa", "median_ms", 0.8),
    ("fastattnreg_head_mean", "naive", "median_ms", 0.8),
    ("fastattnreg", "sdpa", "peak_extra_mb", 1.1),
    ("fastattnreg_keypad", "fastattnreg", "median_ms", 1.1),
    ("fastattnreg_keypad", "sdpa_keypad", "median_ms", 0.8),
    ("fastattnreg_drop", "fastattnreg", "median_ms", 1.3),
    ("fastattnreg_drop", "sdpa_drop", "median_ms", 0.8),
)
# Added on bfloat16 runs: the CPU's bf16 kernels against our float32 ones and SDPA's bf16.
BF16_TARGETS = (
    ("fastattnreg", "fastattnreg_float32", "median_ms", 0.4),
    ("fastattnreg", "sdpa", "median_ms", 0.25),
)
DROPOUT_P = 0.1


def _qkv(shape: Shape, dtype: torch.dtype, device: torch.device):
    """Three leaf tensors q, k, v of `shape` that require grad."""
    return tuple(torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
                 for _ in range(3))


def _maps_grad(shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random upstream gradient for head-mean maps, (B, N, N)."""
    B, _, N, _ = shape
    return torch.randn((B, N, N), dtype=dtype, device=device)


def key_padding_mask(shape: Shape, device: torch.device) -> torch.Tensor:
    """(B, 1, 1, N) bool, True = takes part: odd batch elements pad their last N // 4 keys."""
    B, _, N, _ = shape
    mask = torch.ones((B, 1, 1, N), dtype=torch.bool, device=device)
    mask[1::2, ..., N - N // 4:] = False
    return mask


def naive_attention(q, k, v):
    """Eager attention that keeps the maps, as users write it today (timm + a map loss)."""
    scale = q.shape[-1] ** -0.5
    probs = (q * scale @ k.transpose(-2, -1)).softmax(-1)
    return probs @ v, probs.mean(1)


def _fused_case(backend, shape, dtype, device, **kwargs):
    q, k, v = _qkv(shape, dtype, device)
    dout = torch.randn(shape, dtype=dtype, device=device)
    return autograd_case(lambda q, k, v: fastattnreg.attention(q, k, v, backend=backend, **kwargs),
                         (q, k, v), (dout,))


def _head_mean_case(backend, shape, dtype, device):
    """attention with export="head_mean", its gradient arriving through the maps too."""
    q, k, v = _qkv(shape, dtype, device)
    dout = torch.randn(shape, dtype=dtype, device=device)
    dmaps = _maps_grad(shape, dtype, device)
    return autograd_case(
        lambda q, k, v: fastattnreg.attention(q, k, v, export="head_mean", backend=backend),
        (q, k, v), (dout, dmaps))


def make_fastattnreg(shape, dtype, device):
    return _fused_case("cpp", shape, dtype, device)


def make_fastattnreg_float32(shape, dtype, device):
    return make_fastattnreg(shape, torch.float32, device)


def _fastattnreg_with_simd(simd: str):
    """A provider factory: fastattnreg with FASTATTNREG_SIMD=simd around every call."""
    def make(shape, dtype, device):
        case = make_fastattnreg(shape, dtype, device)

        def forward():
            with harness.env_setting("FASTATTNREG_SIMD", simd):
                return case.forward()

        def backward(outputs):
            with harness.env_setting("FASTATTNREG_SIMD", simd):
                return case.backward(outputs)

        return harness.Case(forward, backward)
    return make


make_fastattnreg_amx = _fastattnreg_with_simd("amx")
make_fastattnreg_avx512_bf16 = _fastattnreg_with_simd("avx512_bf16")


def make_fastattnreg_head_mean(shape, dtype, device):
    return _head_mean_case("cpp", shape, dtype, device)


def make_fastattnreg_keypad(shape, dtype, device):
    return _fused_case("cpp", shape, dtype, device, attn_mask=key_padding_mask(shape, device))


def make_fastattnreg_drop(shape, dtype, device):
    return _fused_case("cpp", shape, dtype, device, dropout_p=DROPOUT_P)


def make_triton_keypad(shape, dtype, device):
    _require_cuda("triton_keypad", device)
    return _fused_case("triton", shape, dtype, device, attn_mask=key_padding_mask(shape, device))


def make_triton_drop(shape, dtype, device):
    _require_cuda("triton_drop", device)
    return _fused_case("triton", shape, dtype, device, dropout_p=DROPOUT_P)


def make_sdpa_keypad(shape, dtype, device):
    q, k, v = _qkv(shape, dtype, device)
    dout = torch.randn(shape, dtype=dtype, device=device)
    mask = key_padding_mask(shape, device)
    return autograd_case(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                         (q, k, v), (dout,))


def make_sdpa_drop(shape, dtype, device):
    q, k, v = _qkv(shape, dtype, device)
    dout = torch.randn(shape, dtype=dtype, device=device)
    return autograd_case(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=DROPOUT_P),
        (q, k, v), (dout,))


def _require_cuda(name: str, device: torch.device) -> None:
    if device.type != "cuda":
        raise RuntimeError(f"the {name} provider runs on CUDA only; got device {device}")


def make_triton(shape, dtype, device):
    _require_cuda("triton", device)
    return _fused_case("triton", shape, dtype, device)


def make_triton_head_mean(shape, dtype, device):
    _require_cuda("triton_head_mean", device)
    return _head_mean_case("triton", shape, dtype, device)


def make_flash_attn(shape, dtype, device):
    from flash_attn import flash_attn_func  # optional; fp16/bf16 on CUDA only

    _require_cuda("flash_attn", device)
    B, H, N, D = shape
    # flash_attn takes (B, N, H, D): allocate in its own layout, as a model using it would.
    q, k, v = _qkv((B, N, H, D), dtype, device)
    dout = torch.randn((B, N, H, D), dtype=dtype, device=device)
    return autograd_case(flash_attn_func, (q, k, v), (dout,))


def make_naive(shape, dtype, device):
    q, k, v = _qkv(shape, dtype, device)
    dout = torch.randn(shape, dtype=dtype, device=device)
    dmaps = _maps_grad(shape, dtype, device)
    return autograd_case(naive_attention, (q, k, v), (dout, dmaps))


def make_sdpa(shape, dtype, device):
    q, k, v = _qkv(shape, dtype, device)
    dout = torch.randn(shape, dtype=dtype, device=device)
    return autograd_case(F.scaled_dot_product_attention, (q, k, v), (dout,))


PROVIDERS = {p.name: p for p in (
    Provider("fastattnreg", make_fastattnreg),
    Provider("fastattnreg_head_mean", make_fastattnreg_head_mean),
    Provider("triton", make_triton),
    Provider("triton_head_mean", make_triton_head_mean),
    Provider("flash_attn", make_flash_attn),
    Provider("naive", make_naive),
    Provider("sdpa", make_sdpa),
    Provider("fastattnreg_keypad", make_fastattnreg_keypad),
    Provider("triton_keypad", make_triton_keypad),
    Provider("sdpa_keypad", make_sdpa_keypad),
    Provider("fastattnreg_drop", make_fastattnreg_drop),
    Provider("triton_drop", make_triton_drop),
    Provider("sdpa_drop", make_sdpa_drop),
    Provider("fastattnreg_float32", make_fastattnreg_float32),
    Provider("fastattnreg_amx", make_fastattnreg_amx),
    Provider("fastattnreg_avx512_bf16", make_fastattnreg_avx512_bf16),
)}
CPU_ONLY = ("fastattnreg", "fastattnreg_head_mean", "fastattnreg_keypad", "fastattnreg_drop")
CUDA_ONLY = ("triton", "triton_head_mean", "flash_attn", "triton_keypad", "triton_drop")
ASKED_FOR_BY_NAME = ("fastattnreg_float32", "fastattnreg_amx", "fastattnreg_avx512_bf16")
# The forward's FLOPs are 4*B*H*N^2*D (two GEMMs); the backward's 2.5x (five GEMMs, one of them
# recomputing S): the convention of FlashAttention's and Triton's benchmarks.
FLOPS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def default_providers(device: torch.device) -> list[str]:
    """The providers that run on `device` (flash_attn only where it is installed)."""
    if device.type == "cuda":
        names = [n for n in PROVIDERS if n not in CPU_ONLY + ASKED_FOR_BY_NAME]
        if importlib.util.find_spec("flash_attn") is None:
            names.remove("flash_attn")
        return names
    return [n for n in PROVIDERS if n not in CUDA_ONLY + ASKED_FOR_BY_NAME]


def print_targets(shape: Shape, results: Sequence[Result], dtype: torch.dtype) -> None:
    """One line with the project's fwd+bwd targets: measured ratio and whether it holds."""
    targets = TARGETS + (BF16_TARGETS if dtype == torch.bfloat16 else ())
    parts = harness.target_parts(targets, results)
    print(f"targets {harness.format_shape(shape)} fwd+bwd: " + "; ".join(parts), flush=True)


def print_tflops(shape: Shape, results: Sequence[Result]) -> None:
    """TFLOP/s per provider (rows) and mode (columns) from the median times."""
    B, H, N, D = shape
    fwd_flops = 4 * B * H * N * N * D
    by_name: dict[str, dict[str, float]] = {}
    for r in results:
        if r.median_ms > 0:
            tflops = fwd_flops * FLOPS_FACTOR[r.mode] / (r.median_ms * 1e-3) / 1e12
            by_name.setdefault(r.provider, {})[r.mode] = tflops
    if not by_name:
        return
    modes = [m for m in harness.MODES if any(m in v for v in by_name.values())]
    width = max(len(n) for n in (*by_name, "provider"))
    print(f"TFLOP/s {harness.format_shape(shape)} (fwd 4*B*H*N^2*D, bwd 2.5x):", flush=True)
    print("  " + "provider".ljust(width) + "".join(m.rjust(10) for m in modes))
    for name, values in by_name.items():
        cells = "".join((f"{values[m]:.3g}" if m in values else "-").rjust(10) for m in modes)
        print("  " + name.ljust(width) + cells, flush=True)


def after_shape(dtype: torch.dtype):
    """The lines printed under each shape's table: TFLOP/s, then the targets for `dtype`."""
    def after(shape: Shape, results: Sequence[Result]) -> None:
        print_tflops(shape, results)
        print_targets(shape, results, dtype)
    return after


def _check_shape(shape: Shape) -> Shape:
    if len(shape) != 4:
        raise ValueError(f"attention shapes are BxHxNxD (4 numbers); got {harness.format_shape(shape)}")
    return shape


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_attention",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, default_shapes=DEFAULT_SHAPES, provider_names=list(PROVIDERS),
                            default_csv=DEFAULT_CSV)
    parser.set_defaults(providers=None)  # None: the providers that run on --device
    args = parser.parse_args(argv)
    if args.providers is None:
        device = torch.device(args.device)
        args.providers = ",".join(default_providers(device))
        if device.type != "cuda":
            print(f"note: {', '.join(CUDA_ONLY)} run on CUDA only; not run on {device}",
                  flush=True)
        elif "flash_attn" not in args.providers:
            print("note: flash_attn is not installed; not run", flush=True)
    try:
        opts = harness.resolve_common_args(args, list(PROVIDERS))
        shapes = [_check_shape(s) for s in opts.pop("shapes")]
    except ValueError as exc:
        parser.error(str(exc))
    providers = [PROVIDERS[name] for name in opts.pop("provider_names")]
    return harness.run_benchmark(OP, providers, shapes, registry="benchmarks.bench_attention",
                                 warmup_shape=harness.attention_warmup_shape,
                                 after_shape=after_shape(opts["dtype"]), **opts)


if __name__ == "__main__":
    main()
