"""Benchmark of fastattnreg.attention_match against the eager map-matching users write today.

Providers, at (B, H, N, D) with q, k, v requiring grad, a teacher's q, k of the same shape (no
grad) and random upstream gradients for out plus 1 for the loss:
  fastattnreg  attention_match(..., backend="cpp"): the fused op, O(B*H*N) extra memory   CPU
  triton       attention_match(..., backend="triton"): the fused Triton kernels           CUDA
  fastattnreg_float32  the fused op in float32 whatever --dtype: the baseline of a bf16 run
               (asked for by name, with --providers)                                     CPU
  naive        eager: the student's logits and softmax maps (B, H, N, N) materialised, the
               teacher's under torch.no_grad, the loss in torch (KL via log_softmax, or the
               squared error of the scaled logits), mean over batch, heads and rows

One table per (kind, shape); the CSV `op` column is "attention_match_<kind>" (rows default
"all"; another --rows is appended, e.g. "attention_match_kl_cls").

Why an environment variable: the harness measures memory in a fresh subprocess that finds a
provider by name in this module's PROVIDERS, so the kind and rows reach that subprocess as
FASTATTNREG_BENCH_MATCH="<kind>,<rows>" (set by main() around each run, restored after).

By default the providers for --device run (fastattnreg and naive on the CPU, triton and naive
on CUDA). Run from the repo root: `python -m benchmarks.bench_match`; on a GPU e.g.
`python -m benchmarks.bench_match --device cuda --dtype bfloat16`.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch

from benchmarks import harness
from benchmarks.harness import Provider, Result, Shape, autograd_case
import fastattnreg

ENV_VAR = "FASTATTNREG_BENCH_MATCH"
KINDS = ("kl", "mse_logits", "mse_probs")
ROWS = ("all", "cls")
DEFAULT_KINDS = "kl,mse_logits"
DEFAULT_SHAPES = "32x6x197x64,8x12x577x64"  # ViT-S/16 at 224 px; ViT-B/16 at 384 px
DEFAULT_CSV = harness.REPO_ROOT / "benchmarks" / "results" / "match.csv"
# The speed and memory targets, on fwd+bwd: (numerator, denominator, what, limit).
TARGETS = (
    ("fastattnreg", "naive", "median_ms", 0.5),
    ("fastattnreg", "naive", "peak_extra_mb", 0.25),
)
# Added on bfloat16 runs: the CPU's bf16 kernels against our float32 ones.
BF16_TARGETS = (("fastattnreg", "fastattnreg_float32", "median_ms", 0.4),)


def current_setting() -> tuple[str, str]:
    """(kind, rows) of the run in progress, from FASTATTNREG_BENCH_MATCH (default kl, all)."""
    kind, _, rows = os.environ.get(ENV_VAR, "kl,all").partition(",")
    rows = rows or "all"
    if kind not in KINDS or rows not in ROWS:
        raise ValueError(f"{ENV_VAR} must be '<kind>,<rows>' with kind in {KINDS} and rows in "
                         f"{ROWS}; got {os.environ.get(ENV_VAR)!r}")
    return kind, rows


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device):
    """q, k, v (B, H, N, D) requiring grad; teacher q, k without; upstream grads (dout, 1)."""
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))
    # The teacher is a perturbed copy, as in fine-tuning: the divergence is small but not 0.
    tq = (q.detach() + 0.1 * torch.randn_like(q)).contiguous()
    tk = (k.detach() + 0.1 * torch.randn_like(k)).contiguous()
    dout = torch.randn(shape, dtype=dtype, device=device)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    dloss = torch.ones((), dtype=loss_dtype, device=device)
    return (q, k, v), (tq, tk), (dout, dloss)


def naive_match(q, k, v, tq, tk, kind: str, rows: str):
    """Eager attention + map loss, keeping every (B, H, N, N) intermediate autograd needs."""
    s_logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    out = s_logits.softmax(-1) @ v
    with torch.no_grad():  # the teacher gets no gradient
        t_logits = (tq @ tk.transpose(-2, -1)) * tq.shape[-1] ** -0.5
    if rows == "cls":  # query 0 over the patch keys 1..N-1
        s_logits, t_logits = s_logits[:, :, :1, 1:], t_logits[:, :, :1, 1:]
    if kind == "mse_logits":
        per_row = (s_logits - t_logits).square().sum(-1)  # (B, H, R)
    else:
        log_ps = s_logits.log_softmax(-1)
        with torch.no_grad():
            log_pt = t_logits.log_softmax(-1)
        if kind == "kl":
            per_row = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        else:
            per_row = (log_ps.exp() - log_pt.exp()).square().sum(-1)
    loss = per_row.mean()  # like attention_match: float32 (float64 for float64 inputs)
    return out, loss if loss.dtype == torch.float64 else loss.float()


def _make_fused(backend: str):
    def make(shape, dtype, device):
        kind, rows = current_setting()
        (q, k, v), (tq, tk), grads = _inputs(shape, dtype, device)
        return autograd_case(
            lambda q, k, v: fastattnreg.attention_match(q, k, v, tq, tk, kind=kind, rows=rows,
                                                        backend=backend),
            (q, k, v), grads)

    return make


def make_fastattnreg_float32(shape, dtype, device):
    return _make_fused("cpp")(shape, torch.float32, device)


def make_naive(shape, dtype, device):
    kind, rows = current_setting()
    (q, k, v), (tq, tk), grads = _inputs(shape, dtype, device)
    return autograd_case(lambda q, k, v: naive_match(q, k, v, tq, tk, kind, rows), (q, k, v),
                         grads)


PROVIDERS = {p.name: p for p in (
    Provider("fastattnreg", _make_fused("cpp")),
    Provider("triton", _make_fused("triton")),
    Provider("naive", make_naive),
    Provider("fastattnreg_float32", make_fastattnreg_float32),
)}
# The providers each device runs by default.
DEVICE_PROVIDERS = {"cpu": "fastattnreg,naive", "cuda": "triton,naive"}


def print_targets(dtype: torch.dtype):
    """The lines under each shape's table: the fwd+bwd targets for `dtype` with the measured
    ratios; reported, never asserted."""
    targets = TARGETS + (BF16_TARGETS if dtype == torch.bfloat16 else ())

    def after(shape: Shape, results: Sequence[Result]) -> None:
        kind, rows = current_setting()
        parts = harness.target_parts(targets, results)
        print(f"targets {kind} rows={rows} {harness.format_shape(shape)} fwd+bwd: "
              + "; ".join(parts), flush=True)
    return after


def _check_shape(shape: Shape) -> Shape:
    if len(shape) != 4:
        raise ValueError(f"match shapes are BxHxNxD (4 numbers); got {harness.format_shape(shape)}")
    return shape


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_match", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, default_shapes=DEFAULT_SHAPES, provider_names=list(PROVIDERS),
                            default_csv=DEFAULT_CSV)
    parser.add_argument("--kinds", default=DEFAULT_KINDS,
                        help=f"comma-separated subset of {','.join(KINDS)} (default {DEFAULT_KINDS})")
    parser.add_argument("--rows", default="all", choices=ROWS, help="matched rows (default all)")
    parser.set_defaults(providers=None)  # None: DEVICE_PROVIDERS of --device
    args = parser.parse_args(argv)
    if args.providers is None:
        args.providers = DEVICE_PROVIDERS.get(torch.device(args.device).type, "naive")
    try:
        opts = harness.resolve_common_args(args, list(PROVIDERS))
        shapes = [_check_shape(s) for s in opts.pop("shapes")]
        kinds = harness.parse_list(args.kinds, KINDS, "kinds")
    except ValueError as exc:
        parser.error(str(exc))
    if args.rows == "cls" and any(s[2] < 2 for s in shapes):
        parser.error("--rows cls needs N >= 2 in every shape")
    providers = [PROVIDERS[name] for name in opts.pop("provider_names")]
    results = {}
    for kind in kinds:
        op = f"attention_match_{kind}" + ("" if args.rows == "all" else f"_{args.rows}")
        with harness.env_setting(ENV_VAR, f"{kind},{args.rows}"):
            results[kind] = harness.run_benchmark(
                op, providers, shapes, registry="benchmarks.bench_match",
                warmup_shape=harness.attention_warmup_shape,
                after_shape=print_targets(opts["dtype"]), **opts)
    return results


if __name__ == "__main__":
    main()
