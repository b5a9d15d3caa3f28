"""attention_match(attn_mask=..., backend="triton") on CPU tensors under Triton's interpreter.

Not collected by a plain `pytest` run: TRITON_INTERPRET=1 must be set before Triton defines the
kernels, so tests/test_triton_match.py runs this file in a child process
(tests/interpreter_runner.py); -k interp_<group> runs one group by hand:
  maskvalues  every mask of inputs.MATCH_MASK_KINDS x kind x rows, float32 against
              attention_match_ref in float64: out, loss, dq, dk, dv.
  maskzero    fully masked rows (out 0, LSE -inf, row loss 0, no gradient, counted in the
              mean); a teacher that copies the student gives exactly 0; out and lse are
              attention()'s bit for bit; reruns are bitwise equal.
  maskops     the raw ops' mask checks, a mask that requires grad refused, opcheck,
              torch.compile(fullgraph=True) and the schemas against the C++ ops'.
By hand:
    TRITON_INTERPRET=1 python -m pytest -q tests/triton_match_mask_cases.py
Shapes (B, H, N, D, Dt): N = 17 (one partial 64-wide tile) and 65 (two tiles, the second with
one row / key).
"""
import itertools
import os

import pytest
import torch

import fastattnreg
from fastattnreg import attention, attention_match, attention_match_ref
from fastattnreg.ops.checks import MATCH_KINDS, MATCH_ROWS
from conftest import FP32_TOL, cpp_schema, max_err
from inputs import MATCH_MASK_KINDS, match_inputs, match_mask
from triton_match_mask_checks import dead_rows, errors_against_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not fastattnreg.triton_available(),
    reason="needs TRITON_INTERPRET=1 set before the import and Triton installed",
)

SHAPES = ((2, 2, 17, 16, 16), (1, 2, 65, 32, 32))


def _fwd(q, k, v, tq, tk, mask, kind, rows, scale=0.25, teacher_scale=0.25):
    """(out, lse, teacher_row_lse, row_loss, student_row_lse) of the raw forward op."""
    return torch.ops.fastattnreg.triton_attention_match_fwd(q, k, v, tq, tk, mask, scale,
                                                            teacher_scale, kind, rows)


def _f32(shape, seed=0):
    return [t.float() for t in match_inputs(shape, rng=seed)]


# -------------------------------------------------------------------------------- maskvalues


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", MATCH_MASK_KINDS)
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_interp_maskvalues_float32_against_float64(shape, mask_kind, kind, rows):
    errors = errors_against_reference(shape, mask_kind, kind, rows, "cpu")
    print(", ".join(f"{n}={e:.1e}" for n, (e, _) in errors.items()))
    for name, (err, size) in errors.items():
        assert err <= FP32_TOL * max(1.0, size), f"{name}: {err:.3g} (size {size:.3g})"


# ---------------------------------------------------------------------------------- maskzero


# The masks with fully masked matched rows (key_padding leaves every row two keys).
WITH_DEAD_ROWS = [(m, kind, rows)
                  for m, rows in (("per_head_bool", "all"), ("per_head_bool", "cls"),
                                  ("shared_bias", "all"))
                  for kind in MATCH_KINDS]


@pytest.mark.parametrize("mask_kind,kind,rows", WITH_DEAD_ROWS)
def test_interp_maskzero_dead_rows_add_zero_and_get_no_gradient(mask_kind, kind, rows):
    """A matched row with every matched key masked: row loss exactly 0, row LSEs -inf (kinds
    that use them), no gradient from the loss; the loss is the mean over all B*H*R rows."""
    B, H, N, D, Dt = SHAPES[1]
    q, k, v, tq, tk = _f32(SHAPES[1], seed=1)
    mask = match_mask(mask_kind, B, H, N)
    dead = dead_rows(mask, B, H, N, rows)
    assert dead.any() and (~dead).any()
    out, lse, trow, row_loss, srow = _fwd(q, k, v, tq, tk, mask, kind, rows)
    assert (row_loss[dead] == 0).all() and torch.isfinite(row_loss).all()
    if kind != "mse_logits":
        assert torch.isneginf(srow[dead]).all() and torch.isneginf(trow[dead]).all()
        assert torch.isfinite(srow[~dead]).all() and torch.isfinite(trow[~dead]).all()
    _, loss = attention_match(q, k, v, tq, tk, attn_mask=mask, kind=kind, rows=rows, scale=0.25,
                              teacher_scale=0.25, backend="triton")
    assert max_err(loss, row_loss.sum() / row_loss.numel()) <= 1e-6 * max(1.0, loss.item())
    # Only the dead rows carry a loss gradient: q gets none at all, k and v none either.
    g = torch.where(dead, torch.ones_like(row_loss), torch.zeros_like(row_loss))
    grads = torch.ops.fastattnreg.triton_attention_match_bwd(
        None, None, g, q, k, v, out, lse, tq, tk, trow, srow, mask, 0.25, 0.25, kind, rows)
    for name, grad in zip(("dq", "dk", "dv"), grads):
        assert (grad == 0).all(), name


