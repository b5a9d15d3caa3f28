"""refined_attention() on the C++ backend against refined_attention_ref: outputs, running
statistics and every gradient, plus gradcheck, opcheck, torch.compile, reruns and bad input."""
import threading

import pytest
import torch

from fastattnreg import refined_attention, refined_attention_ref
from conftest import max_err, requires_cpp, rerun_without_triton_interpreter
from inputs import REFINER_PARAM_NAMES, refiner_inputs
from refiner_checks import call, clone_running, raw_args, run_with_grads

pytestmark = requires_cpp

# (N, B, H): CLS + 4x4, 8x8 and 14x14 patch grids; small B and H where N is large.
SHAPES = ((17, 2, 3), (65, 2, 2), (197, 1, 2))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("n,b,h", SHAPES)
@pytest.mark.parametrize("ksize", [3, 5])
@pytest.mark.parametrize("expansion", [1, 2, 3, 4])
def test_float64_matches_reference(training, n, b, h, ksize, expansion):
    qkv, params, running = refiner_inputs(b, h, n, 16, expansion, ksize, seed=n + ksize + expansion)
    dout = torch.randn(b, h, n, 16, dtype=torch.float64)
    ref_running, cpp_running = clone_running(running), clone_running(running)
    ref_out, ref_grads = run_with_grads(refined_attention_ref, qkv, params, ref_running, dout,
                                        training=training, momentum=0.3, eps=1e-4)
    out, grads = run_with_grads(refined_attention, qkv, params, cpp_running, dout,
                                training=training, momentum=0.3, eps=1e-4, backend="cpp")
    assert out.dtype == torch.float64 and max_err(out, ref_out) < 1e-11
    for got, want in zip(cpp_running[0] + cpp_running[1], ref_running[0] + ref_running[1]):
        assert max_err(got, want) < 1e-12
    if not training:  # eval mode reads the running statistics and leaves them alone
        for got, want in zip(cpp_running[0] + cpp_running[1], running[0] + running[1]):
            assert torch.equal(got, want)
    for name, got, want in zip(("dq", "dk", "dv") + REFINER_PARAM_NAMES, grads, ref_grads):
        assert got.shape == want.shape, name
        assert max_err(got, want) < 1e-9 * max(1.0, want.abs().max().item()), name


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ksize", [1, 7, 9])  # the unrolled K = 7 path and the run-time-K path
def test_other_kernel_sizes_match_reference(training, ksize):
    qkv, params, running = refiner_inputs(2, 2, 17, 16, 2, ksize, seed=ksize)
    dout = torch.randn(2, 2, 17, 16, dtype=torch.float64)
    ref_out, ref_grads = run_with_grads(refined_attention_ref, qkv, params,
                                        clone_running(running), dout, training=training)
    out, grads = run_with_grads(refined_attention, qkv, params, clone_running(running), dout,
                                training=training, backend="cpp")
    assert max_err(out, ref_out) < 1e-11
    for name, got, want in zip(("dq", "dk", "dv") + REFINER_PARAM_NAMES, grads, ref_grads):
        assert max_err(got, want) < 1e-9 * max(1.0, want.abs().max().item()), name


@pytest.mark.parametrize("n", [17, 65])
def test_attention_dropout_matches_reference_with_the_same_mask(n):
    qkv, params, running = refiner_inputs(2, 2, n, 8, 3, 3)
    dout = torch.randn(2, 2, n, 8, dtype=torch.float64)
    results = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(7)  # both backends draw the same keep-mask from torch's generator
        results.append(run_with_grads(refined_attention, qkv, params, clone_running(running),
                                      dout, training=True, attn_drop=0.4, backend=backend))
    (ref_out, ref_grads), (out, grads) = results
    assert max_err(out, ref_out) < 1e-11
    for got, want in zip(grads, ref_grads):
        assert max_err(got, want) < 1e-9 * max(1.0, want.abs().max().item())
    torch.manual_seed(8)  # another mask gives another output: dropout is really applied
    other = call(refined_attention, qkv, params, clone_running(running), training=True,
                 attn_drop=0.4, backend="cpp")
    assert max_err(other, out) > 1e-3


