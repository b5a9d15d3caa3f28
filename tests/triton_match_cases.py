"""attention_match(backend="triton") on CPU tensors under Triton's interpreter.

Not collected by a plain `pytest` run: TRITON_INTERPRET=1 must be set before Triton defines the
kernels, so tests/test_triton_match.py runs this file in its own process. By hand
(-k interp_<group>: one group):
    TRITON_INTERPRET=1 python -m pytest -q tests/triton_match_cases.py
float32 kernels against attention_match_ref in float64 on small awkward shapes (N in {2, 17, 65,
130}: one, partial and several 64-wide tiles; student and teacher head dims 16..80 that differ).
"""
import itertools
import os

import pytest
import torch

import fastattnreg
from fastattnreg import attention_match, attention_match_ref
from fastattnreg.ops.checks import MATCH_KINDS, MATCH_ROWS
from conftest import FP32_TOL, max_err
from inputs import match_inputs

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not fastattnreg.triton_available(),
    reason="needs TRITON_INTERPRET=1 set before the import and Triton installed",
)

# (B, H, N, D, teacher D)
SHAPES = ((1, 1, 2, 16, 16), (2, 3, 17, 48, 16), (1, 2, 65, 64, 80), (1, 1, 130, 80, 48))


def _run(fn, q, k, v, tq, tk, dout, dloss, **kw):
    """(out, loss, (dq, dk, dv)) with upstream gradients dout on out and dloss on the loss."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, loss = fn(q, k, v, tq, tk, **kw)
    grads = torch.autograd.grad((out, loss), (q, k, v), (dout.to(out.dtype), dloss.to(loss.dtype)))
    return out, loss, grads


def _triton(*args, **kw):
    return attention_match(*args, backend="triton", **kw)


# ------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_interp_values_float32_against_float64(shape, kind, rows):
    case64 = match_inputs(shape, rng=0)
    dout, dloss = torch.randn(case64[0].shape, dtype=torch.float64), torch.tensor(1.3)
    ref = _run(attention_match_ref, *case64, dout, dloss, kind=kind, rows=rows)
    got = _run(_triton, *(t.float() for t in case64), dout, dloss, kind=kind, rows=rows)
    assert got[1].dtype == torch.float32
    # The MSE of logits sums N squared differences per row: compared relative to its size.
    assert max_err(got[1], ref[1]) <= FP32_TOL * max(1.0, abs(ref[1].item())), "loss"
    assert max_err(got[0], ref[0]) <= FP32_TOL, "out"
    for name, g, r in zip(("dq", "dk", "dv"), got[2], ref[2]):
        assert max_err(g, r) <= FP32_TOL * max(1.0, r.abs().max().item()), name


@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
@pytest.mark.parametrize("used", ["out", "loss"])
def test_interp_values_gradient_through_one_output(kind, rows, used):
    """Only one output carries a gradient; the other arrives as None and is skipped."""
    case64 = match_inputs((2, 2, 65, 32, 16), rng=1)
    q, k, v = (t.float().requires_grad_() for t in case64[:3])
    out, loss = _triton(q, k, v, case64[3].float(), case64[4].float(), kind=kind, rows=rows)
    q64, k64, v64 = (t.requires_grad_() for t in case64[:3])
    ref = attention_match_ref(q64, k64, v64, *case64[3:], kind=kind, rows=rows)
    t, r = (out, ref[0]) if used == "out" else (loss, ref[1])
    g = torch.randn(r.shape, dtype=torch.float64)
    got = torch.autograd.grad(t, (q, k, v), g.float())
    want = torch.autograd.grad(r, (q64, k64, v64), g, allow_unused=True)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        b = torch.zeros_like(a) if b is None else b
        assert max_err(a, b) <= FP32_TOL * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_interp_values_teacher_copy_gives_exactly_zero(kind, rows, dtype):
    """The teacher's logits and LSE come from the same instructions as the student's."""
    q, k, v, _, _ = (t.to(dtype).requires_grad_() for t in match_inputs((1, 2, 65, 48, 48), rng=2))
    out, loss = _triton(q, k, v, q.detach().clone(), k.detach().clone(), kind=kind, rows=rows)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (q, k, v), allow_unused=True):
        assert g is None or g.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,rows", [("kl", "all"), ("mse_logits", "cls"), ("mse_probs", "all")])
def test_interp_values_low_precision_rule(kind, rows, dtype):
    """FlashAttention's rule: error (vs float64) at most 2x the reference's own in that dtype,
    plus a small floor for outputs that are near zero. bf16 dots run in fp32 in the interpreter
    (its bf16 dot is wrong) on bf16 operands, as on the GPU."""
    case64 = match_inputs((2, 2, 65, 32, 48), rng=3)
    dout, dloss = torch.randn(case64[0].shape, dtype=torch.float64), torch.tensor(0.7)
    ref = _run(attention_match_ref, *case64, dout, dloss, kind=kind, rows=rows)
    low = [t.to(dtype) for t in case64]
    ref_low = _run(attention_match_ref, *low, dout, dloss, kind=kind, rows=rows)
    got = _run(_triton, *low, dout, dloss, kind=kind, rows=rows)
    pairs = [("out", got[0], ref_low[0], ref[0]), ("loss", got[1], ref_low[1], ref[1])]
    pairs += [(n, a, b, c) for n, a, b, c in zip(("dq", "dk", "dv"), got[2], ref_low[2], ref[2])]
    for name, a, b, c in pairs:
        floor = 1e-3 * max(1.0, c.abs().max().item())
        assert max_err(a, c) <= 2 * max_err(b, c) + floor, name


def test_interp_values_noncontiguous_inputs_read_in_place():
    """q, k, v as timm makes them (permuted views of one projection)."""
    B, N, H, D = 2, 17, 3, 32
    q, k, v = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    tq, tk = torch.randn(B, N, 2, H, 16).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and not tq.is_contiguous()
    got = _triton(q, k, v, tq, tk, kind="kl", rows="all", scale=0.3, teacher_scale=0.2)
    dense = _triton(*(t.contiguous() for t in (q, k, v, tq, tk)), kind="kl", rows="all",
                    scale=0.3, teacher_scale=0.2)
    want = attention_match_ref(*(t.double() for t in (q, k, v, tq, tk)), kind="kl", rows="all",
                               scale=0.3, teacher_scale=0.2)
    for a, b, c in zip(got, dense, want):
        assert torch.equal(a, b) and max_err(a, c) <= FP32_TOL


# ------------------------------------------------------------------------------------ reruns


@pytest.mark.parametrize("kind,rows", [("kl", "all"), ("mse_probs", "cls"), ("mse_logits", "all")])
def test_interp_reruns_are_bitwise_equal(kind, rows):
    case = [t.float() for t in match_inputs((1, 2, 130, 48, 16), rng=4)]
    dout = torch.randn(case[0].shape)
    first, second = (_run(_triton, *case, dout, torch.tensor(1.0), kind=kind, rows=rows)
                     for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ errors


def _f32(shape=(1, 2, 17, 16, 16)):
    return [t.float() for t in match_inputs(shape, rng=0)]


@pytest.mark.parametrize(
    "make,kw,match",
    [
        (lambda: _f32((1, 2, 17, 16, 8)), {},
         r"head dim D must be in \[16, 128\] for backend 'triton'; got 8"),
        (lambda: _f32()[:3] + [t[:, :, :9] for t in _f32()[3:]], {},
         r"teacher_q must match the student's \(B, H, N\) = \(1, 2, 17\); got \(1, 2, 9\)"),
        (lambda: _f32()[:3] + [t.half() for t in _f32()[3:]], {},
         r"teacher_q must have the student's dtype and device"),
        (lambda: _f32((1, 2, 1, 16, 16)), {"rows": "cls"}, r"rows='cls' .*needs N >= 2; got N = 1"),
        (lambda: [t.double() for t in _f32()], {},
         r"q dtype must be one of .*for backend 'triton'; got torch.float64"),
    ],
)
def test_interp_errors_bad_inputs(make, kw, match):
    with pytest.raises(ValueError, match=match):
        _triton(*make(), **kw)


def test_interp_errors_raw_ops():
    """torch.ops.fastattnreg.triton_attention_match_* skip attention_match()'s checks."""
    q, k, v, tq, tk = _f32()
    fwd = torch.ops.fastattnreg.triton_attention_match_fwd
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'l2'"):
        fwd(q, k, v, tq, tk, None, 0.25, 0.25, "l2", "all")
    with pytest.raises(ValueError, match=r"rows must be one of .*got 'first'"):
        fwd(q, k, v, tq, tk, None, 0.25, 0.25, "kl", "first")
    with pytest.raises(ValueError, match=r"scale must be a finite number; got nan"):
        fwd(q, k, v, tq, tk, None, 0.25, float("nan"), "kl", "all")
    out, lse, trow, row_loss, srow = fwd(q, k, v, tq, tk, None, 0.25, 0.25, "kl", "cls")
    bwd = torch.ops.fastattnreg.triton_attention_match_bwd
    with pytest.raises(ValueError, match=r"drow_loss must have shape \(1, 2, 1\); got \(1, 2\)"):
        bwd(None, None, row_loss[..., 0], q, k, v, out, lse, tq, tk, trow, srow, None, 0.25,
            0.25, "kl", "cls")
    with pytest.raises(ValueError, match=r"teacher_row_lse must have shape \(1, 2, 1\)"):
        bwd(out, None, None, q, k, v, out, lse, tq, tk, lse, srow, None, 0.25, 0.25, "kl", "cls")


