"""Benchmark of fastattnreg.refined_attention against the eager Refiner users run today.

Providers, at (B, H, N, D) with q, k, v and every conv / BatchNorm parameter requiring grad,
expansion 3, kernel 3 (Refiner's defaults), random upstream gradients for out:
  fastattnreg  refined_attention(..., backend="cpp"): the fused kernels; only P and Y = W_r F
               (B, H, N, N each) are kept between forward and backward                   CPU
  triton       refined_attention(..., backend="triton"): the fused Triton kernels         CUDA
  naive        refined_attention_ref: conv2d / batch_norm / relu6 on the (B, 3H, N, N) maps,
               every intermediate kept by autograd (the public Refiner code's way)

Two settings, each its own table and CSV op:
  refined_attention_train  BatchNorms in training mode (batch statistics, running statistics
                           updated); modes fwd+bwd and fwd (the forward under no_grad)
  refined_attention_eval   BatchNorms in eval mode (running statistics); mode fwd

Why an environment variable: the harness measures memory in a fresh subprocess that finds a
provider by name in this module's PROVIDERS, so the setting reaches that subprocess as
FASTATTNREG_BENCH_REFINER=train|eval (set by main() around each run, restored after).

By default the providers for --device run (fastattnreg and naive on the CPU, triton and naive
on CUDA). Run from the repo root: `python -m benchmarks.bench_refiner`; on a GPU e.g.
`python -m benchmarks.bench_refiner --device cuda --dtype bfloat16`.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch

from benchmarks import harness
from benchmarks.harness import Provider, Result, Shape, autograd_case
import fastattnreg

ENV_VAR = "FASTATTNREG_BENCH_REFINER"
SETTINGS = {"train": ("fwd+bwd", "fwd"), "eval": ("fwd",)}
DEFAULT_SHAPES = "32x6x197x64,64x3x65x64"  # ViT-S/16 at 224 px; 3 heads at 32 px / patch 4
DEFAULT_CSV = harness.REPO_ROOT / "benchmarks" / "results" / "refiner.csv"
EXPANSION, KERNEL_SIZE = 3, 3
# The speed and memory targets, training mode fwd+bwd: (numerator, denominator, what, limit).
TARGETS = (
    ("fastattnreg", "naive", "median_ms", 0.3),
    ("fastattnreg", "naive", "peak_extra_mb", 0.2),
)


def current_setting() -> str:
    setting = os.environ.get(ENV_VAR, "train")
    if setting not in SETTINGS:
        raise ValueError(f"{ENV_VAR} must be one of {tuple(SETTINGS)}; got {setting!r}")
    return setting


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    """q, k, v and the refiner's parameters (requiring grad), running statistics, dout."""
    B, H, N, D = shape
    C = EXPANSION * H
    dd = {"dtype": dtype, "device": device}
    q, k, v = (torch.randn(shape, **dd, requires_grad=True) for _ in range(3))
    convs = [torch.randn(C, H, 1, 1, **dd) * 0.5, torch.randn(C, 1, KERNEL_SIZE, KERNEL_SIZE, **dd) * 0.3,
             torch.randn(H, C, 1, 1, **dd) * 0.3]
    convs = [w.requires_grad_() for w in convs]
    sizes = (C, C, H, H)
    gammas = [torch.ones(c, **dd, requires_grad=True) for c in sizes]
    betas = [torch.zeros(c, **dd, requires_grad=True) for c in sizes]
    running = ([torch.zeros(c, **dd) for c in sizes], [torch.ones(c, **dd) for c in sizes])
    dout = torch.randn(shape, **dd)
    return (q, k, v), convs, gammas, betas, running, dout


def _make(fn_name: str, **kw):
    def make(shape, dtype, device):
        fn = getattr(fastattnreg, fn_name)
        training = current_setting() == "train"
        qkv, convs, gammas, betas, (rm, rv), dout = _inputs(shape, dtype, device)
        n_conv = len(convs)

        def call(q, k, v, *params):
            return fn(q, k, v, *params[:n_conv], params[n_conv:n_conv + 4], params[n_conv + 4:],
                      rm, rv, training=training, **kw)

        return autograd_case(call, (*qkv, *convs, *gammas, *betas), (dout,))

    return make


PROVIDERS = {p.name: p for p in (
    Provider("fastattnreg", _make("refined_attention", backend="cpp")),
    Provider("triton", _make("refined_attention", backend="triton")),
    Provider("naive", _make("refined_attention_ref")),
)}
# The providers each device runs by default.
DEVICE_PROVIDERS = {"cpu": "fastattnreg,naive", "cuda": "triton,naive"}


def print_targets(shape: Shape, results: Sequence[Result]) -> None:
    """The training fwd+bwd targets with the measured ratios; reported, never asserted."""
    if current_setting() != "train":
        return
    parts = harness.target_parts(TARGETS, results, digits=3)
    print(f"targets train {harness.format_shape(shape)} fwd+bwd: " + "; ".join(parts), flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_refiner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, default_shapes=DEFAULT_SHAPES, provider_names=list(PROVIDERS),
                            default_csv=DEFAULT_CSV)
    parser.add_argument("--settings", default="train,eval",
                        help="comma-separated subset of train,eval (default both)")
    parser.set_defaults(modes="")  # per setting (SETTINGS) unless --modes is given
    parser.set_defaults(providers=None)  # None: DEVICE_PROVIDERS of --device
    args = parser.parse_args(argv)
    if args.providers is None:
        args.providers = DEVICE_PROVIDERS.get(torch.device(args.device).type, "naive")
    modes_given = bool(args.modes)
    if not modes_given:
        args.modes = "fwd"
    try:
        opts = harness.resolve_common_args(args, list(PROVIDERS))
        settings = harness.parse_list(args.settings, list(SETTINGS), "settings")
    except ValueError as exc:
        parser.error(str(exc))
    if any(len(s) != 4 for s in opts["shapes"]):
        parser.error("refiner shapes are BxHxNxD (4 numbers)")
    providers = [PROVIDERS[name] for name in opts.pop("provider_names")]
    results = {}
    for setting in settings:
        if not modes_given:
            opts["modes"] = list(SETTINGS[setting])
        with harness.env_setting(ENV_VAR, setting):
            results[setting] = harness.run_benchmark(
                f"refined_attention_{setting}", providers, registry="benchmarks.bench_refiner",
                warmup_shape=harness.attention_warmup_shape, after_shape=print_targets, **opts)
    return results


if __name__ == "__main__":
    main()