def test_attention_dropout_is_off_in_eval_mode():
    qkv, params, running = refiner_inputs(1, 2, 17, 8, 2, 3)
    a = call(refined_attention, qkv, params, running, training=False, attn_drop=0.5, backend="cpp")
    b = call(refined_attention, qkv, params, running, training=False, backend="cpp")
    assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_error_at_most_twice_the_references(training):
    """Error against float64 at most 2x that of the reference run in float32 (plus 1e-6)."""
    qkv64, params64, running64 = refiner_inputs(2, 3, 65, 32, 3, 3)
    dout = torch.randn(2, 3, 65, 32, dtype=torch.float64)
    want_out, want_grads = run_with_grads(refined_attention_ref, qkv64, params64,
                                          clone_running(running64), dout, training=training)
    to32 = [t.detach().float().requires_grad_() for t in qkv64 + params64]
    qkv32, params32 = to32[:3], to32[3:]
    running32 = ([t.float() for t in running64[0]], [t.float() for t in running64[1]])
    outs = {}
    for name, fn, kw in (("ref", refined_attention_ref, {}), ("cpp", refined_attention, {"backend": "cpp"})):
        outs[name] = run_with_grads(fn, qkv32, params32, clone_running(running32), dout.float(),
                                    training=training, **kw)
    for i, want in enumerate([want_out, *want_grads]):
        ref_err = max_err(([outs["ref"][0]] + list(outs["ref"][1]))[i], want)
        cpp_err = max_err(([outs["cpp"][0]] + list(outs["cpp"][1]))[i], want)
        assert cpp_err <= 2 * ref_err + 1e-6 * max(1.0, want.abs().max().item()), i


def test_bfloat16_runs_in_float32_and_is_close():
    qkv64, params64, running64 = refiner_inputs(2, 2, 17, 16, 3, 3)
    want = call(refined_attention_ref, qkv64, params64, clone_running(running64), training=True)
    bf = [t.detach().bfloat16() for t in qkv64 + params64]
    running_bf = ([t.bfloat16() for t in running64[0]], [t.bfloat16() for t in running64[1]])
    ref = call(refined_attention_ref, bf[:3], bf[3:], clone_running(running_bf), training=True,
               upcast=False)
    out = call(refined_attention, bf[:3], bf[3:], clone_running(running_bf), training=True,
               backend="cpp")
    assert out.dtype == torch.bfloat16
    assert max_err(out, want) <= 2 * max_err(ref, want) + 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ksize,n", [(3, 5), (5, 4)])
