"""Arguments that would give silently wrong numbers are refused, before anything changes.

Logit scales outside the accumulation type's safe range (ops.checks.scale_limits), NaN or
negative running statistics, eps <= 0 and momentum outside [0, 1] given to refined_attention
(its Python checks and the C++ op's own), the structured and mimetic initialisations' numeric
arguments. Every refusal is a ValueError naming the argument, the value and the limit, and
leaves weights and buffers as they were. Also: a logit scale of 0 with a learned float mask (the
mask's gradient was NaN: dS / scale) and the float32 running statistics of a bfloat16
RefinerAttention.
"""
import math
import re

import pytest
import torch

import fastattnreg
from fastattnreg import (RefinerAttention, attention, attention_match, attention_ref,
                         refined_attention, refined_attention_ref)
from fastattnreg.init import mimetic_init_, structured_init_
from fastattnreg.models import create_model
from fastattnreg.ops.checks import scale_limits
from conftest import max_err, requires_cpp
from inputs import refiner_inputs
from refiner_checks import call

F32_LO, F32_HI = scale_limits(torch.float32)
F64_LO, F64_HI = scale_limits(torch.float64)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, snap):
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k in snap:
        assert now[k].dtype == snap[k].dtype and torch.equal(now[k], snap[k]), k


# ------------------------------------------------------------------------------- logit scale


def test_scale_limits_are_the_normal_range_up_to_the_square_root_of_max():
    assert F32_LO == torch.finfo(torch.float32).tiny
    assert F32_HI == math.sqrt(torch.finfo(torch.float32).max)  # 1.84e19
    assert F64_HI == math.sqrt(torch.finfo(torch.float64).max)
    assert scale_limits(torch.bfloat16) == (F32_LO, F32_HI)  # bfloat16 runs in float32


@requires_cpp
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype,scale", [
    (torch.float32, 2 * F32_HI), (torch.float32, -2 * F32_HI), (torch.float32, F32_LO / 4),
    (torch.bfloat16, 1e30), (torch.float64, 2 * F64_HI), (torch.float64, F64_LO / 4),
])
def test_out_of_range_scales_are_refused_by_every_op(backend, dtype, scale):
    q = torch.randn(1, 2, 5, 4, dtype=dtype)
    msg = r"scale must be 0 or have a magnitude in \["
    with pytest.raises(ValueError, match=msg + ".*got " + re.escape(repr(scale))):
        attention(q, q, q, scale=scale, backend=backend)
    with pytest.raises(ValueError, match="teacher_" + msg):
        attention_match(q, q, q, q, q, teacher_scale=scale, backend=backend)
    qkv, params, running = refiner_inputs(1, 2, 5, 4, 2, 3, dtype=dtype)
    with pytest.raises(ValueError, match=msg):
        call(refined_attention, qkv, params, running, training=False, scale=scale,
             backend=backend)


@requires_cpp
@pytest.mark.parametrize("scale", [2 * F32_HI, F32_LO / 4])
def test_the_raw_ops_refuse_them_too(scale):
    q = torch.randn(1, 1, 4, 4)
    ops = torch.ops.fastattnreg
    with pytest.raises(ValueError, match=r"scale must be 0 or have a magnitude"):
        ops.attention_fwd(q, q, q, None, None, scale, "none", 0.0)
    with pytest.raises(ValueError, match=r"teacher_scale must be 0 or have a magnitude"):
        ops.attention_match_fwd(q, q, q, q, q, None, 0.5, scale, "kl", "all")