@pytest.mark.parametrize("mask_kind", MATCH_MASK_KINDS)
def test_interp_maskzero_out_and_lse_are_attentions_bit_for_bit(mask_kind):
    """The student's output is attention(q, k, v, attn_mask=mask): fully masked rows give out
    0 and LSE -inf."""
    B, H, N, D, Dt = SHAPES[1]
    q, k, v, tq, tk = _f32(SHAPES[1], seed=2)
    mask = match_mask(mask_kind, B, H, N)
    want_out, want_lse, _ = torch.ops.fastattnreg.triton_attention_fwd(q, k, v, mask, None, 0.25,
                                                                      "none", 0.0)
    for kind, rows in (("kl", "all"), ("mse_probs", "cls"), ("mse_logits", "all")):
        out, lse, *_ = _fwd(q, k, v, tq, tk, mask, kind, rows)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse), (kind, rows)
    full_dead = dead_rows(mask, B, H, N, "all")
    if full_dead.any():
        assert (out[full_dead] == 0).all() and torch.isneginf(lse[full_dead]).all()
    public, _ = attention_match(q, k, v, tq, tk, attn_mask=mask, backend="triton")
    assert torch.equal(public, attention(q, k, v, attn_mask=mask, backend="triton"))


@pytest.mark.parametrize("mask_kind", MATCH_MASK_KINDS)
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_interp_maskzero_teacher_copy_gives_exactly_zero(mask_kind, kind, rows):
    B, H, N, D, _ = SHAPES[0]
    q, k, v, _, _ = (t.requires_grad_() for t in _f32(SHAPES[0], seed=3))
    mask = match_mask(mask_kind, B, H, N)
    _, loss = attention_match(q, k, v, q.detach().clone(), k.detach().clone(), attn_mask=mask,
                              kind=kind, rows=rows, backend="triton")
    assert loss.item() == 0.0
    for name, g in zip(("dq", "dk", "dv"), torch.autograd.grad(loss, (q, k, v),
                                                               allow_unused=True)):
        assert g is None or (g == 0).all(), name


@pytest.mark.parametrize("mask_kind,kind,rows", [("key_padding", "kl", "all"),
                                                 ("per_head_bool", "mse_probs", "cls"),
                                                 ("shared_bias", "mse_logits", "all")])
def test_interp_maskzero_reruns_are_bitwise_equal(mask_kind, kind, rows):
    B, H, N, D, Dt = SHAPES[1]
    q, k, v, tq, tk = _f32(SHAPES[1], seed=4)
    mask = match_mask(mask_kind, B, H, N)
    dout = torch.randn(q.shape)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, loss = attention_match(*leaves, tq, tk, attn_mask=mask, kind=kind, rows=rows,
                                    backend="triton")
        return [out, loss, *torch.autograd.grad((out, loss), leaves, (dout, torch.tensor(0.7)))]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- maskops


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.ones(17, 17, dtype=torch.float64),
         r"attn_mask must be torch.bool \(True = takes part\) or q's dtype torch.float32 .*got "
         r"torch.float64"),
        (torch.ones(17, dtype=torch.bool), r"attn_mask must have 2 to 4 dims .*got shape \(17,\)"),
        (torch.ones(1, 1, 1, 17, 17, dtype=torch.bool),
         r"attn_mask must have 2 to 4 dims .*got shape \(1, 1, 1, 17, 17\)"),
        (torch.ones(3, 1, 1, 17, dtype=torch.bool),
         r"attn_mask of shape \(3, 1, 1, 17\) does not broadcast to \(B, H, N, N\) = "
         r"\(1, 2, 17, 17\)"),
        (torch.ones(17, 17, dtype=torch.bool, device="meta"),
         r"attn_mask must be on q's device cpu; got meta"),
    ],
)
def test_interp_maskops_raw_ops_check_the_mask(mask, match):
    q, k, v, tq, tk = _f32((1, 2, 17, 16, 16))
    with pytest.raises(ValueError, match=match):
        _fwd(q, k, v, tq, tk, mask, "kl", "all")
    out, lse, trow, row_loss, srow = _fwd(q, k, v, tq, tk, None, "kl", "all")
    with pytest.raises(ValueError, match=match):
        torch.ops.fastattnreg.triton_attention_match_bwd(
            out, None, row_loss, q, k, v, out, lse, tq, tk, trow, srow, mask, 0.25, 0.25, "kl",
            "all")
    with pytest.raises(ValueError, match=match):
        attention_match(q, k, v, tq, tk, attn_mask=mask, backend="triton")


