"""Checks of attention(backend="triton") against attention_ref, shared by the interpreter cases
(tests/triton_attention_cases.py, CPU tensors) and the CUDA group of test_triton_attention.py.

Every check runs out, maps (when exported) and the LSE, with a random upstream gradient on each,
and compares values and dq, dk, dv with attention_ref run in float64.
"""
from __future__ import annotations

import torch

from fastattnreg import attention, attention_ref
from conftest import max_err
from inputs import qkv_on

NAMES = ("out", "maps", "lse")


def triton_attention(*args, **kwargs):
    return attention(*args, backend="triton", **kwargs)


def outputs_and_grads(fn, q, k, v, export, upstream, **kwargs):
    """(outputs, (dq, dk, dv)): fn with export and LSE, backward from `upstream` (one per
    output)."""
    outs = list(fn(q, k, v, export=export, return_lse=True, **kwargs))
    grads = torch.autograd.grad(
        outs, (q, k, v), [g.to(device=o.device, dtype=o.dtype) for g, o in zip(upstream, outs)]
    )
    return outs, grads


def reference64(q, k, v, export, **kwargs):
    """float64 reference outputs and gradients, plus the upstream gradients used, for q, k, v."""
    q64, k64, v64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref = list(attention_ref(q64, k64, v64, export=export, return_lse=True, **kwargs))
    upstream = [torch.randn(o.shape, dtype=torch.float64) for o in ref]
    ref, ref_grads = outputs_and_grads(attention_ref, q64, k64, v64, export, upstream, **kwargs)
    return ref, ref_grads, upstream


def assert_compiled_matches_float64(fn, q, k, v, export, **compile_kwargs):
    """torch.compile(fullgraph=True) of fn (attention's signature) inside a loss, the sum of
    squares of out, the maps and the LSE: the loss and dq, dk, dv against attention_ref run
    eagerly in float64 on the same values."""
    torch._dynamo.reset()

    def loss_fn(f, q, k, v):
        return sum((r.double() ** 2).sum() for r in f(q, k, v, export=export, return_lse=True))

    compiled = torch.compile(lambda *a: loss_fn(fn, *a), fullgraph=True, **compile_kwargs)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = loss_fn(attention_ref, q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64))
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) <= 1e-3 * max(1.0, r.abs().max().item())


def named(outs, grads, export):
    names = [n for n in NAMES if export is not None or n != "maps"] + ["dq", "dk", "dv"]
    return dict(zip(names, list(outs) + list(grads)))


def errors_vs_float64(shape, export, device, dtype=torch.float32, **kwargs):
    """{name: max abs error} of the Triton outputs and gradients against float64 math.

    Also checks shapes and dtypes (maps in the input dtype, LSE float32)."""
    q, k, v = qkv_on(shape, dtype, device)
    ref, ref_grads, upstream = reference64(q, k, v, export, **kwargs)
    outs, grads = outputs_and_grads(triton_attention, q, k, v, export, upstream, **kwargs)
    got, want = named(outs, grads, export), named(ref, ref_grads, export)
    for name in got:
        assert got[name].shape == want[name].shape, name
        expected_dtype = torch.float32 if name == "lse" else dtype
        assert got[name].dtype == expected_dtype, (name, got[name].dtype)
        assert got[name].device.type == torch.device(device).type, name
    return {name: max_err(got[name].cpu(), want[name]) for name in got}


def low_precision_errors(shape, export, device, dtype):
    """{name: (triton error, error of attention_ref run in dtype)} against float64 math: the
    FlashAttention rule asks the first to be at most twice the second."""
    q, k, v = qkv_on(shape, dtype, device)
    ref, ref_grads, upstream = reference64(q, k, v, export)
    outs, grads = outputs_and_grads(triton_attention, q, k, v, export, upstream)

    def ref_in_dtype(*args, **kwargs):
        return attention_ref(*args, upcast=False, **kwargs)

    pt_outs, pt_grads = outputs_and_grads(ref_in_dtype, q, k, v, export, upstream)
    got, pt = named(outs, grads, export), named(pt_outs, pt_grads, export)
    want = named(ref, ref_grads, export)
    return {name: (max_err(got[name].cpu(), want[name]), max_err(pt[name].cpu(), want[name]))
            for name in got}


def assert_low_precision_rule(errors, floor=1e-5):
    # The floor only matters where both errors are zero (N = 1: out == v exactly).
    for name, (got, ref) in errors.items():
        assert got <= 2 * ref + floor, f"{name}: error {got:.3g} > 2 x reference error {ref:.3g}"


def run_all(q, k, v, export):
    """Outputs and gradients (upstream all ones) of one Triton call, for rerun comparisons."""
    outs = list(triton_attention(q, k, v, export=export, return_lse=True))
    return outs + list(torch.autograd.grad(outs, (q, k, v), [torch.ones_like(o) for o in outs]))
