"""attention(attn_mask=...) on the C++ backend against attention_ref: SDPA's mask meaning (bool:
True takes part; float: additive bias with its own gradient), every broadcast form, every export,
fully masked rows, and the op-level checks (opcheck, gradcheck, compile, repeatable reruns)."""
import pytest
import torch
import torch.nn.functional as F

from fastattnreg import attention, attention_ref
from fastattnreg.ops.checks import ATTENTION_EXPORTS
from conftest import max_err, requires_cpp
from inputs import ATTENTION_MASK_KINDS, attention_mask, qkv

pytestmark = requires_cpp

def _outs(fn, q, k, v, mask, export):
    res = fn(q, k, v, attn_mask=mask, export=export, return_lse=True)
    return list(res)


def _grads(outs, inputs, up):
    # -inf LSE rows (fully masked) get no upstream gradient: d(-inf) has no meaning.
    total = sum((g * o.masked_fill(~torch.isfinite(o), 0)).sum() for g, o in zip(up, outs))
    return torch.autograd.grad(total, inputs, allow_unused=True)


@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 2, 65, 16), (2, 1, 300, 24)])
@pytest.mark.parametrize("kind", ATTENTION_MASK_KINDS)
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_float64_matches_reference_with_all_gradients(shape, kind, export):
    B, H, N, _ = shape
    q, k, v = qkv(shape)
    mask = attention_mask(kind, B, H, N)
    inputs = [q, k, v] + ([mask] if mask.dtype != torch.bool else [])
    ref = _outs(attention_ref, q, k, v, mask, export)
    got = _outs(lambda *a, **kw: attention(*a, backend="cpp", **kw), q, k, v, mask, export)
    for name, a, b in zip(("out", "maps", "lse"), got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        assert max_err(a.masked_fill(~torch.isfinite(a), 0), b.masked_fill(~torch.isfinite(b), 0)) < 1e-12, name
    up = [torch.randn_like(r) for r in ref]
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), _grads(got, inputs, up), _grads(ref, inputs, up)):
        assert a.shape == b.shape, name
        assert max_err(a, b) < 1e-11, name


@pytest.mark.parametrize("export", ["full", "cls", "key_mean"])
def test_masked_entries_and_dead_rows_are_exact_zeros(export):
    B, H, N = 2, 3, 17
    q, k, v = qkv((B, H, N, 8))
    mask = attention_mask("per_head_bool", B, H, N)
    out, maps, lse = attention(q, k, v, attn_mask=mask, export="full", return_lse=True,
                               backend="cpp")
    assert (maps[~mask.expand(B, H, N, N)] == 0).all()
    assert (maps[:, 0, N - 1] == 0).all() and (out[:, 0, N - 1] == 0).all()
    assert (lse[:, 0, N - 1] == float("-inf")).all() and torch.isfinite(lse[:, 1:]).all()
    _, maps_e = attention(q, k, v, attn_mask=mask, export=export, backend="cpp")
    assert torch.isfinite(maps_e).all()


def test_bool_mask_equals_minus_inf_bias_and_sdpa():
    B, H, N, D = 2, 3, 65, 16
    q, k, v = [t.detach() for t in qkv((B, H, N, D))]
    mask = attention_mask("key_padding", B, H, N)
    bias = torch.zeros(B, 1, 1, N, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    a = attention(q, k, v, attn_mask=mask, backend="cpp")
    b = attention(q, k, v, attn_mask=bias, backend="cpp")
    assert torch.equal(a, b)
    # SDPA agrees wherever a row keeps a key (batch element 0 keeps one key in every row).
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert max_err(a, sdpa) < 1e-12


def test_mask_is_read_through_strides_never_copied():
    """A transposed (non-contiguous) bias and a broadcast one give what their dense copies give."""
    B, H, N = 2, 2, 17
    q, k, v = [t.detach() for t in qkv((B, H, N, 8))]
    bias = torch.randn(N, N, dtype=torch.float64).t()
    assert not bias.is_contiguous()
    dense = bias.contiguous().expand(B, H, N, N).contiguous()
    assert torch.equal(attention(q, k, v, attn_mask=bias, backend="cpp"),
                       attention(q, k, v, attn_mask=dense, backend="cpp"))


def test_float_bias_gradient_is_summed_over_broadcast_axes():
    B, H, N = 3, 2, 17
    q, k, v = qkv((B, H, N, 8))
    for shape in [(N, N), (1, H, N, N), (B, 1, 1, N), (H, 1, N)]:
        bias = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(attention(q, k, v, attn_mask=bias, backend="cpp").sum(), bias)
        (want,) = torch.autograd.grad(attention_ref(q, k, v, attn_mask=bias).sum(), bias)
        assert g.shape == bias.shape and max_err(g, want) < 1e-12


@pytest.mark.slow
def test_gradcheck_with_a_learned_bias():
    q, k, v = qkv((1, 2, 6, 4))
    bias = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, b: attention(q, k, v, attn_mask=b, export="full", return_lse=True,
                                     backend="cpp"),
        (q, k, v, bias),
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["key_padding", "shared_bias"])
def test_opcheck(kind):
    B, H, N = 2, 3, 17
    q, k, v = qkv((B, H, N, 8))
    mask = attention_mask(kind, B, H, N, dead_row=False)
    torch.library.opcheck(torch.ops.fastattnreg.attention_fwd.default,
                          (q, k, v, mask, None, 0.3, "full", 0.0))
    q, k, v, mask = q.detach(), k.detach(), v.detach(), mask.detach()
    out, lse, maps = torch.ops.fastattnreg.attention_fwd(q, k, v, mask, None, 0.3, "full", 0.0)
    grad = mask.dtype != torch.bool
    args = (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), torch.randn_like(maps),
            mask, None, 0.3, "full", 0.0, grad)
    torch.library.opcheck(torch.ops.fastattnreg.attention_bwd.default, args)


