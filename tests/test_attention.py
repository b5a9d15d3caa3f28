"""attention() on the C++ backend against attention_ref: values, maps, LSE and every gradient."""
import itertools

import pytest
import torch

from fastattnreg import attention, attention_ref
from fastattnreg.ops.checks import ATTENTION_EXPORTS
from conftest import max_err, requires_cpp
from inputs import HEAD_DIMS, SEQ_LENS, grid_shape, qkv

pytestmark = requires_cpp



def _run(fn, q, k, v, export):
    """Calls fn with export and LSE, returns the outputs as a list (out, [maps], lse)."""
    res = fn(q, k, v, export=export, return_lse=True)
    return list(res)


def _outputs_and_grads(fn, q, k, v, export, upstream):
    outs = _run(fn, q, k, v, export)
    grads = torch.autograd.grad(outs, (q, k, v), [g.to(o.dtype) for g, o in zip(upstream, outs)])
    return outs, grads


def _upstream(outs):
    return [torch.randn(o.shape, dtype=torch.float64) for o in outs]


def _float64_case(n, d, export):
    """q, k, v in float64 at grid point (n, d), random upstream gradients, and the reference's
    outputs and gradients under them."""
    q64, k64, v64 = qkv(grid_shape(n, d), torch.float64)
    up = _upstream(_run(attention_ref, q64, k64, v64, export))
    ref_outs, ref_grads = _outputs_and_grads(attention_ref, q64, k64, v64, export, up)
    return (q64, k64, v64), up, list(ref_outs) + list(ref_grads)


def _cpp(*args, **kwargs):
    return attention(*args, backend="cpp", **kwargs)


@pytest.mark.parametrize("n,d", list(itertools.product(SEQ_LENS, HEAD_DIMS)))
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_float64_matches_reference_with_all_gradients(n, d, export):
    (q, k, v), up, want = _float64_case(n, d, export)
    outs, grads = _outputs_and_grads(_cpp, q, k, v, export, up)
    ref_outs, ref_grads = want[:len(outs)], want[len(outs):]
    for name, got, ref in zip(("out", "maps", "lse"), outs, ref_outs):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert max_err(got, ref) < 1e-12, name
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert max_err(got, ref) < 1e-11, name


@pytest.mark.parametrize("n,d", [(1, 16), (17, 48), (65, 64), (197, 80), (257, 64)])
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_float32_within_1e5_of_float64_reference(n, d, export):
    inputs64, up, want = _float64_case(n, d, export)
    q, k, v = [t.detach().float().requires_grad_() for t in inputs64]
    outs, grads = _outputs_and_grads(_cpp, q, k, v, export, up)
    for got, ref in zip(list(outs) + list(grads), want):
        assert max_err(got, ref) <= 1e-5


@pytest.mark.parametrize("n,d", [(1, 16), (17, 48), (65, 64), (197, 80), (257, 16)])
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_bfloat16_error_at_most_twice_the_references(n, d, export):
    """FlashAttention's rule: error vs float64 <= 2x the error of the reference run in bf16."""
    inputs64, up, want = _float64_case(n, d, export)
    q, k, v = [t.detach().bfloat16().requires_grad_() for t in inputs64]

    def ref_bf16(*a, **kw):
        return attention_ref(*a, upcast=False, **kw)

    pt_outs, pt_grads = _outputs_and_grads(ref_bf16, q, k, v, export, up)
    outs, grads = _outputs_and_grads(_cpp, q, k, v, export, up)
    for got, pt, ref in zip(list(outs) + list(grads), list(pt_outs) + list(pt_grads), want):
        assert got.dtype == pt.dtype
        # The 1e-5 floor only matters where both errors are zero (N = 1: out == v exactly).
        assert max_err(got, ref) <= 2 * max_err(pt, ref) + 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_gradcheck_float64(export):
    q, k, v = qkv((2, 2, 6, 8), torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attention(q, k, v, export=export, return_lse=True, backend="cpp"),
        (q, k, v),
    )