# ------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("kind,rows", [("kl", "all"), ("mse_probs", "cls"), ("mse_logits", "all")])
def test_interp_registration_opcheck(kind, rows):
    q, k, v, tq, tk = _f32((1, 2, 17, 16, 32))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fwd = torch.ops.fastattnreg.triton_attention_match_fwd
    torch.library.opcheck(fwd.default, (q, k, v, tq, tk, None, 0.25, 0.2, kind, rows))
    out, lse, trow, row_loss, srow = fwd(q.detach(), k.detach(), v.detach(), tq, tk, None, 0.25,
                                         0.2, kind, rows)
    args = (torch.randn_like(out), torch.randn_like(lse), torch.randn_like(row_loss), q.detach(),
            k.detach(), v.detach(), out, lse, tq, tk, trow, srow, None, 0.25, 0.2, kind, rows)
    torch.library.opcheck(torch.ops.fastattnreg.triton_attention_match_bwd.default, args)


@pytest.mark.parametrize("kind,rows", [("kl", "all"), ("mse_logits", "cls")])
def test_interp_registration_compile_fullgraph(kind, rows):
    torch._dynamo.reset()
    case64 = match_inputs((2, 2, 17, 16, 32), rng=5)

    def objective(fn, q, k, v, tq, tk):
        out, loss = fn(q, k, v, tq, tk, kind=kind, rows=rows)
        return (out.double() ** 2).sum() + loss.double()

    compiled = torch.compile(lambda *a: objective(_triton, *a), fullgraph=True,
                             backend="aot_eager")
    q, k, v = (t.float().requires_grad_() for t in case64[:3])
    value = compiled(q, k, v, case64[3].float(), case64[4].float())
    grads = torch.autograd.grad(value, (q, k, v))
    q64, k64, v64 = (t.requires_grad_() for t in case64[:3])
    ref = objective(attention_match_ref, q64, k64, v64, *case64[3:])
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64))
    assert abs(value.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) <= 1e-3 * max(1.0, r.abs().max().item())
