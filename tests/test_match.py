"""attention_match() against attention_match_ref: loss, out and every gradient, every kind x rows."""
import itertools

import pytest
import torch

from fastattnreg import attention, attention_match, attention_match_ref
from fastattnreg.ops.checks import MATCH_KINDS, MATCH_ROWS
from conftest import max_err, requires_cpp
from inputs import match_inputs, qkv

# (B, H, N, D, teacher D): awkward ViT lengths, teacher head dims that differ from the student's
SHAPES = [(1, 1, 2, 16, 16), (2, 3, 17, 48, 16), (1, 2, 65, 64, 80), (2, 1, 197, 80, 64),
          (1, 2, 257, 16, 48)]


def _loss_and_grads(fn, q, k, v, tq, tk, dout, dloss, **kw):
    out, loss = fn(q, k, v, tq, tk, **kw)
    grads = torch.autograd.grad((out, loss), (q, k, v), (dout, dloss.to(loss.dtype)))
    return out, loss, grads


@requires_cpp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_with_all_gradients(shape, kind, rows, dtype):
    q, k, v, tq, tk = match_inputs(shape, dtype, requires_grad=True)
    dout, dloss = torch.randn_like(q), torch.tensor(1.3)
    kw = dict(kind=kind, rows=rows)
    ref = _loss_and_grads(attention_match_ref, q, k, v, tq, tk, dout, dloss, **kw)
    got = _loss_and_grads(lambda *a, **k2: attention_match(*a, backend="cpp", **k2),
                          q, k, v, tq, tk, dout, dloss, **kw)
    # float64 to 1e-12 relative; float32 to 1e-5 absolute on unit-scale inputs (the MSE of
    # logits sums N squared differences per row, so its loss is compared relative to its size).
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got[1].dtype == ref[1].dtype
    assert max_err(got[1], ref[1]) <= tol * max(1.0, abs(ref[1].item()))
    assert max_err(got[0], ref[0]) <= tol
    for g, r in zip(got[2], ref[2]):
        assert max_err(g, r) <= tol * max(1.0, r.abs().max().item())


@requires_cpp
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [65, 197])  # either side of the kernels' key-operand switch at 192
def test_teacher_copy_gives_exactly_zero_loss_and_gradient(kind, rows, dtype, n):
    q, k, v = qkv((2, 3, n, 48), dtype)
    out, loss = attention_match(q, k, v, q.detach().clone(), k.detach().clone(), kind=kind,
                                rows=rows, backend="cpp")
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (q, k)):
        assert g.abs().max().item() == 0.0


@requires_cpp
def test_teacher_gets_no_gradient_and_out_equals_attention():
    q, k, v, tq, tk = match_inputs((2, 2, 17, 16, 32), torch.float64, requires_grad=True)
    tq.requires_grad_(), tk.requires_grad_()
    out, loss = attention_match(q, k, v, tq, tk, backend="cpp")
    assert torch.equal(out, attention(q, k, v, backend="cpp"))
    loss.backward()
    assert tq.grad is None and tk.grad is None


@pytest.mark.slow
@requires_cpp
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_gradcheck_float64(kind, rows):
    q, k, v, tq, tk = match_inputs((1, 2, 6, 8, 4), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_match(q, k, v, tq, tk, kind=kind, rows=rows, backend="cpp"),
        (q, k, v),
    )


@pytest.mark.slow
@requires_cpp
@pytest.mark.parametrize("kind,rows", [("kl", "all"), ("mse_logits", "cls"), ("mse_probs", "all")])
def test_opcheck(kind, rows):
    q, k, v, tq, tk = match_inputs((2, 2, 17, 16, 8), torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastattnreg.attention_match_fwd.default,
                          (q, k, v, tq, tk, None, 0.25, 0.35, kind, rows))
    out, lse, tlse, row_loss = torch.ops.fastattnreg.attention_match_fwd(
        q.detach(), k.detach(), v.detach(), tq, tk, None, 0.25, 0.35, kind, rows)
    torch.library.opcheck(
        torch.ops.fastattnreg.attention_match_bwd.default,
        (torch.randn_like(out), torch.randn_like(lse), torch.randn_like(row_loss), q.detach(), k.detach(), v.detach(),
         out, lse, tq, tk, tlse, None, 0.25, 0.35, kind, rows))


