"""attention(backend="triton"): the Triton kernels against attention_ref.

Two groups:
  * interpreter (any machine with Triton): tests/triton_attention_cases.py and, for masks,
    dropout and their op checks, tests/triton_attention_mask_cases.py run on CPU tensors in a
    child process with TRITON_INTERPRET=1 (the variable must be set before Triton defines the
    kernels), one test per case file here; a failure shows the child's report.
  * CUDA (skipped without a GPU): the shape grid of test_attention.py, fp16/bf16 by the
    FlashAttention rule, masks and dropout, opcheck and torch.compile(fullgraph=True) of the
    triton_op registration.
Plus the package's import without Triton and the Triton ops without the C++ extension.
"""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattnreg
from fastattnreg.ops.checks import ATTENTION_EXPORTS, op_exports
from fastattnreg.ops.dropout import dropout_keep_mask
from conftest import ROOT, TESTS, requires_triton, rerun_without_triton_interpreter
from conftest import requires_cuda_triton as requires_cuda  # CUDA tests of the Triton kernels
from inputs import (HEAD_DIMS, SEQ_LENS, TRITON_MASK_KINDS, grid_shape, qkv_on,
                    triton_attention_mask)
from interpreter_runner import interpreted_cases
from triton_attention_checks import (
    assert_compiled_matches_float64, assert_low_precision_rule, errors_vs_float64,
    low_precision_errors, run_all, triton_attention,
)
from triton_attention_mask_checks import (
    assert_compiled_mask_dropout_matches_eager, compare_with_reference, low_precision_mask_errors,
)

FP32_MAX_HEAD_DIM = 64  # the maps and backward kernels' largest fp32 head dim (tiles.py)
FP32_HEAD_DIMS = [d for d in HEAD_DIMS if d <= FP32_MAX_HEAD_DIM]
CASES = TESTS / "triton_attention_cases.py"
MASK_CASES = TESTS / "triton_attention_mask_cases.py"


