"""The Triton attention kernels on CPU tensors under Triton's interpreter.

Not collected by a plain `pytest` run (the name does not start with test_): TRITON_INTERPRET=1 has
to be set before Triton defines the kernels, so test_triton_attention.py runs this file in its
own process (tests/interpreter_runner.py). To run it by hand (-k interp_<group>: one group):
    TRITON_INTERPRET=1 python -m pytest -q tests/triton_attention_cases.py
Shapes are small and awkward (N in {1, 17, 65, 130}: one, partial and several 64-wide tiles;
D in {16, 48, 64}: 48 is padded to 64 and masked).
"""
import os

import pytest
import torch

import fastattnreg
from fastattnreg import attention, attention_ref
from fastattnreg.ops.checks import ATTENTION_EXPORTS, op_exports
from conftest import FP32_TOL, max_err
from inputs import qkv, qkv_on
from triton_attention_checks import (
    assert_compiled_matches_float64, assert_low_precision_rule, errors_vs_float64,
    low_precision_errors, run_all, triton_attention,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not fastattnreg.triton_available(),
    reason="needs TRITON_INTERPRET=1 set before the import and Triton installed",
)

# (B, H, N, D): B*H up to 6; N from 1 to 130 (more than one tile), head dims 16, 48 and 64.
SHAPES = ((1, 1, 1, 16), (2, 3, 17, 48), (3, 2, 65, 64), (1, 4, 65, 16), (2, 1, 130, 48))


# ------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_interp_values_float32_against_float64(shape, export):
    errors = errors_vs_float64(shape, export, "cpu")
    print(f"max errors {shape} {export}: " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    for name, err in errors.items():
        assert err <= FP32_TOL, f"{name}: {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,export", [((2, 3, 17, 48), "full"), ((1, 2, 130, 64), "head_mean"),
                                          ((1, 1, 1, 16), "cls"), ((2, 1, 65, 16), None),
                                          ((1, 2, 65, 32), "key_mean")])
def test_interp_values_low_precision_rule(shape, export, dtype):
    """bf16 runs its dots in fp32 in the interpreter (the interpreter's bf16 dot is wrong), on
    bf16-rounded operands as on the GPU; fp16 runs as is."""
    assert_low_precision_rule(low_precision_errors(shape, export, "cpu", dtype))


@pytest.mark.parametrize("used", ["out", "maps", "lse"])
@pytest.mark.parametrize("export", ATTENTION_EXPORTS[1:])
def test_interp_values_gradient_through_one_output(used, export):
    """Only one output carries a gradient: the others arrive as None and are skipped."""
    q, k, v = qkv_on((2, 3, 65, 16), torch.float32, "cpu")
    names = ("out", "maps", "lse")
    outs = dict(zip(names, triton_attention(q, k, v, export=export, return_lse=True)))
    q64, k64, v64 = (t.double() for t in (q, k, v))
    refs = dict(zip(names, attention_ref(q64, k64, v64, export=export, return_lse=True)))
    g = torch.randn(outs[used].shape, dtype=torch.float64)
    got = torch.autograd.grad(outs[used], (q, k, v), g.float())
    want = torch.autograd.grad(refs[used], (q, k, v), g, allow_unused=True)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert max_err(a, torch.zeros_like(a) if b is None else b) <= FP32_TOL, name


def test_interp_values_maps_are_consistent_probabilities():
    q, k, v = qkv_on((2, 3, 65, 48), torch.float32, "cpu", requires_grad=False)
    _, full = triton_attention(q, k, v, export="full")
    _, head_mean = triton_attention(q, k, v, export="head_mean")
    _, cls = triton_attention(q, k, v, export="cls")
    _, key_mean = triton_attention(q, k, v, export="key_mean")
    assert (full >= 0).all() and max_err(full.sum(-1), torch.ones(2, 3, 65)) < 1e-5
    assert max_err(head_mean, full.mean(1)) < 1e-6
    assert torch.equal(cls, full[:, :, 0, :])
    assert max_err(key_mean, full.mean(2)) < 1e-6
    assert max_err(key_mean.sum(-1), torch.ones(2, 3)) < 1e-5


def test_interp_values_noncontiguous_and_custom_scale():
    """q, k, v as timm makes them (permuted views of one projection) read in place."""
    B, N, H, D = 2, 17, 3, 48
    qkv = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    got = triton_attention(q, k, v, scale=0.3, export="full", return_lse=True)
    contiguous = triton_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.3,
                                  export="full", return_lse=True)
    want = attention_ref(q.double(), k.double(), v.double(), scale=0.3, export="full",
                         return_lse=True)
    for a, b, c in zip(got, contiguous, want):
        assert torch.equal(a, b) and max_err(a, c) <= FP32_TOL


def test_interp_values_auto_backend_keeps_cpu_tensors_off_triton():
    q, k, v = qkv_on((1, 2, 17, 16), torch.float32, "cpu", requires_grad=False)
    want = "cpp" if fastattnreg.cpp_available() else "reference"
    assert fastattnreg.backend.resolve("auto", q.device) == want
    assert max_err(attention(q, k, v), triton_attention(q, k, v)) < 1e-5


# ------------------------------------------------------------------------------------ reruns


