"""attention_match(attn_mask=...) on the C++ backend against attention_match_ref: the mask applies
to both models' logits, masked keys take no part in any divergence, fully masked rows add 0, and
the mask gets no gradient (one that requires grad is refused)."""
import itertools

import pytest
import torch

from fastattnreg import attention, attention_match, attention_match_ref
from fastattnreg.ops.checks import MATCH_KINDS, MATCH_ROWS
from conftest import max_err, requires_cpp
from inputs import MATCH_MASK_KINDS, match_inputs, match_mask

pytestmark = requires_cpp


@pytest.mark.parametrize("shape", [(2, 3, 17, 16, 8), (1, 2, 65, 32, 48), (2, 1, 300, 24, 16)])
@pytest.mark.parametrize("mask_kind", MATCH_MASK_KINDS)
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_float64_matches_reference_with_all_gradients(shape, mask_kind, kind, rows):
    q, k, v, tq, tk = match_inputs(shape, requires_grad=True)
    B, H, N = shape[:3]
    mask = match_mask(mask_kind, B, H, N, torch.float64, seed=None)
    inputs = [q, k, v]
    dout = torch.randn_like(q)
    ref_out, ref_loss = attention_match_ref(q, k, v, tq, tk, attn_mask=mask, kind=kind, rows=rows)
    out, loss = attention_match(q, k, v, tq, tk, attn_mask=mask, kind=kind, rows=rows,
                                backend="cpp")
    assert torch.isfinite(loss) and max_err(loss, ref_loss) < 1e-11
    assert max_err(out, ref_out) < 1e-12
    want = torch.autograd.grad((ref_out * dout).sum() + 1.3 * ref_loss, inputs)
    got = torch.autograd.grad((out * dout).sum() + 1.3 * loss, inputs)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all() and max_err(a, b) < 1e-10, name


@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_out_is_masked_attention_and_a_copied_teacher_gives_exactly_zero(kind, rows):
    q, k, v, _, _ = match_inputs((2, 3, 65, 32, 32), torch.float32, requires_grad=True)
    mask = match_mask("per_head_bool", 2, 3, 65, torch.float64, seed=None)
    out, loss = attention_match(q, k, v, q.detach().clone(), k.detach().clone(), attn_mask=mask,
                                kind=kind, rows=rows, backend="cpp")
    assert torch.equal(out, attention(q, k, v, attn_mask=mask, backend="cpp"))
    assert loss.item() == 0.0
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert dq.abs().max() == 0 and dk.abs().max() == 0


def test_fully_masked_rows_add_zero_but_count_in_the_mean():
    """Row 2 masked entirely: the loss is the other rows' sum over all 5 rows."""
    q, k, v, tq, tk = match_inputs((1, 1, 5, 4, 4), requires_grad=True)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    _, loss = attention_match(q, k, v, tq, tk, attn_mask=mask, backend="cpp")
    s_lp = ((q @ k.transpose(-2, -1)) * 0.5).log_softmax(-1)[0, 0]
    t_lp = ((tq @ tk.transpose(-2, -1)) * 0.5).log_softmax(-1)[0, 0]
    rows = [0, 1, 3, 4]
    kl = (t_lp.exp() * (t_lp - s_lp))[rows].sum() / 5
    assert max_err(loss, kl) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("kind", MATCH_KINDS)
def test_gradcheck_with_a_bias(kind):
    q, k, v, tq, tk = match_inputs((1, 2, 6, 4, 4), requires_grad=True)
    bias = torch.randn(6, 6, dtype=torch.float64)
    bias[1, 3] = float("-inf")
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_match(q, k, v, tq, tk, attn_mask=bias, kind=kind,
                                        backend="cpp"),
        (q, k, v))


def test_a_mask_that_requires_grad_is_refused():
    q, k, v, tq, tk = match_inputs((1, 2, 6, 4, 4), requires_grad=True)
    bias = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"attn_mask of attention_match must not require grad"):
        attention_match(q, k, v, tq, tk, attn_mask=bias, backend="cpp")
    with pytest.raises(ValueError, match=r"attn_mask of attention_match must not require grad"):
        torch.ops.fastattnreg.attention_match_fwd(q, k, v, tq, tk, bias, 0.5, 0.5, "kl", "all")


@pytest.mark.slow
@pytest.mark.parametrize("kind,rows", [("kl", "all"), ("mse_logits", "cls")])
def test_opcheck_with_a_mask(kind, rows):
    q, k, v, tq, tk = match_inputs((2, 2, 17, 16, 8))
    bias = match_mask("shared_bias", 2, 2, 17, torch.float64, seed=None).detach()
    torch.library.opcheck(torch.ops.fastattnreg.attention_match_fwd.default,
                          (q, k, v, tq, tk, bias, 0.25, 0.35, kind, rows))
    out, lse, tlse, row_loss = torch.ops.fastattnreg.attention_match_fwd(
        q, k, v, tq, tk, bias, 0.25, 0.35, kind, rows)
    torch.library.opcheck(
        torch.ops.fastattnreg.attention_match_bwd.default,
        (torch.randn_like(out), None, torch.randn_like(row_loss), q, k, v, out, lse, tq, tk,
         tlse, bias, 0.25, 0.35, kind, rows))


def test_bad_mask_is_named():
    q, k, v, tq, tk = match_inputs((2, 3, 17, 16, 8), requires_grad=True)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 17, 17\) does not broadcast"):
        attention_match(q, k, v, tq, tk, attn_mask=torch.ones(4, 17, 17, dtype=torch.bool),
                        backend="cpp")
