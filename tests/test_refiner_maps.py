"""refined_attention(export=...) on the C++ backend: the maps of the refined attention A* and
every gradient through them against refined_attention_ref in float64, plus gradcheck, opcheck,
torch.compile, bitwise reruns, the unused-gradient path and bad input."""
import pytest
import torch

from fastattnreg import refined_attention, refined_attention_ref
from fastattnreg.ops.checks import REFINER_EXPORTS
from conftest import max_err, requires_cpp
from inputs import REFINER_PARAM_NAMES, refiner_inputs
from refiner_checks import raw_args, call, clone_running

pytestmark = requires_cpp

EXPORTS = REFINER_EXPORTS[1:]  # every export that has maps (None has none)
NAMES = ("dq", "dk", "dv") + REFINER_PARAM_NAMES


def _maps_shape(b, h, n, export):
    return {"full": (b, h, n, n), "head_mean": (b, n, n), "cls": (b, h, n)}[export]


def _grads(out, maps, inputs, dout, dmaps):
    """Gradients of sum(dout * out) + sum(dmaps * maps) (a term is left out where its upstream
    gradient is None); an input the loss does not reach gets zeros."""
    terms = [(t * g).sum() for t, g in ((out, dout), (maps, dmaps)) if g is not None]
    grads = torch.autograd.grad(sum(terms), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@pytest.mark.parametrize("via", ["maps", "both"])
@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("ksize", [3, 5])
@pytest.mark.parametrize("shape", [(2, 3, 17, 8), (2, 2, 65, 16)], ids=["17", "65"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_maps_and_gradients_match_reference(training, shape, ksize, export, via):
    b, h, n, d = shape
    qkv, params, running = refiner_inputs(b, h, n, d, 3, ksize, seed=n + ksize)
    gen = torch.Generator().manual_seed(n)
    dout = torch.randn(shape, generator=gen, dtype=torch.float64) if via == "both" else None
    dmaps = torch.randn(_maps_shape(b, h, n, export), generator=gen, dtype=torch.float64)
    kw = {"training": training, "momentum": 0.3, "eps": 1e-4, "export": export}
    ref_running, cpp_running = clone_running(running), clone_running(running)
    ref_out, ref_maps = call(refined_attention_ref, qkv, params, ref_running, **kw)
    out, maps = call(refined_attention, qkv, params, cpp_running, backend="cpp", **kw)
    assert maps.shape == ref_maps.shape == _maps_shape(b, h, n, export)
    assert maps.dtype == torch.float64
    assert max_err(out, ref_out) < 1e-11
    assert max_err(maps, ref_maps) < 1e-11 * max(1.0, ref_maps.abs().max().item())
    for got, want in zip(cpp_running[0] + cpp_running[1], ref_running[0] + ref_running[1]):
        assert max_err(got, want) < 1e-12
    inputs = (*qkv, *params)
    want = _grads(ref_out, ref_maps, inputs, dout, dmaps)
    got = _grads(out, maps, inputs, dout, dmaps)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, name
        assert max_err(g, w) < 1e-9 * max(1.0, w.abs().max().item()), name
    # The maps' gradient reaches q, k, every conv weight and BatchNorm parameter (dv needs out).
    for name, g in zip(NAMES, got):
        if name != "dv" or via == "both":
            assert g.abs().max() > 0, name


@pytest.mark.parametrize("export", EXPORTS)
def test_maps_with_attention_dropout_match_reference_with_the_same_mask(export):
    qkv, params, running = refiner_inputs(2, 2, 17, 8, 2, 3, seed=3)
    mask = torch.rand(2, 2, 17, 17, generator=torch.Generator().manual_seed(1)) >= 0.3
    kw = {"training": True, "attn_drop": 0.3, "drop_mask": mask, "export": export}
    ref_out, ref_maps = call(refined_attention_ref, qkv, params, clone_running(running), **kw)
    out, maps = call(refined_attention, qkv, params, clone_running(running), backend="cpp", **kw)
    assert max_err(maps, ref_maps) < 1e-11 * max(1.0, ref_maps.abs().max().item())
    dmaps = torch.randn_like(maps)
    inputs = (*qkv, *params)
    for g, w in zip(_grads(out, maps, inputs, None, dmaps),
                    _grads(ref_out, ref_maps, inputs, None, dmaps)):
        assert max_err(g, w) < 1e-9 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("export", EXPORTS)
def test_maps_agree_with_each_other_and_out_uses_them(export):
    """head_mean and cls are views of the full map; out is the full map times v."""
    qkv, params, running = refiner_inputs(2, 3, 17, 8, 2, 3, seed=5)
    with torch.no_grad():
        out, full = call(refined_attention, qkv, params, clone_running(running), training=True,
                         export="full", backend="cpp")
        _, maps = call(refined_attention, qkv, params, clone_running(running), training=True,
                       export=export, backend="cpp")
    view = {"full": full, "head_mean": full.mean(1), "cls": full[:, :, 0]}[export]
    assert max_err(maps, view) < 1e-13
    assert max_err(out, full @ qkv[2]) < 1e-12


def test_bfloat16_maps_are_bfloat16_and_close():
    qkv64, params64, running64 = refiner_inputs(2, 2, 17, 16, 3, 3)
    _, want = call(refined_attention_ref, qkv64, params64, clone_running(running64),
                   training=True, export="full")
    bf = [t.detach().bfloat16() for t in qkv64 + params64]
    running_bf = ([t.bfloat16() for t in running64[0]], [t.bfloat16() for t in running64[1]])
    _, ref = call(refined_attention_ref, bf[:3], bf[3:], clone_running(running_bf),
                  training=True, export="full", upcast=False)
    _, maps = call(refined_attention, bf[:3], bf[3:], clone_running(running_bf), training=True,
                   export="full", backend="cpp")
    assert maps.dtype == torch.bfloat16
    assert max_err(maps, want) <= 2 * max_err(ref, want) + 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_through_out_and_maps(training, export):
    qkv, params, running = refiner_inputs(2, 2, 5, 3, 2, 3)

    def fn(*tensors):
        return call(refined_attention, tensors[:3], tensors[3:], clone_running(running),
                    training=training, export=export, backend="cpp")

    # fast_mode: random projections of the Jacobian; the full one costs ~30 s per case here.
    assert torch.autograd.gradcheck(fn, (*qkv, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def _raw_export_args(training, save_probs, export):
    return (*raw_args(training, save_probs, False)[:-1], export)


@pytest.mark.slow
@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_forward_and_backward_with_maps(training, export):
    args = _raw_export_args(training, True, export)
    torch.library.opcheck(torch.ops.fastattnreg.refined_attention_fwd.default, args)
    with torch.no_grad():
        out, probs, y, mean, var, maps = torch.ops.fastattnreg.refined_attention_fwd(*args)
    dmaps = torch.randn_like(maps)
    bwd_args = (torch.randn_like(out), *[t.detach() for t in args[:8]], probs, y, mean, var,
                *args[10:14], training, dmaps, export)
    torch.library.opcheck(torch.ops.fastattnreg.refined_attention_bwd.default, bwd_args)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph_with_export_matches_eager(training):
    qkv, params, running = refiner_inputs(2, 3, 17, 8, 3, 3, dtype=torch.float32)
    dout, dmaps = torch.randn(2, 3, 17, 8), torch.randn(2, 17, 17)

    def step(q, k, v, *p, rm, rv):
        return refined_attention(q, k, v, *p[:3], p[3:7], p[7:11], rm, rv, training=training,
                                 export="head_mean", backend="cpp")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_running, compiled_running = clone_running(running), clone_running(running)
    want = step(*qkv, *params, rm=eager_running[0], rv=eager_running[1])
    got = compiled(*qkv, *params, rm=compiled_running[0], rv=compiled_running[1])
    assert max_err(got[0], want[0]) < 1e-6 and max_err(got[1], want[1]) < 1e-6
    inputs = (*qkv, *params)
    for a, b in zip(_grads(*got, inputs, dout, dmaps), _grads(*want, inputs, dout, dmaps)):
        assert max_err(a, b) < 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("export", EXPORTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reruns_with_maps_are_bitwise_equal(training, export):
    qkv, params, running = refiner_inputs(3, 3, 40, 16, 3, 3, dtype=torch.float32)
    dout = torch.randn(3, 3, 40, 16)
    dmaps = torch.randn(_maps_shape(3, 3, 40, export))
    inputs = (*qkv, *params)

    def run():
        out, maps = call(refined_attention, qkv, params, clone_running(running),
                         training=training, export=export, backend="cpp")
        return out, maps, _grads(out, maps, inputs, dout, dmaps)

    first = run()
    again = run()
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert all(torch.equal(a, b) for a, b in zip(again[2], first[2]))


@pytest.mark.parametrize("used", ["out", "maps", "both"])
def test_backward_gets_none_for_an_unused_output(used, monkeypatch):
    """An unused map gets dmaps None (no (B, H, N, N) zeros); unused out a zero dout (B, H, N, D).
    Both give the reference's gradients."""
    qkv, params, running = refiner_inputs(1, 2, 17, 8, 2, 3)
    out, maps = call(refined_attention, qkv, params, clone_running(running), training=True,
                     export="full", backend="cpp")
    real_bwd = torch.ops.fastattnreg.refined_attention_bwd
    seen = {}

    def spy(dout, *rest):
        seen.update(dout_zero=not dout.any().item(), dmaps=rest[-2] is not None)
        return real_bwd(dout, *rest)

    class Ops:
        refined_attention_bwd = staticmethod(spy)

    monkeypatch.setattr(torch.ops, "fastattnreg", Ops)
    loss = {"out": out.sum(), "maps": maps.sum(), "both": out.sum() + maps.sum()}[used]
    loss.backward()
    assert seen == {"dout_zero": used == "maps", "dmaps": used != "out"}


def test_no_export_allocates_no_maps():
    out, *_, maps = torch.ops.fastattnreg.refined_attention_fwd(*raw_args(True, False, False))
    assert maps.shape == (0,)


# ---------------------------------------------------------------------------------- bad input


def test_unknown_export_raises_a_named_value_error():
    qkv, params, running = refiner_inputs(1, 2, 9, 4, 2, 3)
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match=r"export must be one of .*got 'rows'"):
            call(refined_attention, qkv, params, running, training=True, export="rows",
                 backend=backend)
    with pytest.raises(ValueError, match=r"export must be one of .*got 'rows'"):
        call(refined_attention_ref, qkv, params, running, training=True, export="rows")
    with pytest.raises(ValueError, match="export must be one of 'none', 'full', 'head_mean', "
                                         "'cls'; got 'rows'"):
        torch.ops.fastattnreg.refined_attention_fwd(*_raw_export_args(True, False, "rows"))


def test_raw_backward_checks_dmaps_and_export():
    args = _raw_export_args(True, False, "cls")
    with torch.no_grad():
        out, probs, y, mean, var, maps = torch.ops.fastattnreg.refined_attention_fwd(*args)
    assert maps.shape == (2, 2, 9)
    head = (torch.randn_like(out), *[t.detach() for t in args[:8]], probs, y, mean, var,
            *args[10:14], True)
    bwd = torch.ops.fastattnreg.refined_attention_bwd
    with pytest.raises(ValueError, match=r"dmaps must have shape \[2, 2, 9\]; got \[2, 2, 9, 9\]"):
        bwd(*head, torch.zeros(2, 2, 9, 9, dtype=torch.float64), "cls")
    with pytest.raises(ValueError, match="dmaps must be Double; got Float"):
        bwd(*head, torch.zeros(2, 2, 9), "cls")
    with pytest.raises(ValueError, match="dmaps was given but export is 'none'"):
        bwd(*head, torch.zeros(2, 2, 9, dtype=torch.float64), "none")
    with pytest.raises(ValueError, match="export must be one of .*got 'row0'"):
        bwd(*head, None, "row0")
