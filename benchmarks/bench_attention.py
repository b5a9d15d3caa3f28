"""Benchmark of fastattnreg.attention against the two things users run today.

Providers, all at (B, H, N, D) with q, k, v requiring grad and random upstream gradients:
  fastattnreg            fused C++ kernel, no maps                 (compare with sdpa)
  fastattnreg_head_mean  fused C++ kernel + head-mean maps (B,N,N) (compare with naive)
  naive                  eager PyTorch keeping the maps, the way ViT regulariser code does it
  sdpa                   torch's scaled_dot_product_attention, no maps: the speed ceiling

Run from the repo root: `python -m benchmarks.bench_attention` (the project's main job).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import Provider, Result, Shape, autograd_case

OP = "attention"
DEFAULT_SHAPES = "32x6x197x64,64x3x65x64"  # ViT-S/16 at 224 px; a small ViT at 65 tokens
DEFAULT_CSV = harness.REPO_ROOT / "benchmarks" / "results" / "attention.csv"
# Targets from the project's goals, checked on fwd+bwd: (numerator, denominator, what, limit).
TARGETS = (
    ("fastattnreg", "sdpa", "median_ms", 0.8),
    ("fastattnreg_head_mean", "naive", "median_ms", 0.8),
    ("fastattnreg", "sdpa", "peak_extra_mb", 1.1),
)


def _qkv(shape: Shape, dtype: torch.dtype, device: torch.device):
    """Three leaf tensors q, k, v of `shape` that require grad."""
    return tuple(torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
                 for _ in range(3))


def _maps_grad(shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random upstream gradient for head-mean maps, (B, N, N)."""
    B, _, N, _ = shape
    return torch.randn((B, N, N), dtype=dtype, device=device)


def naive_attention(q, k, v):
    """Eager attention that keeps the maps, as users write it today (timm + a map loss)."""
    scale = q.shape[-1] ** -0.5
    probs = (q * scale @ k.transpose(-2, -1)).softmax(-1)
    return probs @ v, probs.mean(1)


def make_fastattnreg(shape, dtype, device):
    import fastattnreg  # imported late: a rebuild elsewhere should not break importing this file

    q, k, v = _qkv(shape, dtype, device)
    dout = torch.randn(shape, dtype=dtype, device=device)
    return autograd_case(lambda q, k, v: fastattnreg.attention(q, k, v, backend="cpp"),
                         (q, k, v), (dout,))


def make_fastattnreg_head_mean(shape, dtype, device):
    import fastattnreg

    q, k, v = _qkv(shape, dtype, device)
    dout = torch.randn(shape, dtype=dtype, device=device)
    dmaps = _maps_grad(shape, dtype, device)
    return autograd_case(
        lambda q, k, v: fastattnreg.attention(q, k, v, export="head_mean", backend="cpp"),
        (q, k, v), (dout, dmaps))


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
    Provider("naive", make_naive),
    Provider("sdpa", make_sdpa),
)}


def memory_warmup_shape(shape: Shape) -> Shape:
    """Small shape for the memory subprocess's warm-up: same heads and head dim (same kernel
    paths), one image, few tokens."""
    B, H, N, D = shape
    return (1, H, min(N, 17), D)


def print_targets(shape: Shape, results: Sequence[Result]) -> None:
    """One line with the project's fwd+bwd targets: measured ratio and whether it holds."""
    by_name = {r.provider: r for r in results if r.mode == "fwd+bwd"}
    parts = []
    for num, den, field, limit in TARGETS:
        a, b = by_name.get(num), by_name.get(den)
        x = getattr(a, field) if a else None
        y = getattr(b, field) if b else None
        if x is None or y is None or y == 0:
            continue
        what = "time" if field == "median_ms" else "peak memory"
        ratio = x / y
        parts.append(f"{num}/{den} {what} {ratio:.2f} (target <= {limit}: "
                     f"{'met' if ratio <= limit else 'NOT met'})")
    if parts:
        print(f"targets {harness.format_shape(shape)} fwd+bwd: " + "; ".join(parts), flush=True)


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
    args = parser.parse_args(argv)
    try:
        opts = harness.resolve_common_args(args, list(PROVIDERS))
        shapes = [_check_shape(s) for s in opts.pop("shapes")]
    except ValueError as exc:
        parser.error(str(exc))
    providers = [PROVIDERS[name] for name in opts.pop("provider_names")]
    return harness.run_benchmark(OP, providers, shapes, registry="benchmarks.bench_attention",
                                 warmup_shape=memory_warmup_shape, after_shape=print_targets,
                                 **opts)


if __name__ == "__main__":
    main()