def _child(args, extra_env=None, timeout=600):
    env = {**os.environ, **(extra_env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------- interpreter group


test_interpreted_kernels = interpreted_cases(CASES)
test_interpreted_masks_and_dropout = interpreted_cases(MASK_CASES)


@pytest.mark.slow
@requires_triton
def test_triton_ops_register_without_the_cpp_extension():
    """The Triton ops live in the fastattnreg namespace as a fragment; they must not need _C."""
    code = textwrap.dedent(
        """
        import os, sys, warnings
        sys.modules["fastattnreg._C"] = None  # makes `import fastattnreg._C` raise ImportError
        os.environ.pop("FASTATTNREG_REQUIRE_CPP", None)  # this child tests the fallback
        warnings.simplefilter("ignore")
        import torch, fastattnreg
        assert not fastattnreg.cpp_available() and fastattnreg.triton_available()
        assert not hasattr(torch.ops.fastattnreg, "attention_fwd")
        q = torch.randn(1, 2, 17, 16, requires_grad=True)
        out, maps = fastattnreg.attention(q, q, q, export="cls", backend="triton")
        ref_out, ref_maps = fastattnreg.attention_ref(q, q, q, export="cls")
        assert (out - ref_out).abs().max() < 1e-5 and (maps - ref_maps).abs().max() < 1e-5
        (out.sum() + maps.sum()).backward()
        print("OK")
        """
    )
    res = _child(["-c", code], {"TRITON_INTERPRET": "1"}, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-4000:]


@pytest.mark.slow  # a child interpreter
def test_package_works_without_triton():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, fastattnreg
        assert not fastattnreg.triton_available()
        assert not hasattr(torch.ops.fastattnreg, "triton_attention_fwd")
        q = torch.randn(1, 2, 5, 16)
        assert fastattnreg.attention(q, q, q, backend="reference").shape == (1, 2, 5, 16)
        try:
            fastattnreg.attention(q, q, q, backend="triton")
        except RuntimeError as e:
            assert "Triton is not installed" in str(e), e
        else:
            raise AssertionError("backend='triton' should be refused")
        print("OK")
        """
    )
    res = _child(["-c", code], timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-4000:]


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(request):
    if rerun_without_triton_interpreter(request):
        return
    q = torch.randn(1, 2, 5, 16)
    match = r"backend='triton' (is not available|runs CUDA tensors)"
    with pytest.raises(RuntimeError, match=match):
        fastattnreg.attention(q, q, q, backend="triton")


# -------------------------------------------------------------------------------- CUDA group

@requires_cuda
@pytest.mark.parametrize("n,d", list(itertools.product(SEQ_LENS, FP32_HEAD_DIMS)))
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_cuda_float32_against_float64(n, d, export):
    for name, err in errors_vs_float64(grid_shape(n, d), export, "cuda").items():
        assert err <= 1e-4, f"{name}: {err:.3g}"


@requires_cuda
@pytest.mark.parametrize("d", [d for d in HEAD_DIMS if d > FP32_MAX_HEAD_DIM])
def test_cuda_float32_beyond_head_dim_64_runs_the_forward_and_refuses_maps_and_backward(d):
    """fp32 tiles padded to 128 columns spill registers in the maps, dK/dV and dQ kernels with
    every tile (fastattnreg/triton/tiles.py): those launches raise; the forward runs."""
    q, k, v = qkv_on((2, 3, 65, d), torch.float32, "cuda")
    out = fastattnreg.attention(q, k, v, backend="triton")
    assert torch.isfinite(out).all()
    refused = rf"head dim {d} .* torch\.float32 inputs is above {FP32_MAX_HEAD_DIM}"
    with pytest.raises(ValueError, match=refused + r".*_maps_kernel"):
        fastattnreg.attention(q, k, v, backend="triton", export="full")
    with pytest.raises(ValueError, match=refused + r".*dK/dV"):
        out.sum().backward()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d", list(itertools.product(SEQ_LENS, HEAD_DIMS)))
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_cuda_low_precision_error_at_most_twice_the_references(n, d, export, dtype):
    assert_low_precision_rule(low_precision_errors(grid_shape(n, d), export, "cuda", dtype))


@requires_cuda
@pytest.mark.parametrize("n", [577, 1025, 2048])
def test_cuda_long_sequences(n):
    for name, err in errors_vs_float64((1, 2, n, 64), "head_mean", "cuda").items():
        assert err <= 1e-4, f"{name}: {err:.3g}"


@requires_cuda
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_cuda_reruns_are_bitwise_equal(export):
    q, k, v = qkv_on((4, 6, 197, 64), torch.bfloat16, "cuda")
    for a, b in zip(run_all(q, k, v, export), run_all(q, k, v, export)):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("kind", ["key_padding", "full_bias"])
def test_cuda_reruns_with_mask_and_dropout_are_bitwise_equal(kind):
    q, k, v = qkv_on((4, 6, 197, 64), torch.bfloat16, "cuda")
    mask = triton_attention_mask(kind, 4, 6, 197, torch.bfloat16, "cuda")
    rng = torch.tensor([11, 12], device="cuda")
    leaves = [q, k, v] + ([mask] if mask.requires_grad else [])

    def run():
        outs = list(torch.ops.fastattnreg.triton_attention_fwd(q, k, v, mask, rng, 0.125, "full",
                                                               0.2))
        return outs + list(torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs]))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.parametrize("export", op_exports(ATTENTION_EXPORTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,p", [(None, 0.0), ("key_padding", 0.1), ("shared_bias", 0.0)])
def test_cuda_opcheck(export, dtype, kind, p):
    q, k, v = [torch.randn(2, 3, 17, 48, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3)]
    mask = None if kind is None else triton_attention_mask(kind, 2, 3, 17, dtype, "cuda")
    rng = torch.tensor([5, 7], device="cuda") if p > 0 else None
    torch.library.opcheck(torch.ops.fastattnreg.triton_attention_fwd.default,
                          (q, k, v, mask, rng, 0.25, export, p))
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    md = None if mask is None else mask.detach()
    out, lse, maps = torch.ops.fastattnreg.triton_attention_fwd(qd, kd, vd, md, rng, 0.25, export,
                                                                p)
    dmaps = torch.randn_like(maps) if export != "none" else None
    args = (torch.randn_like(out), qd, kd, vd, out, lse, torch.randn_like(lse), dmaps, md, rng,
            0.25, export, p, md is not None and md.dtype != torch.bool)
    torch.library.opcheck(torch.ops.fastattnreg.triton_attention_bwd.default, args)


@requires_cuda
@pytest.mark.parametrize("n", [17, 197, 257])
@pytest.mark.parametrize("kind", TRITON_MASK_KINDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_masks_and_dropout_float32_against_float64(n, kind, p):
    export = ATTENTION_EXPORTS[(SEQ_LENS.index(n) + TRITON_MASK_KINDS.index(kind))
                               % len(ATTENTION_EXPORTS)]
    errors = compare_with_reference((2, 3, n, 64), kind, export, p, "cuda")
    for name, err in errors.items():
        assert err <= 1e-4, f"{name}: {err:.3g}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", TRITON_MASK_KINDS)
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_cuda_masks_and_dropout_low_precision_rule(kind, p, dtype):
    export = ATTENTION_EXPORTS[TRITON_MASK_KINDS.index(kind) % len(ATTENTION_EXPORTS)]
    errors = low_precision_mask_errors((2, 3, 197, 64), kind, export, p, "cuda", dtype)
    assert_low_precision_rule(errors)


@requires_cuda
def test_cuda_dropout_keep_mask_read_back_from_one_hot_values():
    """v = one-hot columns (N <= D): out = P * keep / (1 - p), so out != 0 is the kernels' mask."""
    B, H, N, D, p = 2, 3, 61, 64, 0.3
    q, k = [torch.randn(B, H, N, D, device="cuda") * 0.3 for _ in range(2)]
    v = torch.eye(N, D, device="cuda").expand(B, H, N, D).contiguous()
    rng = torch.tensor([2**45 + 1, 2**33 + 2], device="cuda")
    out, _, full = torch.ops.fastattnreg.triton_attention_fwd(q, k, v, None, rng, 0.25, "full", p)
    assert (full > 0).all()
    assert torch.equal((out[..., :N] != 0).cpu(), dropout_keep_mask((B, H, N, N), p, rng.cpu()))


@pytest.mark.slow  # inductor compiles the kernels
@requires_cuda
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_cuda_compile_fullgraph_inductor(export):
    """Inductor sees the kernels through wrap_triton (triton_op), forward and backward."""
    q, k, v = qkv_on((2, 3, 65, 48), torch.float32, "cuda")
    assert_compiled_matches_float64(fastattnreg.attention, q, k, v, export)


@requires_cuda
def test_cuda_auto_backend_picks_triton():
    q, k, v = qkv_on((2, 3, 17, 48), torch.float32, "cuda", requires_grad=False)
    assert fastattnreg.backend.resolve("auto", q.device) == "triton"
    assert torch.equal(fastattnreg.attention(q, k, v), triton_attention(q, k, v))


@pytest.mark.slow  # inductor compiles the kernels
@requires_cuda
def test_cuda_compile_fullgraph_with_mask_and_dropout():
    """Inductor around the triton_ops with a float bias requiring grad and dropout: the rng is
    drawn in the graph and loaded by the kernels. Inductor draws random numbers its own way
    unless fallback_random is set; with it, the same seed repeats the eager numbers."""
    q, k, v = qkv_on((2, 3, 65, 48), torch.float32, "cuda")
    bias = triton_attention_mask("shared_bias", 2, 3, 65, torch.float32, "cuda")
    assert_compiled_mask_dropout_matches_eager(
        fastattnreg.attention, q, k, v, bias,
        compile_context=lambda: torch._inductor.config.patch(fallback_random=True))
