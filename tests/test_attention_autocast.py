"""torch.autocast: the fused ops run in autocast's lower precision, as SDPA does.

A dispatch spy records the dtypes each fastattnreg op receives. Accuracy follows the rule of the
bfloat16 tests: error against float64 at most twice that of the reference run in bfloat16.
refined_attention casts in its wrapper and must leave the BatchNorm running statistics float32
and updated.
"""
import pytest
import torch

from fastattnreg import (attention, attention_match, attention_match_ref, attention_ref,
                         refined_attention)
from conftest import OpDtypes, max_err, requires_cpp
from inputs import qkv, refiner_inputs
from refiner_checks import call, clone_running

pytestmark = requires_cpp

BF16 = torch.bfloat16


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def outputs_and_grads(fn, inputs, upstream):
    """fn(*inputs) -> tuple of outputs; their float64 dot with `upstream` is differentiated."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    return outs, torch.autograd.grad(loss, inputs)


def assert_within_twice_the_reference(got, ref, truth, floor=1e-5):
    for g, r, t in zip(got, ref, truth):
        assert max_err(g, t) <= 2 * max_err(r, t) + floor * max(1.0, t.abs().max().item())


def qkv64(B=2, H=2, N=65, D=48):
    torch.manual_seed(0)
    return qkv((B, H, N, D), requires_grad=False)


# -------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("export", [None, "full", "cls"])
def test_attention_runs_in_bfloat16_under_autocast(export):
    q64, k64, v64 = qkv64()

    def fn(backend_fn):
        return lambda q, k, v: backend_fn(q, k, v, export=export)

    outs64 = fn(attention_ref)(q64, k64, v64)
    upstream = [torch.randn_like(t) for t in (outs64 if isinstance(outs64, tuple) else (outs64,))]
    truth, truth_grads = outputs_and_grads(fn(attention_ref), leaves(q64, k64, v64), upstream)
    ref, ref_grads = outputs_and_grads(fn(lambda *a, **kw: attention_ref(*a, upcast=False, **kw)),
                                       leaves(q64, k64, v64, dtype=BF16), upstream)
    inputs = leaves(q64, k64, v64, dtype=torch.float32)
    with torch.autocast("cpu", dtype=BF16), OpDtypes() as spy:
        outs, grads = outputs_and_grads(
            fn(lambda *a, **kw: attention(*a, backend="cpp", **kw)), inputs, upstream)
    assert spy.dtypes("attention_fwd", 0) == {BF16}
    assert spy.dtypes("attention_bwd", 1) == {BF16}  # the backward reads the cast q
    assert all(o.dtype == BF16 for o in outs)
    assert all(g.dtype == torch.float32 for g in grads)  # through the casts to the fp32 leaves
    assert_within_twice_the_reference(list(outs) + list(grads), list(ref) + list(ref_grads),
                                      list(truth) + list(truth_grads))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_float_mask_runs_in_the_autocast_dtype(backend):
    q64, k64, v64 = qkv64(N=17)
    bias64 = torch.randn(17, 17, dtype=torch.float64)
    upstream = [torch.randn(2, 2, 17, 48, dtype=torch.float64)]
    truth, truth_grads = outputs_and_grads(
        lambda q, k, v: attention_ref(q, k, v, attn_mask=bias64), leaves(q64, k64, v64), upstream)
    ref, ref_grads = outputs_and_grads(
        lambda q, k, v: attention_ref(q, k, v, attn_mask=bias64.to(BF16), upcast=False),
        leaves(q64, k64, v64, dtype=BF16), upstream)
    inputs = leaves(q64, k64, v64, dtype=torch.float32)
    with torch.autocast("cpu", dtype=BF16), OpDtypes() as spy:
        outs, grads = outputs_and_grads(
            lambda q, k, v: attention(q, k, v, attn_mask=bias64.float(), backend=backend),
            inputs, upstream)
    if backend == "cpp":
        assert spy.dtypes("attention_fwd", 0) == {BF16}
        assert spy.dtypes("attention_fwd", 3) == {BF16}  # the float mask is cast with q
    assert_within_twice_the_reference(list(outs) + list(grads), list(ref) + list(ref_grads),
                                      list(truth) + list(truth_grads))


def test_float16_autocast_runs_the_cpp_kernels_in_float32():
    q, k, v = leaves(*qkv64(N=17), dtype=torch.float32)
    want = attention(q, k, v, backend="cpp")
    with torch.autocast("cpu", dtype=torch.float16), OpDtypes() as spy:
        got = attention(q, k, v, backend="cpp")
    assert spy.dtypes("attention_fwd", 0) == {torch.float32}
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_float64_is_left_alone():
    q, k, v = qkv64(N=17)
    with torch.autocast("cpu", dtype=BF16), OpDtypes() as spy:
        out = attention(q, k, v, backend="cpp")
    assert spy.dtypes("attention_fwd", 0) == {torch.float64} and out.dtype == torch.float64


def test_attention_match_runs_in_bfloat16_under_autocast():
    """out and the gradients by the rule above; the loss against the float64 reference of the
    bf16-rounded inputs (test_match_bf16.py says why)."""
    q64, k64, v64 = qkv64(N=17)
    tq64, tk64 = qkv64(N=17, D=32)[:2]
    teacher = {}

    def fn(impl, **kw):
        return lambda q, k, v: impl(q, k, v, teacher["q"].to(q.dtype), teacher["k"].to(q.dtype),
                                    kind="kl", **kw)

    # autocast casts the float32 leaves: the bf16 reference gets the same rounding
    rounded = [t.float().to(BF16) for t in (q64, k64, v64, tq64, tk64)]
    upstream = [torch.randn(2, 2, 17, 48, dtype=torch.float64), torch.tensor(3.0).double()]
    teacher.update(q=tq64, k=tk64)
    truth, truth_grads = outputs_and_grads(fn(attention_match_ref), leaves(q64, k64, v64),
                                           upstream)
    teacher.update(q=rounded[3].double(), k=rounded[4].double())
    rounded_truth, _ = outputs_and_grads(fn(attention_match_ref),
                                         leaves(*rounded[:3], dtype=torch.float64), upstream)
    teacher.update(q=rounded[3], k=rounded[4])
    ref, ref_grads = outputs_and_grads(fn(attention_match_ref, upcast=False),
                                       leaves(*rounded[:3]), upstream)
    inputs = leaves(q64, k64, v64, dtype=torch.float32)
    teacher.update(q=tq64.float(), k=tk64.float())
    with torch.autocast("cpu", dtype=BF16), OpDtypes() as spy:
        outs, grads = outputs_and_grads(fn(attention_match, backend="cpp"), inputs, upstream)
    assert spy.dtypes("attention_match_fwd", 0) == {BF16}
    assert spy.dtypes("attention_match_fwd", 3) == {BF16}  # the teacher's q too
    assert outs[0].dtype == BF16 and outs[1].dtype == torch.float32
    assert_within_twice_the_reference([outs[0], *grads], [ref[0], *ref_grads],
                                      [truth[0], *truth_grads])
    assert_within_twice_the_reference([outs[1]], [ref[1]], [rounded_truth[1]])


# ------------------------------------------------------------------------ refined_attention


def _refiner_step(qkv, params, running, backend, dout):
    out = call(refined_attention, qkv, params, running, training=True, backend=backend)
    return out, torch.autograd.grad(out, (*qkv, *params), dout)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_refined_attention_under_autocast_keeps_running_stats_float32(backend):
    qkv, params, running = refiner_inputs(2, 2, 17, 16, 3, 3)
    dout = torch.randn(2, 2, 17, 16, dtype=torch.float64)
    truth_running = clone_running(running)
    truth = _refiner_step(qkv, params, truth_running, "reference", dout)
    qkv32 = leaves(*qkv, dtype=torch.float32)
    params32 = leaves(*params, dtype=torch.float32)
    running32 = ([t.float() for t in running[0]], [t.float() for t in running[1]])
    before = clone_running(running32)
    with torch.autocast("cpu", dtype=BF16), OpDtypes() as spy:
        out, grads = _refiner_step(qkv32, params32, running32, backend, dout.float())
    assert out.dtype == BF16 and all(g.dtype == torch.float32 for g in grads)
    if backend == "cpp":
        assert spy.dtypes("refined_attention_fwd", 0) == {BF16}
    for got, old, want in zip(running32[0] + running32[1], before[0] + before[1],
                              truth_running[0] + truth_running[1]):
        assert got.dtype == torch.float32 and not torch.equal(got, old)
        assert max_err(got, want) <= 1e-2 * max(1.0, want.abs().max().item())
    if backend == "cpp":  # against the reference backend under the same autocast region
        ref_running = ([t.clone() for t in before[0]], [t.clone() for t in before[1]])
        with torch.autocast("cpu", dtype=BF16):
            ref = _refiner_step(leaves(*qkv32), leaves(*params32), ref_running, "reference",
                                dout.float())
        assert_within_twice_the_reference([out, *grads], [ref[0], *ref[1]],
                                          [truth[0], *truth[1]], floor=1e-3)
