"""attention_match() in bfloat16 on the C++ backend, for each kernel FASTATTNREG_SIMD selects
(conftest.BF16_KERNELS; an every-row teacher runs on AMX tiles with the student, a CLS-row
teacher on the float kernels). The low-precision rule, against PyTorch's own computation in
bf16 (attention_match_ref with upcast=False):
  out, dq, dk, dv   error against the float64 reference of the unrounded inputs at most twice
                    the bf16 reference's (the rounding of P and dS is what the rule measures);
  the loss          error against the float64 reference of the bf16-rounded inputs at most
                    twice the bf16 reference's (from the same inputs, both errors measure the
                    arithmetic alone; the inputs' rounding moves both losses alike and would
                    decide the comparison by chance).
A teacher that copies the student still gives a loss and gradient of exactly 0 (test_match.py),
and reruns are bitwise equal."""
import itertools

import pytest
import torch

from fastattnreg import attention_match, attention_match_ref
from fastattnreg.ops.checks import MATCH_KINDS, MATCH_ROWS
from conftest import max_err, requires_cpp
from inputs import match_inputs

pytestmark = requires_cpp

# (B, H, N, D, teacher D): odd lengths, odd and non-power-of-four head dims (the softmax scale
# folds into Q only for D = 16, 64, 256), a teacher head dim that differs, and N = 300 (two
# query blocks per head, over which dK and dV accumulate).
SHAPES = ((2, 3, 17, 48, 16), (1, 2, 65, 64, 80), (2, 1, 197, 33, 64), (1, 1, 300, 64, 64))


def _run(fn, inputs, dout, dloss):
    out, loss = fn(*inputs)
    grads = torch.autograd.grad((out, loss), inputs[:3], (dout.to(out.dtype), dloss))
    return out, loss, grads


def _case(shape, kind, rows, mask=None):
    q, k, v, tq, tk = match_inputs(shape, torch.float64)
    dout = torch.randn_like(q)
    kw = dict(kind=kind, rows=rows, attn_mask=mask)

    def leaves(dtype, *tensors):
        return [t.detach().to(dtype).requires_grad_(i < 3) for i, t in enumerate(tensors)]

    def ref(upcast):
        return lambda *a: attention_match_ref(*a, upcast=upcast, **kw)

    bf16 = [t.to(torch.bfloat16) for t in (q, k, v, tq, tk)]
    truth = _run(ref(True), leaves(torch.float64, q, k, v, tq, tk), dout, torch.tensor(1.3))
    rounded_truth = _run(ref(True), leaves(torch.float64, *bf16), dout, torch.tensor(1.3))
    torch_bf16 = _run(ref(False), leaves(torch.bfloat16, *bf16), dout, torch.tensor(1.3))
    got = _run(lambda *a: attention_match(*a, backend="cpp", **kw),
               leaves(torch.bfloat16, *bf16), dout, torch.tensor(1.3))
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for name, g, p, w in zip(("out", "dq", "dk", "dv"), (got[0], *got[2]),
                             (torch_bf16[0], *torch_bf16[2]), (truth[0], *truth[2])):
        assert max_err(g, w) <= 2 * max_err(p, w) + 1e-5, name
    assert max_err(got[1], rounded_truth[1]) <= 2 * max_err(torch_bf16[1], rounded_truth[1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_within_twice_torch_bf16(bf16_kernels, shape, kind, rows):
    _case(shape, kind, rows)


@pytest.mark.parametrize("kind", MATCH_KINDS)
def test_key_padding_mask_within_twice_torch_bf16(bf16_kernels, kind):
    B, N = 2, 65
    mask = torch.rand(B, 1, 1, N) > 0.3
    mask[..., 0] = True  # no fully masked row
    _case((B, 2, N, 64, 32), kind, "all", mask)


@pytest.mark.parametrize("kind", MATCH_KINDS)
def test_reruns_are_bitwise_equal(bf16_kernels, kind):
    """Several threads share the heads; two runs must agree to the bit."""
    q, k, v, tq, tk = match_inputs((4, 6, 197, 64, 48), torch.bfloat16, requires_grad=True)

    def run():
        out, loss = attention_match(q, k, v, tq, tk, kind=kind, backend="cpp")
        ones = (torch.ones_like(out), torch.ones_like(loss))
        return [out, loss, *torch.autograd.grad((out, loss), (q, k, v), ones)]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)