@pytest.mark.slow
def test_compile_fullgraph_with_a_mask():
    torch._dynamo.reset()
    B, H, N = 2, 3, 17
    q, k, v = qkv((B, H, N, 8))
    bias = attention_mask("shared_bias", B, H, N, dead_row=False)

    def loss_fn(q, k, v, bias):
        out, maps = attention(q, k, v, attn_mask=bias, export="key_mean")
        return out.square().sum() + maps.square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    want = torch.autograd.grad(loss_fn(q, k, v, bias), (q, k, v, bias))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_reruns_are_bitwise_equal():
    B, H, N = 4, 6, 197
    q, k, v = qkv((B, H, N, 64), torch.float32)
    bias = torch.randn(1, H, N, N, requires_grad=True)

    def run():
        out, maps = attention(q, k, v, attn_mask=bias, export="head_mean", backend="cpp")
        return [out, maps] + list(torch.autograd.grad(out.sum() + maps.sum(), (q, k, v, bias)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["key_padding", "full_bias"])
def test_bfloat16_error_at_most_twice_the_references(kind):
    B, H, N, D = 2, 3, 65, 32
    q64, k64, v64 = qkv((B, H, N, D))
    mask64 = attention_mask(kind, B, H, N, dead_row=False)
    ref = attention_ref(q64, k64, v64, attn_mask=mask64, export="full")
    q, k, v = [t.detach().bfloat16() for t in (q64, k64, v64)]
    mask = mask64.detach().bfloat16() if mask64.dtype != torch.bool else mask64
    pt = attention_ref(q, k, v, attn_mask=mask, export="full", upcast=False)
    got = attention(q, k, v, attn_mask=mask, export="full", backend="cpp")
    for a, p, want in zip(got, pt, ref):
        assert max_err(a, want) <= 2 * max_err(p, want) + 1e-6


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.ones(2, 3, 17, 17, dtype=torch.int64), r"attn_mask must be torch.bool .* got torch.int64"),
        (torch.ones(17, dtype=torch.bool), r"attn_mask must have 2 to 4 dims .*\(2, 3, 17, 17\).* got shape \(17,\)"),
        (torch.ones(2, 3, 17, 16, dtype=torch.bool), r"attn_mask of shape \(2, 3, 17, 16\) does not broadcast to .*\(2, 3, 17, 17\)"),
        (torch.ones(1, 1, 17, 17, dtype=torch.float32), r"attn_mask must be torch.bool .*float64.* got torch.float32"),
        (torch.ones(17, 17, dtype=torch.bool, device="meta"), r"attn_mask must be on q's device cpu; got meta"),
    ],
)
def test_bad_masks_are_named(mask, match):
    q, k, v = qkv((2, 3, 17, 8))
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, attn_mask=mask, backend="cpp")


def test_the_raw_op_checks_masks_too():
    q, k, v = [t.detach() for t in qkv((2, 3, 17, 8))]
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, H, N, N\) = \[2, 3, 17, 17\]"):
        torch.ops.fastattnreg.attention_fwd(q, k, v, torch.ones(4, 17, 17, dtype=torch.bool),
                                            None, 0.3, "none", 0.0)
    with pytest.raises(ValueError, match=r"attn_mask must be bool .* got Float"):
        torch.ops.fastattnreg.attention_fwd(q, k, v, torch.ones(17, 17), None, 0.3, "none", 0.0)
