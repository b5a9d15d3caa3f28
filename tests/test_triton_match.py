"""attention_match(backend="triton"): the Triton kernels against attention_match_ref.

  * interpreter (any machine with Triton): tests/triton_match_cases.py and, with attention
    masks, tests/triton_match_mask_cases.py run on CPU tensors in a child process with
    TRITON_INTERPRET=1 (set before Triton defines the kernels; tests/interpreter_runner.py), one
    test per case file here; a failure shows the child's report.
  * CUDA (skipped without a GPU): the shapes of test_match.py in float32 against float64, with
    and without masks, the teacher copy, opcheck and torch.compile(fullgraph=True) of the
    triton_op registration.
"""
import itertools

import pytest
import torch

from fastattnreg import attention_match, attention_match_ref
from fastattnreg.ops.checks import MATCH_KINDS, MATCH_ROWS
from conftest import TESTS, max_err
from conftest import requires_cuda_triton as requires_cuda  # CUDA tests of the Triton kernels
from inputs import MATCH_MASK_KINDS, match_inputs, match_mask
from interpreter_runner import interpreted_cases
from triton_match_mask_checks import errors_against_reference

CASES = TESTS / "triton_match_cases.py"
MASK_CASES = TESTS / "triton_match_mask_cases.py"


test_interpreted_kernels = interpreted_cases(CASES)
test_interpreted_mask_kernels = interpreted_cases(MASK_CASES)


# --------------------------------------------------------------------------------------- CUDA


@requires_cuda
# fp32: D and Dt <= 64, the backward kernels' largest fp32 head dim (fastattnreg/triton/tiles.py).
@pytest.mark.parametrize("shape", [(2, 3, 17, 48, 16), (1, 2, 65, 64, 48), (2, 1, 197, 48, 64),
                                   (1, 2, 257, 16, 48)])
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_cuda_float32_against_float64(shape, kind, rows):
    q, k, v, tq, tk = match_inputs(shape)
    dout = torch.randn_like(q)
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
    out_r, loss_r = attention_match_ref(q64, k64, v64, tq, tk, kind=kind, rows=rows)
    ref = torch.autograd.grad((out_r, loss_r), (q64, k64, v64), (dout, torch.tensor(1.3).double()))
    qc, kc, vc = (t.float().cuda().requires_grad_() for t in (q, k, v))
    out, loss = attention_match(qc, kc, vc, tq.float().cuda(), tk.float().cuda(), kind=kind,
                                rows=rows, backend="triton")
    got = torch.autograd.grad((out, loss), (qc, kc, vc),
                              (dout.float().cuda(), torch.tensor(1.3, device="cuda")))
    tol = 2e-4  # 3xTF32 dots
    assert max_err(loss.cpu(), loss_r) <= tol * max(1.0, abs(loss_r.item()))
    assert max_err(out.cpu(), out_r) <= tol
    for g, r in zip(got, ref):
        assert max_err(g.cpu(), r) <= tol * max(1.0, r.abs().max().item())


@requires_cuda
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_teacher_copy_gives_exactly_zero(kind, rows, dtype):
    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    _, loss = attention_match(q, k, v, q.detach().clone(), k.detach().clone(), kind=kind,
                              rows=rows, backend="triton")
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (q, k)):
        assert g.abs().max().item() == 0.0


@requires_cuda
@pytest.mark.parametrize("shape", [(2, 2, 17, 16, 16), (1, 2, 65, 32, 32), (2, 3, 197, 64, 48)])
@pytest.mark.parametrize("mask_kind", MATCH_MASK_KINDS)
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
def test_cuda_masks_float32_against_float64(shape, mask_kind, kind, rows):
    errors = errors_against_reference(shape, mask_kind, kind, rows, "cuda")
    tol = 2e-4  # 3xTF32 dots
    for name, (err, size) in errors.items():
        assert err <= tol * max(1.0, size), f"{name}: {err:.3g} (size {size:.3g})"


@requires_cuda
@pytest.mark.parametrize("mask_kind", MATCH_MASK_KINDS)
@pytest.mark.parametrize("kind,rows", list(itertools.product(MATCH_KINDS, MATCH_ROWS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_teacher_copy_gives_exactly_zero_under_a_mask(mask_kind, kind, rows, dtype):
    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    mask = match_mask(mask_kind, 2, 3, 197, dtype, "cuda")
    _, loss = attention_match(q, k, v, q.detach().clone(), k.detach().clone(), attn_mask=mask,
                              kind=kind, rows=rows, backend="triton")
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (q, k)):
        assert g.abs().max().item() == 0.0


@pytest.mark.slow  # inductor compiles the kernels
@requires_cuda
def test_cuda_opcheck_and_compile_fullgraph():
    q, k, v, tq, tk = match_inputs((2, 2, 65, 32, 48), torch.float32, requires_grad=True,
                                   device="cuda")
    bias = match_mask("shared_bias", 2, 2, 65, torch.float32, "cuda")
    for mask in (None, bias):
        torch.library.opcheck(torch.ops.fastattnreg.triton_attention_match_fwd.default,
                              (q, k, v, tq, tk, mask, 0.2, 0.15, "kl", "all"))
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: attention_match(*a, attn_mask=bias, kind="kl",
                                                  backend="triton"), fullgraph=True)
    out, loss = fn(q, k, v, tq, tk)
    out_r, loss_r = attention_match_ref(q, k, v, tq, tk, attn_mask=bias, kind="kl")
    assert max_err(out, out_r) < 1e-3 and abs(loss.item() - loss_r.item()) < 1e-3
