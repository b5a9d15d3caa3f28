"""torch.library registration of the attention ops: opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

from fastattnreg import attention, attention_ref
from conftest import max_err, requires_cpp

pytestmark = requires_cpp


@pytest.mark.slow
@pytest.mark.parametrize("export", ["none", "full", "head_mean", "cls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_forward(export, dtype):
    q, k, v = [torch.randn(2, 3, 17, 16, dtype=dtype, requires_grad=True) for _ in range(3)]
    torch.library.opcheck(torch.ops.fastattnreg.attention_fwd.default,
                          (q, k, v, None, None, 0.25, export, 0.0))


@pytest.mark.slow
@pytest.mark.parametrize("export", ["none", "full", "head_mean", "cls"])
def test_opcheck_backward(export):
    q, k, v = [torch.randn(2, 3, 17, 16, dtype=torch.float64) for _ in range(3)]
    out, lse, maps = torch.ops.fastattnreg.attention_fwd(q, k, v, None, None, 0.25, export, 0.0)
    dmaps = torch.randn_like(maps) if export != "none" else None
    args = (torch.randn_like(out), q, k, v, out, lse, torch.randn_like(lse), dmaps, None, None,
            0.25, export, 0.0, False)
    torch.library.opcheck(torch.ops.fastattnreg.attention_bwd.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("export", [None, "head_mean", "cls"])
def test_compile_fullgraph_forward_and_backward(export):
    torch._dynamo.reset()
    q, k, v = [torch.randn(2, 3, 17, 16, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def loss_fn(q, k, v):
        res = attention(q, k, v, export=export, return_lse=True)
        return sum((r * r).sum() for r in res)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))

    def ref_loss(q, k, v):
        res = attention_ref(q, k, v, export=export, return_lse=True)
        return sum((r * r).sum() for r in res)

    ref = ref_loss(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    assert max_err(loss, ref) < 1e-10
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) < 1e-10


@pytest.mark.slow
def test_compile_inductor_fullgraph():
    """The default inductor backend also traces the op as one node."""
    torch._dynamo.reset()
    q, k, v = [torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3)]
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, export="full"), fullgraph=True)
    out, maps = compiled(q, k, v)
    ref_out, ref_maps = attention_ref(q, k, v, export="full")
    assert max_err(out, ref_out) < 1e-5 and max_err(maps, ref_maps) < 1e-5
    (out.sum() + maps.square().sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