def test_gradcheck(training, ksize, n):
    qkv, params, running = refiner_inputs(2, 2, n, 3, 2, ksize)

    def fn(*tensors):
        return call(refined_attention, tensors[:3], tensors[3:], clone_running(running),
                    training=training, backend="cpp")

    assert torch.autograd.gradcheck(fn, (*qkv, *params), eps=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("training,save_probs,dropout",
                         [(True, False, False), (True, False, True), (False, True, False),
                          (False, False, False)])
def test_opcheck(training, save_probs, dropout):
    args = raw_args(training, save_probs, dropout)
    torch.library.opcheck(torch.ops.fastattnreg.refined_attention_fwd.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph_matches_eager(training):
    qkv, params, running = refiner_inputs(2, 3, 17, 8, 3, 3, dtype=torch.float32)
    dout = torch.randn(2, 3, 17, 8)
    eager_running, compiled_running = clone_running(running), clone_running(running)

    def step(q, k, v, *p, rm, rv):
        return refined_attention(q, k, v, *p[:3], p[3:7], p[7:11], rm, rv, training=training,
                                 backend="cpp")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = step(*qkv, *params, rm=eager_running[0], rv=eager_running[1])
    got = compiled(*qkv, *params, rm=compiled_running[0], rv=compiled_running[1])
    assert max_err(got, want) < 1e-6
    g_want = torch.autograd.grad(want, (*qkv, *params), dout)
    g_got = torch.autograd.grad(got, (*qkv, *params), dout)
    for a, b in zip(g_got, g_want):
        assert max_err(a, b) < 1e-5 * max(1.0, b.abs().max().item())
    for a, b in zip(compiled_running[0] + compiled_running[1], eager_running[0] + eager_running[1]):
        assert max_err(a, b) < 1e-7  # the running statistics were updated inside the graph too


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_reruns_are_bitwise_equal(training):
    qkv, params, running = refiner_inputs(3, 3, 40, 16, 3, 3, dtype=torch.float32)
    dout = torch.randn(3, 3, 40, 16)
    first = run_with_grads(refined_attention, qkv, params, clone_running(running), dout,
                           training=training, backend="cpp")
    for _ in range(2):
        again = run_with_grads(refined_attention, qkv, params, clone_running(running), dout,
                               training=training, backend="cpp")
        assert torch.equal(again[0], first[0])
        assert all(torch.equal(a, b) for a, b in zip(again[1], first[1]))


def test_scratch_kept_between_calls_stays_correct_across_shapes_and_threads():
    """The C++ kernels keep their planes and one scratch map from one call to the next
    (kept_cache.h): alternating shapes, kernel sizes and calls from several threads at once
    must give exactly what each call gives alone."""
    cases = [((2, 3, 40, 16, 3, 3), 0), ((1, 3, 40, 16, 3, 5), 1), ((2, 3, 40, 16, 2, 3), 2)]
    prepared = []
    for (b, h, n, d, expansion, ksize), seed in cases:
        qkv, params, running = refiner_inputs(b, h, n, d, expansion, ksize,
                                              dtype=torch.float32, seed=seed)
        dout = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(seed))
        alone = run_with_grads(refined_attention, qkv, params, clone_running(running), dout,
                               training=True, backend="cpp")
        prepared.append((qkv, params, running, dout, alone))

    def check(case, errors):
        qkv, params, running, dout, alone = case
        try:
            for _ in range(3):
                out, grads = run_with_grads(refined_attention, qkv, params,
                                            clone_running(running), dout, training=True,
                                            backend="cpp")
                if not (torch.equal(out, alone[0])
                        and all(torch.equal(a, b) for a, b in zip(grads, alone[1]))):
                    errors.append("differs")
        except Exception as exc:  # reported below, from the main thread
            errors.append(repr(exc))

    errors = []
    for case in prepared * 2:  # shapes alternating, one thread
        check(case, errors)
    threads = [threading.Thread(target=check, args=(case, errors)) for case in prepared * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_running_statistics_follow_batchnorm_momentum_and_unbiased_variance():
    """The update is checked against nn.BatchNorm2d itself on the BN_a input recomputed by the
    reference: running <- (1 - m) running + m * batch (unbiased variance)."""
    qkv, params, running = refiner_inputs(2, 2, 17, 8, 3, 3)
    rm0, rv0 = clone_running(running)
    rm, rv = clone_running(running)
    call(refined_attention, qkv, params, (rm, rv), training=True, momentum=[0.1, 0.2, 0.3, 0.5],
         backend="cpp")
    rm_ref, rv_ref = clone_running(running)
    call(refined_attention_ref, qkv, params, (rm_ref, rv_ref), training=True,
         momentum=[0.1, 0.2, 0.3, 0.5])
    for got, want, before in zip(rm + rv, rm_ref + rv_ref, rm0 + rv0):
        assert max_err(got, want) < 1e-12
        assert max_err(got, before) > 1e-4  # really updated


# ---------------------------------------------------------------------------------- bad input


def _bad(**changes):
    qkv, params, running = refiner_inputs(1, 2, 9, 4, 2, 3)
    args = {"q": qkv[0], "k": qkv[1], "v": qkv[2], "conv_exp_weight": params[0],
            "conv_dw_weight": params[1], "conv_pro_weight": params[2], "bn_weight": params[3:7],
            "bn_bias": params[7:11], "running_mean": running[0], "running_var": running[1]}
    kw = {"training": True, "backend": "cpp"}
    for key, value in changes.items():
        (args if key in args else kw)[key] = value
    return lambda: refined_attention(**args, **kw)


@pytest.mark.parametrize("changes,match", [
    ({"conv_dw_weight": torch.randn(4, 1, 4, 4, dtype=torch.float64)}, "kernel_size must be odd"),
    ({"conv_dw_weight": torch.randn(4, 1, 17, 17, dtype=torch.float64)}, r"in \[1, 15\]"),
    ({"conv_dw_weight": torch.randn(4, 2, 3, 3, dtype=torch.float64)}, "depthwise"),
    ({"conv_exp_weight": torch.randn(0, 2, 1, 1, dtype=torch.float64)}, "expansion >= 1"),
    ({"conv_exp_weight": torch.randn(4, 3, 1, 1, dtype=torch.float64)}, r"\(C, H, 1, 1\)"),
    ({"conv_pro_weight": torch.randn(2, 5, 1, 1, dtype=torch.float64)}, r"\(H, C, 1, 1\)"),
    ({"conv_exp_weight": torch.randn(4, 2, dtype=torch.float64)}, "4-D nn.Conv2d weight"),
    ({"conv_pro_weight": torch.randn(2, 4, 1, 1)}, "conv_pro_weight must have q's dtype"),
    ({"bn_weight": [torch.ones(4, dtype=torch.float64)] * 3}, "sequence of 4 tensors"),
    ({"bn_bias": [torch.ones(4, dtype=torch.float64)] * 4}, r"bn_bias of bn3 must have shape \(2,\)"),
    ({"bn_weight": [torch.ones(4), torch.ones(4), torch.ones(2), torch.ones(2)]}, "q's dtype"),
    ({"momentum": 1.5}, "momentum must be a number in"),
    ({"eps": -1.0}, "eps must be a finite number"),
    ({"attn_drop": 1.0}, "attn_drop must be a probability"),
    ({"drop_mask": torch.ones(1, 2, 9, 9)}, "drop_mask must be a bool tensor"),
    ({"k": torch.randn(1, 2, 9, 4)}, "must share one dtype"),
    ({"q": torch.randn(1, 2, 1, 4, dtype=torch.float64), "k": torch.randn(1, 2, 1, 4, dtype=torch.float64),
      "v": torch.randn(1, 2, 1, 4, dtype=torch.float64)}, "more than 1 value per channel"),
    ({"backend": "cuda"}, "backend must be one of"),
])
def test_bad_input_raises_a_named_value_error(changes, match):
    with pytest.raises(ValueError, match=match):
        _bad(**changes)()


def test_triton_backend_on_cpu_tensors_without_the_interpreter_raises_a_clear_error(request):
    # Without the interpreter: "is not available" (no CUDA device) or "runs CUDA tensors".
    if rerun_without_triton_interpreter(request):
        return
    with pytest.raises(RuntimeError, match="backend='triton'"):
        _bad(backend="triton")()


def test_backward_uses_the_kept_y_and_checks_it():
    """The training forward keeps Y (B, H, N, N) for the backward; the backward gives bitwise the
    same gradients from it as when it recomputes Y (empty y), and names a y of the wrong shape."""
    args = raw_args(True, False, False)
    out, probs, y, mean, var, maps = torch.ops.fastattnreg.refined_attention_fwd(*args)
    assert y.shape == probs.shape and maps.shape == (0,)  # export "none": no maps
    dout = torch.randn_like(out)
    tail = (args[10], args[11], args[12], args[13], True, None, "none")
    bwd = torch.ops.fastattnreg.refined_attention_bwd
    kept = bwd(dout, *args[:8], probs, y, mean, var, *tail)
    recomputed = bwd(dout, *args[:8], probs, y.new_empty(0), mean, var, *tail)
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed))
    shifted = bwd(dout, *args[:8], probs, y + 1.0, mean, var, *tail)  # it is read, not ignored
    assert not torch.equal(shifted[6], kept[6])
    with pytest.raises(ValueError, match="y must have shape"):
        bwd(dout, *args[:8], probs, y[:, :, :-1], mean, var, *tail)
    eval_args = raw_args(False, True, False)
    assert torch.ops.fastattnreg.refined_attention_fwd(*eval_args)[2].shape == (0,)


def test_raw_op_checks_its_arguments():
    args = list(raw_args(True, False, False))
    args[4] = torch.randn(4, 4, 4, dtype=torch.float64)  # even kernel
    with pytest.raises(ValueError, match="kernel size K must be odd"):
        torch.ops.fastattnreg.refined_attention_fwd(*args)
    args = list(raw_args(True, False, False))
    args[6] = torch.randn(11, dtype=torch.float64)  # bn_weight of the wrong length
    with pytest.raises(ValueError, match="bn_weight must have shape"):
        torch.ops.fastattnreg.refined_attention_fwd(*args)
