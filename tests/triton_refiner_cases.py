"""refined_attention(backend="triton") on CPU tensors under Triton's interpreter.

Not collected by a plain `pytest` run: TRITON_INTERPRET=1 must be set before Triton defines the
kernels, so tests/test_triton_refiner.py runs this file in its own process. By hand
(-k interp_<group>: one group):
    TRITON_INTERPRET=1 python -m pytest -q tests/triton_refiner_cases.py
float32 kernels against refined_attention_ref in float64 on small shapes (N = 17: one partial
32 x 32 pixel tile; N = 33: four, with halos across tile edges), kernel 3 and 5, expansion 1..4,
train and eval, dropout through a given mask; the exported maps of A* and the gradients through
them. The interpreter is slow (the backward's
depthwise-transposed pass recomputes K^4 expansions per pixel), so the shapes stay small.
"""
import os

import pytest
import torch

import fastattnreg
from fastattnreg import refined_attention, refined_attention_ref
from fastattnreg.ops.checks import REFINER_EXPORTS
from conftest import FP32_TOL, cpp_schema, max_err
from inputs import REFINER_PARAM_NAMES, refiner_inputs
from refiner_checks import call, clone_running, run_with_grads

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not fastattnreg.triton_available(),
    reason="needs TRITON_INTERPRET=1 set before the import and Triton installed",
)

OPS = torch.ops.fastattnreg


def _triton(*args, **kw):
    return refined_attention(*args, backend="triton", **kw)


def _float32(qkv, params, running):
    f = lambda ts: [t.detach().float().requires_grad_(t.requires_grad) for t in ts]  # noqa: E731
    return f(qkv), f(params), ([t.float() for t in running[0]], [t.float() for t in running[1]])