def test_interp_maskops_a_mask_that_requires_grad_is_refused():
    q, k, v, tq, tk = _f32((1, 2, 17, 16, 16))
    bias = match_mask("shared_bias", 1, 2, 17).requires_grad_()
    match = r"attn_mask of attention_match must not require grad"
    with pytest.raises(ValueError, match=match):
        attention_match(q, k, v, tq, tk, attn_mask=bias, backend="triton")
    with pytest.raises(ValueError, match=match):  # the raw op, through its autograd rule
        _fwd(q.requires_grad_(), k, v, tq, tk, bias, "kl", "all")
    # Detached it is taken, and gets no gradient.
    out, loss = attention_match(q, k, v, tq, tk, attn_mask=bias.detach(), backend="triton")
    assert torch.isfinite(loss) and bias.grad is None


@pytest.mark.parametrize("mask_kind,kind,rows", [("shared_bias", "kl", "all"),
                                                 ("key_padding", "mse_probs", "cls"),
                                                 ("per_head_bool", "mse_logits", "all")])
def test_interp_maskops_opcheck(mask_kind, kind, rows):
    q, k, v, tq, tk = _f32((1, 2, 17, 16, 32))
    mask = match_mask(mask_kind, 1, 2, 17)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fwd = torch.ops.fastattnreg.triton_attention_match_fwd
    torch.library.opcheck(fwd.default, (*leaves, tq, tk, mask, 0.25, 0.2, kind, rows))
    out, lse, trow, row_loss, srow = fwd(q, k, v, tq, tk, mask, 0.25, 0.2, kind, rows)
    args = (torch.randn_like(out), torch.randn_like(lse), torch.randn_like(row_loss), q, k, v,
            out, lse, tq, tk, trow, srow, mask, 0.25, 0.2, kind, rows)
    torch.library.opcheck(torch.ops.fastattnreg.triton_attention_match_bwd.default, args)


def test_interp_maskops_compile_fullgraph_with_a_mask():
    torch._dynamo.reset()
    q, k, v, tq, tk = match_inputs((2, 2, 17, 16, 32), rng=5)
    mask = match_mask("per_head_bool", 2, 2, 17)

    def objective(fn, q, k, v, tq, tk):
        out, loss = fn(q, k, v, tq, tk, attn_mask=mask, kind="kl", rows="cls")
        return (out.double() ** 2).sum() + loss.double()

    compiled = torch.compile(
        lambda *a: objective(lambda *b, **kw: attention_match(*b, backend="triton", **kw), *a),
        fullgraph=True, backend="aot_eager")
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    value = compiled(qf, kf, vf, tq.float(), tk.float())
    grads = torch.autograd.grad(value, (qf, kf, vf))
    q64, k64, v64 = (t.requires_grad_() for t in (q, k, v))
    ref = objective(attention_match_ref, q64, k64, v64, tq, tk)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64))
    assert abs(value.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) <= 1e-3 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("name", ["attention_match_fwd", "attention_match_bwd"])
def test_interp_maskops_arguments_follow_the_cpp_ops(name):
    """The C++ ops' arguments, attn_mask in the same place; the Triton backward takes the two
    matched-row LSEs where the C++ one takes the teacher's LSE."""
    schema = str(getattr(torch.ops.fastattnreg, "triton_" + name).default._schema)
    arguments = schema[schema.index("("):schema.index(") ->") + 1]
    cpp = cpp_schema(name)
    want = cpp[len(name):cpp.index(") ->") + 1].replace(
        "Tensor teacher_lse,", "Tensor teacher_row_lse, Tensor student_row_lse,")
    assert arguments == want
