"""attention(dropout_p=...) on the C++ backend: the in-kernel counter-based stream
(ops/dropout.py), regenerated in the backward, exact against the reference given that mask."""
import pytest
import torch

from fastattnreg import attention, attention_ref
from fastattnreg.ops.checks import ATTENTION_EXPORTS
from fastattnreg.ops.dropout import dropout_keep_mask, dropout_threshold, philox4x32
from conftest import max_err, requires_cpp
from inputs import qkv

pytestmark = requires_cpp



def _fwd(q, k, v, rng, p, export="none", mask=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.fastattnreg.attention_fwd(q, k, v, mask, rng, scale, export, p)


def test_philox_matches_the_published_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(w) for w in philox4x32(z, z, z, z, 0, 0)] == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(w) for w in philox4x32(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_threshold_edges():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    assert dropout_threshold(1.0 - 1e-12) == 2**32 - 1


@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 2, 65, 16), (1, 1, 197, 8), (1, 1, 253, 4)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kernel_mask_is_the_reference_stream(shape, p):
    """v = one-hot columns (D = N) makes out = P * keep / (1 - p): its zero pattern is the
    kernel's keep-mask, which must equal dropout_keep_mask bit for bit. N = 197 and 300 run the
    16-counter vector path; odd N makes rows start inside a counter's four words."""
    B, H, N, _ = shape
    q, k = [torch.randn(B, H, N, 4, dtype=torch.float64) for _ in range(2)]
    v = torch.eye(N, dtype=torch.float64).expand(B, H, N, N).contiguous()
    q = torch.cat([q, torch.zeros(B, H, N, N - 4, dtype=torch.float64)], -1)
    k = torch.cat([k, torch.zeros(B, H, N, N - 4, dtype=torch.float64)], -1)
    rng = torch.tensor([0x1234_5678_9ABC, 987654321], dtype=torch.int64)
    out = _fwd(q, k, v, rng, p)[0]
    keep = dropout_keep_mask((B, H, N, N), p, rng)
    assert torch.equal(out != 0, keep)
    assert abs(keep.double().mean().item() - (1 - p)) < 0.05


@pytest.mark.parametrize("export", ATTENTION_EXPORTS)
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (1, 2, 300, 24)])
def test_forward_and_gradients_exact_given_the_mask(shape, export):
    p = 0.3
    q, k, v = qkv(shape)
    bias = torch.randn(shape[2], shape[2], dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    got = attention(q, k, v, attn_mask=bias, dropout_p=p, export=export, return_lse=True,
                    backend="cpp")
    torch.manual_seed(7)
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64)  # the draw attention() makes
    keep = dropout_keep_mask((*shape[:3], shape[2]), p, rng)
    want = attention_ref(q, k, v, attn_mask=bias, dropout_p=p, dropout_mask=keep, export=export,
                         return_lse=True)
    for a, b in zip(got, want):
        assert max_err(a, b) < 1e-12
    up = [torch.randn_like(w) for w in want]
    ga = torch.autograd.grad(got, (q, k, v, bias), up)
    gb = torch.autograd.grad(want, (q, k, v, bias), up)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), ga, gb):
        assert max_err(a, b) < 1e-11, name


def test_p_zero_is_bitwise_the_plain_path():
    q, k, v = qkv((2, 3, 65, 16), torch.float32)
    a = attention(q, k, v, dropout_p=0.0, export="full", backend="cpp")
    b = attention(q, k, v, export="full", backend="cpp")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ga = torch.autograd.grad(a[0].sum() + a[1].sum(), (q, k, v))
    gb = torch.autograd.grad(b[0].sum() + b[1].sum(), (q, k, v))
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_maps_and_lse_are_those_before_dropout():
    q, k, v = qkv((2, 3, 17, 8))
    _, maps, lse = attention(q, k, v, dropout_p=0.5, export="full", return_lse=True, backend="cpp")
    _, maps0, lse0 = attention(q, k, v, export="full", return_lse=True, backend="cpp")
    assert torch.equal(maps, maps0) and torch.equal(lse, lse0)


def test_repeatable_under_manual_seed_and_different_across_draws():
    q, k, v = qkv((2, 3, 65, 16), torch.float32)

    def run(seed):
        torch.manual_seed(seed)
        out = attention(q, k, v, dropout_p=0.2, backend="cpp")
        return [out] + list(torch.autograd.grad(out.square().sum(), (q, k, v)))

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.slow
def test_mean_of_many_draws_approaches_the_eval_output():
    q, k, v = [t.detach() for t in qkv((1, 2, 17, 8))]
    want = attention(q, k, v, backend="cpp")
    mean = sum(attention(q, k, v, dropout_p=0.2, backend="cpp") for _ in range(4000)) / 4000
    assert max_err(mean, want) < 0.05
    assert max_err(attention(q, k, v, dropout_p=0.2, backend="cpp"), want) > 0.1


@pytest.mark.slow
def test_gradcheck_with_dropout():
    q, k, v = qkv((1, 2, 6, 4))
    rng = torch.tensor([11, 22], dtype=torch.int64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: _fwd(q, k, v, rng, 0.4, "full")[:3:2], (q, k, v))


@pytest.mark.slow
def test_opcheck_with_dropout():
    q, k, v = [t.detach() for t in qkv((2, 3, 17, 8))]
    rng = torch.tensor([5, 6], dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastattnreg.attention_fwd.default,
                          (q, k, v, None, rng, 0.3, "cls", 0.25))
    out, lse, maps = _fwd(q, k, v, rng, 0.25, "cls", scale=0.3)
    args = (torch.randn_like(out), q, k, v, out, lse, None, torch.randn_like(maps), None, rng,
            0.3, "cls", 0.25, False)
    torch.library.opcheck(torch.ops.fastattnreg.attention_bwd.default, args)


@pytest.mark.slow
def test_compile_fullgraph_with_dropout_matches_eager_under_the_same_seed():
    torch._dynamo.reset()
    q, k, v = qkv((2, 3, 17, 8))

    def loss_fn(q, k, v):
        return attention(q, k, v, dropout_p=0.3).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    torch.manual_seed(1)
    want = torch.autograd.grad(loss_fn(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan"), True, "0.1"])
def test_bad_dropout_p_is_named(p):
    q, k, v = qkv((1, 1, 5, 4))
    with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\); got"):
        attention(q, k, v, dropout_p=p, backend="cpp")


def test_the_raw_op_checks_dropout_too():
    q, k, v = [t.detach() for t in qkv((1, 1, 5, 4))]
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got 1"):
        _fwd(q, k, v, torch.tensor([1, 2]), 1.0)
    with pytest.raises(ValueError, match=r"needs rng"):
        _fwd(q, k, v, None, 0.5)
    with pytest.raises(ValueError, match=r"rng must be a CPU int64 tensor of shape \[2\]"):
        _fwd(q, k, v, torch.tensor([1, 2, 3]), 0.5)