def _compare(shape, training, *, attn_drop=0.0, grads=True, seed=0):
    """Triton float32 against the reference in float64: out, running stats, every gradient."""
    B, H, N, D, expansion, ksize = shape
    qkv, params, running = refiner_inputs(B, H, N, D, expansion, ksize, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn((B, H, N, D), generator=gen, dtype=torch.float64)
    mask = torch.rand((B, H, N, N), generator=gen) >= attn_drop if attn_drop else None
    kw = {"training": training, "momentum": 0.3, "eps": 1e-4, "attn_drop": attn_drop,
          "drop_mask": mask}
    ref_running = clone_running(running)
    ref_out, ref_grads = run_with_grads(refined_attention_ref, qkv, params, ref_running, dout, **kw)
    qkv32, params32, running32 = _float32(qkv, params, running)
    if grads:
        out, got_grads = run_with_grads(_triton, qkv32, params32, running32, dout.float(), **kw)
    else:
        with torch.no_grad():
            out = call(_triton, qkv32, params32, running32, **kw)
    assert out.dtype == torch.float32
    assert max_err(out, ref_out) <= FP32_TOL * max(1.0, ref_out.abs().max().item()), "out"
    for n, (got, want) in enumerate(zip(running32[0] + running32[1],
                                        ref_running[0] + ref_running[1])):
        assert max_err(got, want) <= FP32_TOL * max(1.0, want.abs().max().item()), f"running {n}"
    if not grads:
        return
    # Gradients that vanish in exact arithmetic (bn3's bias in training: sum dX4 = 0) are
    # compared on the scale of the largest one.
    scale = max(1.0, max(g.abs().max().item() for g in ref_grads))
    for name, got, want in zip(("dq", "dk", "dv") + REFINER_PARAM_NAMES, got_grads, ref_grads):
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert max_err(got, want) <= FP32_TOL * max(scale * 1e-2, want.abs().max().item()), name


# ------------------------------------------------------------------------------------ values
# (B, H, N, D, expansion, K)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_interp_values_two_images_expansion_2(training):
    _compare((2, 3, 17, 16, 2, 3), training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_interp_values_expansion_4(training):
    _compare((1, 3, 17, 32, 4, 3), training, seed=1)


def test_interp_values_four_tiles_with_dropout():
    _compare((1, 2, 33, 32, 1, 3), True, attn_drop=0.25, seed=2)


def test_interp_values_kernel_5_train():
    _compare((1, 2, 17, 16, 2, 5), True, seed=3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_interp_values_kernel_5_four_tiles_forward(training):
    _compare((1, 2, 33, 16, 3, 5), training, grads=False, seed=4)


def test_interp_values_eval_backward_without_saved_probs():
    """Raw backward op after an eval forward that kept no P (probs of shape (0,)): recomputed."""
    qkv, params, running = _float32(*refiner_inputs(1, 2, 17, 16, 1, 3, seed=5))
    args = raw_args(qkv, params, running)
    with torch.no_grad():
        _, probs, y, mean, var, _ = OPS.triton_refined_attention_fwd(*args, False, False, "none")
        _, probs_kept, _, _, _, _ = OPS.triton_refined_attention_fwd(*args, False, True, "none")
    assert y.shape == (0,)  # the Triton kernels keep no Y: their backward recomputes it
    assert probs.shape == (0,) and probs_kept.shape == (1, 2, 17, 17)
    dout = torch.randn_like(qkv[0])
    bwd_args = (dout, *args[:8])
    tail = (None, [1e-5] * 4, 0.25, 1.0, False, None, "none")
    recomputed = OPS.triton_refined_attention_bwd(*bwd_args, probs, y, mean, var, *tail)
    kept = OPS.triton_refined_attention_bwd(*bwd_args, probs_kept, y, mean, var, *tail)
    for a, b in zip(recomputed, kept):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------------- maps


def _compare_maps(shape, training, export, *, with_out=True, attn_drop=0.0, seed=0):
    """Triton float32 maps of A* and the gradients through them (alone, or with out's) against
    the reference in float64."""
    B, H, N, D, expansion, ksize = shape
    qkv, params, running = refiner_inputs(B, H, N, D, expansion, ksize, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand((B, H, N, N), generator=gen) >= attn_drop if attn_drop else None
    kw = {"training": training, "attn_drop": attn_drop, "drop_mask": mask, "export": export}
    ref_out, ref_maps = call(refined_attention_ref, qkv, params, clone_running(running), **kw)
    qkv32, params32, running32 = _float32(qkv, params, running)
    out, maps = call(_triton, qkv32, params32, running32, **kw)
    assert maps.dtype == torch.float32 and maps.shape == ref_maps.shape
    assert max_err(maps, ref_maps) <= FP32_TOL * max(1.0, ref_maps.abs().max().item()), "maps"
    dmaps = torch.randn(ref_maps.shape, generator=gen, dtype=torch.float64)
    dout = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64)

    def grads(o, m, inputs, dt):
        loss = (m * dmaps.to(dt)).sum() + ((o * dout.to(dt)).sum() if with_out else 0)
        g = torch.autograd.grad(loss, inputs, allow_unused=True)
        return [torch.zeros_like(x) if a is None else a for a, x in zip(g, inputs)]

    want = grads(ref_out, ref_maps, (*qkv, *params), torch.float64)
    got = grads(out, maps, (*qkv32, *params32), torch.float32)
    scale = max(1.0, max(g.abs().max().item() for g in want))
    for name, g, w in zip(("dq", "dk", "dv") + REFINER_PARAM_NAMES, got, want):
        assert max_err(g, w) <= FP32_TOL * max(scale * 1e-2, w.abs().max().item()), name


def test_interp_maps_full_train_maps_alone():
    _compare_maps((1, 2, 17, 16, 2, 3), True, "full", with_out=False, seed=10)


def test_interp_maps_head_mean_eval_with_out():
    _compare_maps((2, 3, 17, 16, 1, 3), False, "head_mean", seed=11)


def test_interp_maps_cls_train_kernel_5_dropout_with_out():
    _compare_maps((1, 2, 17, 16, 2, 5), True, "cls", attn_drop=0.25, seed=12)


def test_interp_maps_full_eval_head_dim_split_over_programs():
    """C = 48 (CP = 64) and D = 40: the out kernel's 16 head-dim columns per program give three
    programs per query block (the last one partial), each recomputing A*; only the first writes
    the maps."""
    from fastattnreg.triton.refiner import out_d_block  # imports Triton, which may be missing

    assert out_d_block(40, 64) == 16
    _compare_maps((1, 2, 17, 40, 24, 3), False, "full", seed=14)


def test_interp_maps_full_eval_four_tiles_forward_and_errors():
    """N = 33: four 32 x 32 pixel tiles, each writing its own part of every map; raw-op errors."""
    qkv, params, running = _float32(*refiner_inputs(1, 2, 33, 16, 1, 3, seed=13))
    with torch.no_grad():
        for export in REFINER_EXPORTS[1:]:
            _, maps = call(_triton, qkv, params, clone_running(running), training=False,
                           export=export)
            _, want = call(refined_attention_ref, [t.double() for t in qkv],
                           [t.double() for t in params],
                           ([t.double() for t in running[0]], [t.double() for t in running[1]]),
                           training=False, export=export)
            assert max_err(maps, want) <= FP32_TOL * max(1.0, want.abs().max().item()), export
    args = raw_args(qkv, params, running)
    with pytest.raises(ValueError, match="export must be one of .*got 'rows'"):
        OPS.triton_refined_attention_fwd(*args, False, True, "rows")
    with torch.no_grad():
        out, probs, y, mean, var, maps = OPS.triton_refined_attention_fwd(*args, False, True,
                                                                           "cls")
    head = (torch.zeros_like(out), *args[:8], probs, y, mean, var, None, [1e-5] * 4, 0.25, 1.0,
            False)
    with pytest.raises(ValueError, match=r"dmaps must have shape \(1, 2, 33\)"):
        OPS.triton_refined_attention_bwd(*head, torch.zeros(1, 2, 33, 33), "cls")
    with pytest.raises(ValueError, match="dmaps was given but export is 'none'"):
        OPS.triton_refined_attention_bwd(*head, torch.zeros(1, 2, 33), "none")


# ------------------------------------------------------------------------------------ reruns


def test_interp_reruns_bitwise_equal():
    qkv, params, running = _float32(*refiner_inputs(1, 2, 17, 16, 2, 3, seed=6))
    dout = torch.randn_like(qkv[0])
    mask = torch.rand(1, 2, 17, 17) >= 0.2
    runs = [run_with_grads(_triton, qkv, params, clone_running(running), dout, training=True,
                           attn_drop=0.2, drop_mask=mask) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ errors


def raw_args(qkv, params, running):
    """The raw forward op's arguments up to (excluding) training and save_probs."""
    H, C = qkv[0].shape[1], params[0].shape[0]
    K = params[1].shape[-1]
    return (*[t.detach() for t in qkv], params[0].detach().reshape(C, H),
            params[1].detach().reshape(C, K, K), params[2].detach().reshape(H, C),
            torch.cat([t.detach() for t in params[3:7]]),
            torch.cat([t.detach() for t in params[7:11]]), torch.cat(running[0]),
            torch.cat(running[1]), None, [1e-5] * 4, 0.25, 1.0)


def _with(args, index, value):
    return tuple(value if n == index else a for n, a in enumerate(args))


@pytest.mark.parametrize("index,value,match", [
    (3, torch.zeros(4, 3), "w_exp must have shape"),
    (4, torch.zeros(4, 2, 2), "kernel size K must be odd"),
    (4, torch.zeros(4, 3, 5), "w_dw must have shape"),
    (5, torch.zeros(3, 4), "w_pro must have shape"),
    (6, torch.zeros(11), "bn_weight must have shape"),
    (7, torch.zeros(12, dtype=torch.float64), "bn_bias must be torch.float32"),
    (8, torch.zeros(5), "running_mean must have shape"),
    (10, torch.ones(1, 2, 9, 9, dtype=torch.uint8), "keep"),
    (11, [1e-5] * 3, "eps must hold 4 values"),
    (11, [1e-5, -1.0, 1e-5, 1e-5], "eps must be finite and > 0"),
    (12, float("nan"), "scale must be a finite number"),
    (13, 0.5, "drop_scale"),
])
def test_interp_errors_raw_forward(index, value, match):
    qkv, params, running = _float32(*refiner_inputs(1, 2, 9, 16, 2, 3))
    args = _with(raw_args(qkv, params, running), index, value)
    with pytest.raises(ValueError, match=match):
        OPS.triton_refined_attention_fwd(*args, True, False, "none")


def test_interp_errors_qkv_and_backward():
    qkv, params, running = _float32(*refiner_inputs(1, 2, 9, 16, 2, 3))
    args = raw_args(qkv, params, running)
    with pytest.raises(ValueError, match="head dim D must be in"):
        OPS.triton_refined_attention_fwd(*(t[..., :8] for t in args[:3]), *args[3:], True, False,
                                         "none")
    with pytest.raises(ValueError, match="dtype"):
        OPS.triton_refined_attention_fwd(*(t.double() for t in args[:3]), *args[3:], True, False,
                                         "none")
    stats, no_y = torch.zeros(12), torch.empty(0)
    bwd = (torch.zeros_like(args[0]), *args[:8])
    tail = (None, [1e-5] * 4, 0.25, 1.0)
    none = (None, "none")  # dmaps, export
    with pytest.raises(ValueError, match="probs must be the"):
        OPS.triton_refined_attention_bwd(*bwd, torch.empty(0), no_y, stats, stats, *tail, True,
                                         *none)
    with pytest.raises(ValueError, match="probs must have shape"):
        OPS.triton_refined_attention_bwd(*bwd, torch.zeros(1, 2, 9, 8), no_y, stats, stats, *tail,
                                         True, *none)
    with pytest.raises(ValueError, match="mean must have shape"):
        OPS.triton_refined_attention_bwd(*bwd, torch.zeros(1, 2, 9, 9), no_y, stats[:5], stats,
                                         *tail, True, *none)
    with pytest.raises(ValueError, match="dout must have shape"):
        OPS.triton_refined_attention_bwd(torch.zeros(1, 2, 9, 8), *args[:8], torch.empty(0),
                                         no_y, stats, stats, *tail, False, *none)


def test_interp_errors_public_function_names_triton():
    qkv, params, running = _float32(*refiner_inputs(1, 2, 9, 8, 2, 3))
    with pytest.raises(ValueError, match="head dim D must be in .* for backend 'triton'"):
        call(_triton, qkv, params, running, training=True)


# ------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("name", ["refined_attention_fwd", "refined_attention_bwd"])
def test_interp_registration_schemas_equal_the_cpp_ops(name):
    triton_op = getattr(OPS, "triton_" + name).default
    assert str(triton_op._schema) == "fastattnreg::triton_" + cpp_schema(name)


def test_interp_registration_opcheck():
    # Kernel size 1: opcheck runs each op many times, and registration does not depend on K.
    qkv, params, running = _float32(*refiner_inputs(1, 2, 9, 16, 1, 1, seed=7))
    args = raw_args(qkv, params, running)
    args = (*[t.requires_grad_() for t in args[:8]], *args[8:])
    keep = torch.rand(1, 2, 9, 9) >= 0.3
    torch.library.opcheck(OPS.triton_refined_attention_fwd.default,
                          (*_with(_with(args, 10, keep), 13, 1 / 0.7), True, False, "none"))
    torch.library.opcheck(OPS.triton_refined_attention_fwd.default, (*args, False, True, "none"))
    with torch.no_grad():
        _, probs, y, mean, var, _ = OPS.triton_refined_attention_fwd(*args, True, False, "none")
    dout = torch.randn_like(qkv[0])
    torch.library.opcheck(OPS.triton_refined_attention_bwd.default,
                          (dout, *[t.detach() for t in args[:8]], probs, y, mean, var, None,
                           [1e-5] * 4, 0.25, 1.0, True, None, "none"))


def test_interp_registration_compile_fullgraph():
    qkv, params, running = _float32(*refiner_inputs(1, 2, 9, 16, 2, 3, seed=8))
    dout = torch.randn_like(qkv[0])
    eager_running, compiled_running = clone_running(running), clone_running(running)
    eager = run_with_grads(_triton, qkv, params, eager_running, dout, training=True)
    torch._dynamo.reset()
    fn = torch.compile(_triton, fullgraph=True, backend="aot_eager")
    compiled = run_with_grads(fn, qkv, params, compiled_running, dout, training=True)
    assert torch.equal(eager[0], compiled[0])
    for a, b in zip(eager[1], compiled[1]):
        assert torch.equal(a, b)
    # The running statistics' update (ops/jit.py: mul_, then add_ with alpha) is bitwise the
    # eager one from torch 2.14; torch before that decomposes add_'s alpha under aot_eager into
    # a separate multiply, which rounds once more (at most 1 ulp apart).
    bitwise = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
    for a, b in zip(eager_running[0] + eager_running[1],
                    compiled_running[0] + compiled_running[1]):
        if bitwise:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=2.0**-23, atol=0.0)
