"""refined_attention(backend="triton"): the Triton kernels against refined_attention_ref.

  * interpreter (any machine with Triton): tests/triton_refiner_cases.py runs on CPU tensors in a
    child process with TRITON_INTERPRET=1 (set before Triton defines the kernels); a failure
    shows the child's report.
  * CUDA (skipped without a GPU): the shapes of test_refiner.py in float32 against float64,
    float16/bfloat16 within twice the eager reference's own error in that dtype (both against
    float64), opcheck and torch.compile(fullgraph=True) of the triton_op registration, the
    exported maps of A* and the gradients through them.
"""
import pytest
import torch

from fastattnreg import refined_attention, refined_attention_ref
from fastattnreg.ops.checks import REFINER_EXPORTS
from conftest import TESTS, max_err
from conftest import requires_cuda_triton as requires_cuda  # CUDA tests of the Triton kernels
from interpreter_runner import interpreted_cases
from inputs import REFINER_PARAM_NAMES, refiner_inputs
from refiner_checks import clone_running, run_with_grads

CASES = TESTS / "triton_refiner_cases.py"


test_interpreted_kernels = interpreted_cases(CASES)


# --------------------------------------------------------------------------------------- CUDA


def _cuda(qkv, params, running, dtype):
    f = lambda ts: [t.detach().to("cuda", dtype).requires_grad_() for t in ts]  # noqa: E731
    return f(qkv), f(params), ([t.to("cuda", dtype) for t in running[0]],
                               [t.to("cuda", dtype) for t in running[1]])


@requires_cuda
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n,b,h", [(17, 2, 3), (65, 2, 2), (197, 1, 2)])
@pytest.mark.parametrize("ksize,expansion", [(3, 1), (3, 3), (5, 2), (5, 4)])
def test_cuda_float32_against_float64(training, n, b, h, ksize, expansion):
    qkv, params, running = refiner_inputs(b, h, n, 32, expansion, ksize, seed=n + ksize)
    dout = torch.randn(b, h, n, 32, dtype=torch.float64)
    mask = torch.rand(b, h, n, n) >= 0.1
    kw = {"training": training, "momentum": 0.3, "eps": 1e-4, "attn_drop": 0.1, "drop_mask": mask}
    ref_running = clone_running(running)
    ref = run_with_grads(refined_attention_ref, qkv, params, ref_running, dout, **kw)
    qkv_c, params_c, running_c = _cuda(qkv, params, running, torch.float32)
    got = run_with_grads(refined_attention, qkv_c, params_c, running_c, dout.float().cuda(),
                         backend="triton", **{**kw, "drop_mask": mask.cuda()})
    tol = 2e-4  # 3xTF32 dots
    assert max_err(got[0].cpu(), ref[0]) <= tol * max(1.0, ref[0].abs().max().item())
    for a, r in zip(running_c[0] + running_c[1], ref_running[0] + ref_running[1]):
        assert max_err(a.cpu(), r) <= tol * max(1.0, r.abs().max().item())
    scale = max(g.abs().max().item() for g in ref[1])
    for name, g, r in zip(("dq", "dk", "dv") + REFINER_PARAM_NAMES, got[1], ref[1]):
        assert max_err(g.cpu(), r) <= tol * max(1e-2 * scale, r.abs().max().item()), name


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_low_precision_within_twice_pytorch_error(dtype):
    """Error against float64 at most twice that of the eager reference run in the same dtype."""
    qkv, params, running = refiner_inputs(2, 3, 65, 64, 3, 3, seed=11)
    dout = torch.randn(2, 3, 65, 64, dtype=torch.float64)
    ref = run_with_grads(refined_attention_ref, qkv, params, clone_running(running), dout,
                         training=True)
    results = []
    for backend in ("reference", "triton"):
        qkv_c, params_c, running_c = _cuda(qkv, params, running, dtype)
        results.append(run_with_grads(
            lambda *a, **k: (refined_attention_ref(*a, upcast=False, **k) if backend == "reference"
                             else refined_attention(*a, backend="triton", **k)),
            qkv_c, params_c, running_c, dout.to("cuda", dtype), training=True))
    for n, (r, e, t) in enumerate(zip((ref[0], *ref[1]), (results[0][0], *results[0][1]),
                                      (results[1][0], *results[1][1]))):
        assert max_err(t.cpu(), r) <= 2 * max_err(e.cpu(), r) + 1e-6, n


@pytest.mark.slow  # inductor compiles the kernels
@requires_cuda
def test_cuda_opcheck_and_compile_fullgraph():
    qkv, params, running = _cuda(*refiner_inputs(2, 2, 33, 32, 2, 3, seed=12), torch.float32)
    H, C = 2, 4
    args = (*qkv, params[0].reshape(C, H), params[1].reshape(C, 3, 3), params[2].reshape(H, C),
            torch.cat(params[3:7]), torch.cat(params[7:11]), torch.cat(running[0]),
            torch.cat(running[1]), None, [1e-5] * 4, 0.2, 1.0)
    torch.library.opcheck(torch.ops.fastattnreg.triton_refined_attention_fwd.default,
                          (*args, True, False, "none"))
    dout = torch.randn_like(qkv[0])
    eager = run_with_grads(refined_attention, qkv, params, clone_running(running), dout,
                           training=True, backend="triton")
    torch._dynamo.reset()
    fn = torch.compile(lambda *a, **k: refined_attention(*a, backend="triton", **k),
                       fullgraph=True)
    compiled = run_with_grads(fn, qkv, params, clone_running(running), dout, training=True)
    assert max_err(compiled[0], eager[0]) < 1e-5
    for a, b in zip(compiled[1], eager[1]):
        assert max_err(a, b) <= 1e-5 * max(1.0, b.abs().max().item())


@requires_cuda
@pytest.mark.parametrize("export", REFINER_EXPORTS[1:])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_maps_and_their_gradients_against_float64(training, export):
    qkv, params, running = refiner_inputs(2, 2, 65, 32, 3, 3, seed=13)
    kw = {"training": training, "export": export}
    ref_out, ref_maps = refined_attention_ref(*qkv, *params[:3], params[3:7], params[7:11],
                                              *clone_running(running), **kw)
    qkv_c, params_c, running_c = _cuda(qkv, params, running, torch.float32)
    out, maps = refined_attention(*qkv_c, *params_c[:3], params_c[3:7], params_c[7:11],
                                  *running_c, backend="triton", **kw)
    tol = 2e-4  # 3xTF32 dots
    assert max_err(maps.cpu(), ref_maps) <= tol * max(1.0, ref_maps.abs().max().item())
    dmaps = torch.randn(ref_maps.shape, dtype=torch.float64)
    want = torch.autograd.grad((ref_maps * dmaps).sum(), (*qkv, *params), allow_unused=True)
    got = torch.autograd.grad((maps * dmaps.float().cuda()).sum(), (*qkv_c, *params_c))
    scale = max(g.abs().max().item() for g in want if g is not None)
    for name, g, r in zip(("dq", "dk", "dv") + REFINER_PARAM_NAMES, got, want):
        r = torch.zeros_like(g.cpu(), dtype=torch.float64) if r is None else r
        assert max_err(g.cpu(), r) <= tol * max(1e-2 * scale, r.abs().max().item()), name