@pytest.mark.slow
@requires_cpp
def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v, tq, tk = match_inputs((2, 2, 17, 16, 16), torch.float64, requires_grad=True)

    def step(q, k, v, tq, tk):
        out, loss = attention_match(q, k, v, tq, tk, kind="kl")
        return out.square().sum() + 3.0 * loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, tq, tk), (q, k, v))

    def ref_step(q, k, v, tq, tk):
        out, loss = attention_match_ref(q, k, v, tq, tk, kind="kl")
        return out.square().sum() + 3.0 * loss

    want = torch.autograd.grad(ref_step(q, k, v, tq, tk), (q, k, v))
    for g, w in zip(got, want):
        assert max_err(g, w) < 1e-10


@requires_cpp
@pytest.mark.parametrize("kind", MATCH_KINDS)
def test_reruns_are_bitwise_equal(kind):
    q, k, v, tq, tk = match_inputs((4, 6, 197, 64, 64), torch.float32, requires_grad=True)

    def run():
        out, loss = attention_match(q, k, v, tq, tk, kind=kind, backend="cpp")
        return [out, loss] + list(torch.autograd.grad((out, loss), (q, k, v),
                                                      (torch.ones_like(out), torch.tensor(1.0))))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_reference_backend_matches_the_reference():
    q, k, v, tq, tk = match_inputs((1, 2, 17, 16, 16), torch.float64, requires_grad=True)
    out, loss = attention_match(q, k, v, tq, tk, kind="mse_logits", rows="cls", backend="reference")
    ref_out, ref_loss = attention_match_ref(q, k, v, tq, tk, kind="mse_logits", rows="cls")
    assert torch.equal(out, ref_out) and torch.equal(loss, ref_loss)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(kind="js"), r"kind must be one of .*got 'js'"),
        (dict(rows="first"), r"rows must be one of .*got 'first'"),
        (dict(teacher_scale=float("inf")), r"teacher_scale must be None or a finite number"),
        (dict(tq=torch.randn(2, 2, 18, 16)), r"teacher_k must have the shape of teacher_q"),
        (dict(tq=torch.randn(2, 3, 17, 16), tk=torch.randn(2, 3, 17, 16)),
         r"teacher_q must match the student's \(B, H, N\) = \(2, 2, 17\); got \(2, 3, 17\)"),
        (dict(tq=torch.randn(2, 2, 17, 16).double(), tk=torch.randn(2, 2, 17, 16).double()),
         r"teacher_q must have the student's dtype and device"),
        (dict(tk=torch.randn(2, 2, 17)), r"teacher_k must be 4-D"),
    ],
)
def test_bad_input(backend, change, match):
    q, k, v, tq, tk = match_inputs((2, 2, 17, 16, 8), torch.float32)
    args = dict(tq=tq, tk=tk)
    kw = {}
    for key, val in change.items():
        (args if key in ("tq", "tk") else kw)[key] = val
    with pytest.raises(ValueError, match=match):
        attention_match(q, k, v, args["tq"], args["tk"], backend=backend, **kw)


def test_cls_rows_need_two_tokens():
    q = torch.randn(1, 1, 1, 8)
    with pytest.raises(ValueError, match=r"rows='cls' .* needs N >= 2; got N = 1"):
        attention_match(q, q, q, q, q, rows="cls")


@requires_cpp
def test_raw_op_checks_too():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"teacher_q tokens N must equal the student's 5"):
        torch.ops.fastattnreg.attention_match_fwd(q, q, q, torch.randn(1, 2, 6, 8),
                                                  torch.randn(1, 2, 6, 8), None, 0.3, 0.3, "kl",
                                                  "all")
    with pytest.raises(ValueError, match=r"kind must be one of 'kl', 'mse_probs', 'mse_logits'"):
        torch.ops.fastattnreg.attention_match_fwd(q, q, q, q, q, None, 0.3, 0.3, "l2", "all")
