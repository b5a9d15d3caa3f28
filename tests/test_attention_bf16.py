"""attention() in bfloat16 on the C++ backend, for each kernel FASTATTNREG_SIMD selects
(conftest.BF16_KERNELS): AMX tiles, AVX512-BF16 operand pairs and the float kernels. Every
export, the LSE, bool and float masks (with the mask's gradient) and dropout keep the
low-precision rule: error against float64 at most twice that of PyTorch's own attention run in
bf16."""
import pytest
import torch

import fastattnreg._C as native
from fastattnreg import attention, attention_ref
from fastattnreg.ops.checks import ATTENTION_EXPORTS
from fastattnreg.ops.dropout import dropout_keep_mask
from conftest import bf16_kernels_run, max_err, requires_cpp

pytestmark = requires_cpp

# Odd N and odd D take the zero-padded bf16 pairs; N = 300 gives a head two query blocks (a
# block holds up to 80K / N rows), over which dK and dV accumulate.
SHAPES = ((1, 1, 1, 16), (2, 3, 17, 33), (3, 2, 65, 64), (1, 2, 197, 80), (1, 1, 300, 64))


def test_fastattnreg_simd_selects_the_kernels(monkeypatch):
    monkeypatch.delenv("FASTATTNREG_SIMD", raising=False)
    # AMX where the CPU has it, else float32
    assert native._bf16_kernels() == bf16_kernels_run("auto")
    for value in ("auto", "amx", "avx512_bf16", "avx512", "avx2", "default"):
        monkeypatch.setenv("FASTATTNREG_SIMD", value)
        assert native._bf16_kernels() == bf16_kernels_run(value), value


def test_mkldnn_disabled_rules_out_amx(monkeypatch):
    """oneDNN runs the AMX products; with torch's oneDNN switched off the float kernels run."""
    monkeypatch.setenv("FASTATTNREG_SIMD", "amx")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert native._bf16_kernels() == "float32"
    q = torch.randn(1, 2, 9, 8, dtype=torch.bfloat16)
    want = attention_ref(q.double(), q.double(), q.double())
    assert max_err(attention(q, q, q, backend="cpp"), want) < 0.05


def test_unknown_fastattnreg_simd_is_refused(monkeypatch):
    monkeypatch.setenv("FASTATTNREG_SIMD", "amx2")
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="FASTATTNREG_SIMD must be one of .* got 'amx2'"):
        attention(q, q, q, backend="cpp")


def _check_twice_torch(got, torch_bf16, want, names):
    for name, g, p, w in zip(names, got, torch_bf16, want):
        assert g.dtype == p.dtype, name
        # The floor only matters where both errors are 0 (N = 1: out == v exactly).
        assert max_err(g, w) <= 2 * max_err(p, w) + 1e-5, name


def _run(fn, inputs, upstream):
    outs = list(fn(*inputs))
    grads = torch.autograd.grad(outs, inputs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return outs + list(grads)


def _case(shape, export, mask_kind, dropout_p):
    B, H, N, D = shape
    q64, k64, v64 = [torch.randn(shape, dtype=torch.float64) * 1.5 for _ in range(3)]
    mask64 = None
    if mask_kind == "bool":  # key padding; key 0 always takes part (no fully masked row)
        mask64 = torch.rand(B, 1, 1, N) > 0.3
        mask64[..., 0] = True
    elif mask_kind == "float":
        mask64 = torch.randn(1, H, N, N, dtype=torch.float64)
    keep = None
    if dropout_p:
        torch.manual_seed(11)
        rng = torch.randint(0, 2**62, (2,), dtype=torch.int64)  # the draw attention() makes
        keep = dropout_keep_mask((B, H, N, N), dropout_p, rng)

    def inputs(dtype):
        qkv = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
        if mask_kind == "float":
            return qkv + [mask64.to(dtype).requires_grad_()]
        return qkv

    def ours(q, k, v, *mask):
        torch.manual_seed(11)
        return attention(q, k, v, attn_mask=mask[0] if mask else mask64, dropout_p=dropout_p,
                         export=export, return_lse=True, backend="cpp")

    def reference(upcast):
        def fn(q, k, v, *mask):
            return attention_ref(q, k, v, attn_mask=mask[0] if mask else mask64,
                                 dropout_p=dropout_p, dropout_mask=keep, export=export,
                                 return_lse=True, upcast=upcast)
        return fn

    want_outs = reference(True)(*inputs(torch.float64))
    upstream = [torch.randn(o.shape, dtype=torch.float64) for o in want_outs]
    want = _run(reference(True), inputs(torch.float64), upstream)
    torch_bf16 = _run(reference(False), inputs(torch.bfloat16), upstream)
    got = _run(ours, inputs(torch.bfloat16), upstream)
    names = ["out"] + (["maps"] if export else []) + ["lse", "dq", "dk", "dv", "dmask"]
    _check_twice_torch(got, torch_bf16, want, names)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_every_export_within_twice_torch_bf16(bf16_kernels, shape, export):
    _case(shape, export, None, 0.0)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("mask_kind", ("bool", "float"))
def test_masks_within_twice_torch_bf16(bf16_kernels, shape, mask_kind):
    _case(shape, "full", mask_kind, 0.0)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("export", (None, "head_mean"))
def test_dropout_within_twice_torch_bf16(bf16_kernels, shape, export):
    _case(shape, export, "float", 0.2)


@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_reruns_are_bitwise_equal(bf16_kernels, export):
    """Several threads share the heads; two runs must agree to the bit."""
    q, k, v = [torch.randn(4, 6, 197, 64, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3)]

    def run():
        outs = list(attention(q, k, v, export=export, return_lse=True, backend="cpp"))
        return outs + list(torch.autograd.grad(outs, (q, k, v), [torch.ones_like(o) for o in outs]))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)