@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_interp_reruns_are_bitwise_equal(export):
    q, k, v = qkv_on((2, 2, 130, 48), torch.float32, "cpu")  # 3 x 3 tiles per head
    for a, b in zip(run_all(q, k, v, export), run_all(q, k, v, export)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ errors


def _qkv(shape=(1, 2, 17, 16), dtype=torch.float32):
    return qkv(shape, dtype, requires_grad=False)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _qkv((2, 17, 16)), r"q must be 4-D \(B, H, N, D\); got 3-D"),
        (lambda: (torch.randn(1, 2, 17, 16), torch.randn(1, 2, 18, 16), torch.randn(1, 2, 17, 16)),
         r"k must have the shape of q \(1, 2, 17, 16\); got \(1, 2, 18, 16\)"),
        (lambda: (torch.randn(1, 2, 17, 16), torch.randn(1, 2, 17, 16).half(),
                  torch.randn(1, 2, 17, 16)),
         r"share one dtype; got torch.float32 and torch.float16"),
        (lambda: _qkv(dtype=torch.float64),
         r"q dtype must be one of .*for backend 'triton'; got torch.float64"),
        (lambda: _qkv((1, 1, 5, 8)),
         r"head dim D must be in \[16, 128\] for backend 'triton'; got 8"),
        (lambda: _qkv((1, 1, 5, 160)),
         r"head dim D must be in \[16, 128\] for backend 'triton'; got 160"),
        (lambda: _qkv((0, 2, 17, 16)), r"batch B must be at least 1; got shape \(0, 2, 17, 16\)"),
        (lambda: _qkv((1, 2, 0, 16)), r"tokens N must be at least 1"),
    ],
)
def test_interp_errors_bad_tensors(make, match):
    with pytest.raises(ValueError, match=match):
        triton_attention(*make())


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((*_qkv(), None, None, 0.25, "rows", 0.0), ValueError,
         r"export must be one of .*got 'rows'"),
        ((*_qkv(), None, None, float("inf"), "none", 0.0), ValueError,
         r"scale must be a finite number; got inf"),
        ((*_qkv((1, 1, 5, 8)), None, None, 0.25, "none", 0.0), ValueError,
         r"head dim D must be in \[16, 128\]"),
        ((*_qkv((65536, 1, 1, 16)), None, None, 0.25, "none", 0.0), ValueError,
         r"batch x heads must be at most 65535 .* got B=65536 x H=1 = 65536"),
    ],
)
def test_interp_errors_raw_forward_op(args, error, match):
    """torch.ops.fastattnreg.triton_attention_fwd skips attention()'s checks; its own hold."""
    with pytest.raises(error, match=match):
        torch.ops.fastattnreg.triton_attention_fwd(*args)


def test_interp_errors_raw_backward_op():
    q, k, v = _qkv()
    out, lse, maps = torch.ops.fastattnreg.triton_attention_fwd(q, k, v, None, None, 0.25, "cls",
                                                                0.0)
    bwd = torch.ops.fastattnreg.triton_attention_bwd
    rest = (None, None, 0.25)
    with pytest.raises(ValueError, match=r"dmaps must have shape \(1, 2, 17\); got \(1, 17\)"):
        bwd(None, q, k, v, out, lse, None, maps[:, 0], *rest, "cls", 0.0, False)
    with pytest.raises(ValueError, match=r"lse must be torch.float32; got torch.float64"):
        bwd(out, q, k, v, out, lse.double(), None, None, *rest, "none", 0.0, False)
    with pytest.raises(ValueError, match=r"dmaps was given but export is 'none'"):
        bwd(None, q, k, v, out, lse, None, maps, *rest, "none", 0.0, False)
    match = r"dout must have shape \(1, 2, 17, 16\); got \(1, 2, 16, 16\)"
    with pytest.raises(ValueError, match=match):
        bwd(out[:, :, :16], q, k, v, out, lse, None, None, *rest, "none", 0.0, False)


# ------------------------------------------------------------------------------ registration
# Under the interpreter the ops are opaque custom ops (see fastattnreg/ops/triton_attention.py);
# this checks their schemas, fake kernels and autograd, not Triton-on-CUDA tracing.


@pytest.mark.parametrize("export", op_exports(ATTENTION_EXPORTS))
def test_interp_registration_opcheck(export):
    q, k, v = [torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3)]
    fwd = torch.ops.fastattnreg.triton_attention_fwd.default
    torch.library.opcheck(fwd, (q, k, v, None, None, 0.25, export, 0.0))
    out, lse, maps = torch.ops.fastattnreg.triton_attention_fwd(q.detach(), k.detach(), v.detach(),
                                                                None, None, 0.25, export, 0.0)
    dmaps = torch.randn_like(maps) if export != "none" else None
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
            torch.randn_like(lse), dmaps, None, None, 0.25, export, 0.0, False)
    torch.library.opcheck(torch.ops.fastattnreg.triton_attention_bwd.default, args)


@pytest.mark.parametrize("export", [None, "head_mean", "cls", "key_mean"])
def test_interp_registration_compile_fullgraph(export):
    q, k, v = qkv_on((2, 3, 17, 16), torch.float32, "cpu")
    assert_compiled_matches_float64(triton_attention, q, k, v, export, backend="aot_eager")


def test_interp_registration_ops_sit_beside_the_cpp_ops():
    ops = torch.ops.fastattnreg
    assert ops.triton_attention_fwd.default._schema.name == "fastattnreg::triton_attention_fwd"
    if fastattnreg.cpp_available():
        assert ops.attention_fwd.default._schema.name == "fastattnreg::attention_fwd"