@requires_cpp
def test_in_range_extremes_are_accepted():
    """The extreme scales each dtype takes give what attention_ref gives in float64: one-hot
    attention at the largest magnitudes, uniform attention at the smallest and at 0."""
    q = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    for scale in (F32_HI, -F32_LO, 1e100):  # float64 takes scales float32 would not
        got = attention(q, q, q, scale=scale, backend="cpp")
        assert max_err(got, attention_ref(q, q, q, scale=scale)) < 1e-12, scale
    qf = q.float()
    for scale in (F32_HI, F32_LO, -F32_LO, 0.0):
        got = attention(qf, qf, qf, scale=scale, backend="cpp")
        assert max_err(got, attention_ref(q, q, q, scale=scale)) < 1e-6, scale


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scale_zero_gives_the_float_masks_gradient(dtype):
    """scale 0: uniform attention over the unmasked keys; the bias still gets its gradient (the
    kernels divided dS by the scale: NaN)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 5, generator=g, dtype=dtype).requires_grad_()
               for _ in range(3))
    bias = torch.randn(1, 3, 9, 9, generator=g, dtype=dtype).requires_grad_()
    out, maps = attention(q, k, v, attn_mask=bias, scale=0.0, export="full", backend="cpp")
    ref_out, ref_maps = attention_ref(q, k, v, attn_mask=bias, scale=0.0, export="full")
    up = torch.randn_like(out), torch.randn_like(maps)
    got = torch.autograd.grad((out, maps), (q, k, v, bias), up)
    want = torch.autograd.grad((ref_out, ref_maps), (q, k, v, bias), up)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and max_err(a, b) <= tol
    assert got[3].abs().max() > 0.1  # the bias's gradient is not trivially 0


# ------------------------------------------------------------- refined_attention: BatchNorms


def _bad_running(kind):
    qkv, params, running = refiner_inputs(2, 2, 9, 4, 2, 3)
    means, variances = running
    if kind == "nan_var":
        variances[1][2] = float("nan")
    elif kind == "negative_var":
        variances[3][0] = -1e-3
    elif kind == "inf_var":
        variances[0][0] = float("inf")
    elif kind == "nan_mean":
        means[2][1] = float("nan")
    elif kind == "inf_mean":
        means[0][3] = float("-inf")
    return qkv, params, running


BAD_RUNNING = {
    "nan_var": r"running_var of bn2 channel 2 must be finite and >= 0; got nan",
    "negative_var": r"running_var of adapt_bn channel 0 must be finite and >= 0; got -0\.001",
    "inf_var": r"running_var of bn1 channel 0 must be finite and >= 0; got inf",
    "nan_mean": r"running_mean of bn3 channel 1 must be finite; got nan",
    "inf_mean": r"running_mean of bn1 channel 3 must be finite; got -inf",
}


@requires_cpp
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(BAD_RUNNING))
def test_bad_running_statistics_are_refused_before_any_update(backend, training, kind):
    qkv, params, running = _bad_running(kind)
    before = [t.clone() for t in running[0] + running[1]]
    with pytest.raises(ValueError, match=BAD_RUNNING[kind]):
        call(refined_attention, qkv, params, running, training=training, backend=backend)
    for a, b in zip(running[0] + running[1], before):  # NaN entries compare as themselves
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


@requires_cpp
@pytest.mark.parametrize("arg,value,match", [
    ("eps", 0.0, r"eps must be a finite number > 0 .*got 0\.0"),
    ("eps", -1e-5, r"eps must be a finite number > 0 .*got -1e-05"),
    ("eps", float("nan"), r"eps must be a finite number > 0 .*got nan"),
    ("eps", float("inf"), r"eps must be a finite number > 0 .*got inf"),
    ("momentum", -0.1, r"momentum must be a number in \[0, 1\] .*got -0\.1"),
    ("momentum", 1.5, r"momentum must be a number in \[0, 1\] .*got 1\.5"),
    ("momentum", float("nan"), r"momentum must be a number in \[0, 1\] .*got nan"),
])
def test_bad_eps_and_momentum_are_refused_before_any_update(arg, value, match):
    qkv, params, running = refiner_inputs(2, 2, 9, 4, 2, 3)
    before = [t.clone() for t in running[0] + running[1]]
    with pytest.raises(ValueError, match=match):
        call(refined_attention, qkv, params, running, training=True, backend="cpp",
             **{arg: [1e-5, 1e-5, value, 1e-5] if arg == "eps" else value})
    assert all(torch.equal(a, b) for a, b in zip(running[0] + running[1], before))


@requires_cpp
def test_the_raw_refiner_op_checks_statistics_and_eps():
    """Without the Python checks (TorchScript calls the op directly), the C++ op refuses them."""
    qkv, params, _ = refiner_inputs(1, 2, 6, 4, 2, 3)
    q, k, v = (t.detach() for t in qkv)
    w_exp, w_dw, w_pro = (p.detach() for p in params[:3])
    gamma = torch.cat([p.detach() for p in params[3:7]])
    beta = torch.cat([p.detach() for p in params[7:11]])
    mean, var = torch.zeros(12, dtype=torch.float64), torch.ones(12, dtype=torch.float64)
    ops = torch.ops.fastattnreg

    def run(mean, var, eps=(1e-5,) * 4):
        return ops.refined_attention_fwd(q, k, v, w_exp.reshape(4, 2), w_dw.reshape(4, 3, 3),
                                         w_pro.reshape(2, 4), gamma, beta, mean, var, None,
                                         list(eps), 0.5, 1.0, False, False, "none")

    run(mean, var)
    bad_var = var.clone()
    bad_var[9] = -2.0
    with pytest.raises(ValueError, match=r"running_var of bn3 channel 1 must be finite and >= 0"):
        run(mean, bad_var)
    bad_mean = mean.clone()
    bad_mean[11] = float("nan")
    with pytest.raises(ValueError, match=r"running_mean of adapt_bn channel 1 must be finite"):
        run(bad_mean, var)
    with pytest.raises(ValueError, match=r"eps must be finite and > 0"):
        run(mean, var, eps=(1e-5, 0.0, 1e-5, 1e-5))
    with pytest.raises(ValueError, match=r"running_var must have q's dtype"):
        run(mean, var.to(torch.float16))


@requires_cpp
@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "torchscript"])
@pytest.mark.parametrize("case", ["negative_var", "nan_mean", "momentum", "eps"])
def test_refiner_module_state_is_unchanged_after_a_refusal(scripted, case):
    torch.manual_seed(0)
    layer = RefinerAttention(16, num_heads=2).train()
    x = torch.randn(2, 9, 16)
    layer(x)  # statistics and counters away from their init
    if case == "negative_var":
        layer.DLA.bn2.running_var[3] = -0.5
        match = r"running_var of bn2 channel 3 must be finite and >= 0"
    elif case == "nan_mean":
        layer.adapt_bn.running_mean[1] = float("nan")
        match = r"running_mean of adapt_bn channel 1 must be finite"
    elif case == "momentum":
        layer.DLA.bn3.momentum = 1.5
        match = r"momentum must be a number in \[0, 1\]"
    else:
        layer.DLA.bn1.eps = 0.0
        match = r"eps must be .*> 0"
    model = torch.jit.script(layer) if scripted else layer
    snap = snapshot(layer)
    # TorchScript re-raises a ValueError as a RuntimeError (from the kernels) or a
    # torch.jit.Error (from its own code) that quotes it.
    with pytest.raises((RuntimeError, torch.jit.Error) if scripted else ValueError, match=match):
        model(x)
    now = layer.state_dict()
    for key, value in snap.items():  # NaN entries compare equal to themselves here
        assert torch.equal(now[key].nan_to_num(), value.nan_to_num()), key


# ------------------------------------------------------------------- bfloat16 RefinerAttention


def test_bfloat16_refiner_keeps_float32_running_statistics():
    built = RefinerAttention(16, num_heads=2, dtype=torch.bfloat16)
    converted = RefinerAttention(16, num_heads=2).to(torch.bfloat16)
    halved = RefinerAttention(16, num_heads=2).half()
    for layer in (built, converted, halved):
        assert layer.qkv.weight.dtype != torch.float32
        for bn in (layer.DLA.bn1, layer.DLA.bn2, layer.DLA.bn3, layer.adapt_bn):
            assert bn.weight.dtype == layer.qkv.weight.dtype
            assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    wide = RefinerAttention(16, num_heads=2).double()
    assert wide.adapt_bn.running_var.dtype == torch.float64  # wider types apply as usual
    # Narrowing and widening back keeps every bit of the float32 statistics.
    layer = RefinerAttention(16, num_heads=2)
    layer.adapt_bn.running_mean.copy_(torch.tensor([0.1234567, -1e-7]))
    before = layer.adapt_bn.running_mean.clone()
    layer.bfloat16().float()
    assert torch.equal(layer.adapt_bn.running_mean, before)


@requires_cpp
def test_bfloat16_refiner_updates_its_float32_statistics_as_float32_math_does():
    """One training step of a bfloat16 layer with momentum 0.01 moves the statistics by less
    than bfloat16 can hold near 1 (2 ** -7): in float32 they move, and match the float32
    BatchNorm update of the same batch, computed by the reference from the layer's own bfloat16
    q, k, v and weights."""
    torch.manual_seed(0)
    layer = RefinerAttention(16, num_heads=2, dtype=torch.bfloat16).train()
    bns = (layer.DLA.bn1, layer.DLA.bn2, layer.DLA.bn3, layer.adapt_bn)
    for bn in bns:
        bn.momentum = 0.01
    x = torch.randn(2, 17, 16, dtype=torch.bfloat16)
    B, N, _ = x.shape
    q, k, v = layer.qkv(x).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    ref_mean = [bn.running_mean.clone() for bn in bns]
    ref_var = [bn.running_var.clone() for bn in bns]
    with torch.no_grad():
        refined_attention_ref(
            q.float(), k.float(), v.float(), layer.DLA.conv_exp.weight.float(),
            layer.DLA.depth_sep_conv.weight.float(), layer.DLA.conv_pro.weight.float(),
            [bn.weight.float() for bn in bns], [bn.bias.float() for bn in bns], ref_mean, ref_var,
            training=True, momentum=0.01, eps=1e-5)
        layer(x)
    for bn, m, v in zip(bns, ref_mean, ref_var):
        assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
        assert max_err(bn.running_mean, m) < 1e-6 and max_err(bn.running_var, v) < 1e-6
    moved = (layer.adapt_bn.running_var - 1.0).abs()
    assert (moved > 0).all() and (moved < 2.0 ** -8).all()
    assert layer.adapt_bn.num_batches_tracked.item() == 1


# ---------------------------------------------------------------------- init argument checks


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="closed_form", margin=0.0), r"margin must be a finite number > 0; got 0\.0"),
    (dict(method="closed_form", margin=-2.0), r"margin must be a finite number > 0; got -2\.0"),
    (dict(method="closed_form", margin=float("nan")), r"margin must be a finite number > 0"),
    (dict(method="closed_form", peak_logit=0.0), r"peak_logit must be a finite number > 0"),
    (dict(method="closed_form", rtol=0.0), r"rtol must be a finite number > 0"),
    (dict(method="closed_form", noise=-0.1), r"noise must be a finite number >= 0"),
    (dict(method="closed_form", noise=float("inf")), r"noise must be a finite number >= 0"),
    (dict(target_error=float("nan")), r"target_error must be a finite number >= 0"),
    (dict(lr=float("inf")), r"lr must be a finite number > 0; got inf"),
    (dict(lr=0.0), r"lr must be a finite number > 0"),
    (dict(steps=-1), r"steps must be an integer >= 0; got -1"),
    (dict(steps=2.5), r"steps must be an integer >= 0; got 2\.5"),
    (dict(rescale_every=0), r"rescale_every must be an integer >= 1; got 0"),
    (dict(grid_size=0), r"grid_size must be an integer >= 1; got 0"),
])
def test_structured_init_refuses_non_positive_sizes_before_any_change(kwargs, match):
    model = create_model("vit_tiny_patch2_8")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        structured_init_(model, seed=0, **kwargs)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma", "delta"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -0.5])
def test_mimetic_init_refuses_non_finite_arguments_before_any_change(name, value):
    model = create_model("vit_tiny_patch2_8")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0; got "
                       + re.escape(repr(value))):
        mimetic_init_(model, seed=0, **{name: value})
    assert_unchanged(model, snap)


def test_the_guards_leave_valid_calls_alone():
    model = create_model("vit_tiny_patch2_8")
    report = structured_init_(model, method="closed_form", seed=0, noise=0.0)
    assert report.layers == 4
    assert mimetic_init_(model, alpha=0.0, beta=0.0, gamma=0.0, delta=0.0, seed=0).layers == 4
    assert fastattnreg.backend.BACKENDS