@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
def test_reruns_are_bitwise_equal(export):
    """Several threads work on a shape with many heads; two runs must agree to the bit."""
    q, k, v = qkv((4, 6, 197, 64), torch.float32)

    def run():
        outs = _run(_cpp, q, k, v, export)
        up = [torch.ones_like(o) for o in outs]
        return outs + list(torch.autograd.grad(outs, (q, k, v), up))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_maps_are_probabilities_and_consistent():
    q, k, v = qkv((2, 3, 65, 16), torch.float64, requires_grad=False)
    _, full = attention(q, k, v, export="full", backend="cpp")
    _, head_mean = attention(q, k, v, export="head_mean", backend="cpp")
    _, cls = attention(q, k, v, export="cls", backend="cpp")
    _, key_mean = attention(q, k, v, export="key_mean", backend="cpp")
    assert torch.allclose(full.sum(-1), torch.ones(2, 3, 65, dtype=torch.float64))
    assert (full >= 0).all()
    assert torch.allclose(head_mean, full.mean(1), atol=1e-15)
    assert torch.equal(cls, full[:, :, 0, :])
    assert torch.allclose(key_mean, full.mean(2), atol=1e-15)


def test_noncontiguous_inputs_match_contiguous():
    """q, k, v as timm makes them: views of one qkv projection, permuted."""
    B, N, H, D = 2, 17, 3, 16
    qkv = torch.randn(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    out, maps = attention(q, k, v, export="full", backend="cpp")
    out_c, maps_c = attention(q.contiguous(), k.contiguous(), v.contiguous(), export="full", backend="cpp")
    assert torch.equal(out, out_c) and torch.equal(maps, maps_c)


def test_custom_scale_and_gradient_through_maps_only():
    q, k, v = qkv((1, 2, 17, 16), torch.float64)
    _, maps = attention(q, k, v, scale=0.3, export="cls", backend="cpp")
    _, ref_maps = attention_ref(q, k, v, scale=0.3, export="cls")
    g = torch.randn_like(maps)
    got = torch.autograd.grad(maps, (q, k, v), g)
    want = torch.autograd.grad(ref_maps, (q, k, v), g, allow_unused=True)
    assert max_err(got[0], want[0]) < 1e-12 and max_err(got[1], want[1]) < 1e-12
    assert got[2].abs().max() == 0  # v does not reach the maps


def test_auto_backend_and_env_override(monkeypatch):
    q, k, v = qkv((1, 2, 17, 16), torch.float32, requires_grad=False)
    out_auto = attention(q, k, v)
    assert torch.equal(out_auto, attention(q, k, v, backend="cpp"))
    monkeypatch.setenv("FASTATTNREG_BACKEND", "reference")
    assert torch.equal(attention(q, k, v), attention_ref(q, k, v))


@pytest.mark.parametrize("used", ["out", "maps", "lse"])
def test_unused_outputs_send_no_gradient_to_the_kernel(used, monkeypatch):
    """Autograd must hand the kernel None, not a zero tensor, for outputs that are not used:
    a zero (B, H, N, N) map gradient would cost the memory the fused kernel exists to avoid."""
    q, k, v = qkv((1, 2, 17, 16), torch.float32)
    out, maps, lse = attention(q, k, v, export="full", return_lse=True, backend="cpp")
    real_bwd = torch.ops.fastattnreg.attention_bwd
    seen = {}

    def spy(dout, q, k, v, o, lse_, dlse, dmaps, *rest):
        seen.update(dout=dout is not None, dlse=dlse is not None, dmaps=dmaps is not None)
        return real_bwd(dout, q, k, v, o, lse_, dlse, dmaps, *rest)

    class Ops:
        attention_bwd = staticmethod(spy)

    monkeypatch.setattr(torch.ops, "fastattnreg", Ops)
    {"out": out, "maps": maps, "lse": lse}[used].sum().backward()
    assert seen == {"dout": used == "out", "dlse": used == "lse", "dmaps": used == "maps"}
