"""attention_match(attn_mask=...) on the C++ backend against attention_match_ref: the mask applies
to both models' logits, masked keys take no part in any divergence, fully masked rows add 0, and
the mask gets no gradient (one that requires grad is refused)."""
import itertools

import pytest
import torch

from fastattnreg import attention, attention_match, attention_match_ref
from conftest import max_err, requires_cpp

pytestmark = requires_cpp

KINDS = ("kl", "mse_probs", "mse_logits")
ROWS = ("all", "cls")


def _case(shape, dtype=torch.float64):
    B, H, N, D, Dt = shape
    q, k, v = [torch.randn(B, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3)]
    tq, tk = [torch.randn(B, H, N, Dt, dtype=dtype) for _ in range(2)]
    return q, k, v, tq, tk


def _mask(kind, B, H, N, dtype=torch.float64):
    if kind == "key_padding":  # batch 0 keeps only keys 0 and 1: its CLS row has one patch key
        m = torch.ones(B, 1, 1, N, dtype=torch.bool)
        m[0, ..., 2:] = False
        if B > 1:
            m[1, ..., N // 2:] = False
        return m
    if kind == "per_head_bool":  # with one fully masked row (row N-1 of head 0)
        m = torch.rand(1, H, N, N) > 0.4
        m[..., torch.arange(N), torch.arange(N)] = True
        m[0, 0, N - 1, :] = False
        m[0, H - 1, 0, 1:] = False  # the CLS row of the last head keeps no patch key
        return m
    m = torch.randn(N, N, dtype=dtype)  # shared float bias with -inf entries and a dead row
    m[torch.rand(N, N) < 0.2] = float("-inf")
    m[torch.arange(N), torch.arange(N)] = 0.0
    m[N // 2, :] = float("-inf")
    return m


@pytest.mark.parametrize("shape", [(2, 3, 17, 16, 8), (1, 2, 65, 32, 48), (2, 1, 300, 24, 16)])
@pytest.mark.parametrize("mask_kind", ["key_padding", "per_head_bool", "shared_bias"])
@pytest.mark.parametrize("kind,rows", list(itertools.product(KINDS, ROWS)))
def test_float64_matches_reference_with_all_gradients(shape, mask_kind, kind, rows):
    q, k, v, tq, tk = _case(shape)
    B, H, N = shape[:3]
    mask = _mask(mask_kind, B, H, N)
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


@pytest.mark.parametrize("kind,rows", list(itertools.product(KINDS, ROWS)))
def test_out_is_masked_attention_and_a_copied_teacher_gives_exactly_zero(kind, rows):
    q, k, v, _, _ = _case((2, 3, 65, 32, 32), torch.float32)
    mask = _mask("per_head_bool", 2, 3, 65)
    out, loss = attention_match(q, k, v, q.detach().clone(), k.detach().clone(), attn_mask=mask,
                                kind=kind, rows=rows, backend="cpp")
    assert torch.equal(out, attention(q, k, v, attn_mask=mask, backend="cpp"))
    assert loss.item() == 0.0
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert dq.abs().max() == 0 and dk.abs().max() == 0


def test_fully_masked_rows_add_zero_but_count_in_the_mean():
    """Row 2 masked entirely: the loss is the other rows' sum over all 5 rows."""
    q, k, v, tq, tk = _case((1, 1, 5, 4, 4))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[2] = False
    _, loss = attention_match(q, k, v, tq, tk, attn_mask=mask, backend="cpp")
    s_lp = ((q @ k.transpose(-2, -1)) * 0.5).log_softmax(-1)[0, 0]
    t_lp = ((tq @ tk.transpose(-2, -1)) * 0.5).log_softmax(-1)[0, 0]
    rows = [0, 1, 3, 4]
    kl = (t_lp.exp() * (t_lp - s_lp))[rows].sum() / 5
    assert max_err(loss, kl) < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_with_a_bias(kind):
    q, k, v, tq, tk = _case((1, 2, 6, 4, 4))
    bias = torch.randn(6, 6, dtype=torch.float64)
    bias[1, 3] = float("-inf")
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention_match(q, k, v, tq, tk, attn_mask=bias, kind=kind,
                                        backend="cpp"),
        (q, k, v))


def test_a_mask_that_requires_grad_is_refused():
    q, k, v, tq, tk = _case((1, 2, 6, 4, 4))
    bias = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"attn_mask of attention_match must not require grad"):
        attention_match(q, k, v, tq, tk, attn_mask=bias, backend="cpp")
    with pytest.raises(ValueError, match=r"attn_mask of attention_match must not require grad"):
        torch.ops.fastattnreg.attention_match_fwd(q, k, v, tq, tk, bias, 0.5, 0.5, "kl", "all")


@pytest.mark.slow
@pytest.mark.parametrize("kind,rows", [("kl", "all"), ("mse_logits", "cls")])
def test_opcheck_with_a_mask(kind, rows):
    q, k, v, tq, tk = [t.detach() for t in _case((2, 2, 17, 16, 8))]
    bias = _mask("shared_bias", 2, 2, 17).detach()
    torch.library.opcheck(torch.ops.fastattnreg.attention_match_fwd.default,
                          (q, k, v, tq, tk, bias, 0.25, 0.35, kind, rows))
    out, lse, tlse, row_loss = torch.ops.fastattnreg.attention_match_fwd(
        q, k, v, tq, tk, bias, 0.25, 0.35, kind, rows)
    torch.library.opcheck(
        torch.ops.fastattnreg.attention_match_bwd.default,
        (torch.randn_like(out), None, torch.randn_like(row_loss), q, k, v, out, lse, tq, tk,
         tlse, bias, 0.25, 0.35, kind, rows))


def test_bad_mask_is_named():
    q, k, v, tq, tk = _case((2, 3, 17, 16, 8))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 17, 17\) does not broadcast"):
        attention_match(q, k, v, tq, tk, attn_mask=torch.ones(4, 17, 17, dtype=torch.bool),
                        backend="cpp")
