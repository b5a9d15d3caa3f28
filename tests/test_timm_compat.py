"""FusedAttention and RefinerAttention wherever timm's Attention goes, on small timm models
(a ViT with a class token and a DeiT with a distillation token too), C++ kernels on the CPU:
forward and backward, torch.jit.script (and save + load), FX tracing the way timm traces, FX +
TorchScript, torch.export, torch.compile(fullgraph=True), forward_intermediates and timm's
feature extraction. Every transformed model is checked against the eager model it came from,
in training mode (outputs, gradients, BatchNorm running statistics) and in eval mode.
"""
import contextlib
import copy
import io

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models import create_feature_extractor, get_graph_node_names  # noqa: E402

from fastattnreg import FusedAttention, RefinerAttention  # noqa: E402
from fastattnreg.nn.attention import fused_attention  # noqa: E402
from fastattnreg.nn.refiner import refiner_attention  # noqa: E402
from conftest import OpDtypes, max_err, requires_cpp  # noqa: E402

pytestmark = requires_cpp

SMALL = dict(pretrained=False, img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
             num_classes=5)
ARCHS = {"vit": "vit_tiny_patch16_224", "deit_distilled": "deit_tiny_distilled_patch16_224"}
LAYERS = {"fused": FusedAttention, "refiner": RefinerAttention}
OPS = {"fused": "fastattnreg::attention_fwd", "refiner": "fastattnreg::refined_attention_fwd"}
WRAPPED = {"fused": fused_attention, "refiner": refiner_attention}
CASES = [(a, l) for a in ARCHS for l in LAYERS]
IDS = [f"{a}-{l}" for a, l in CASES]
TOL = 1e-5  # relative to the larger of 1 and the reference's largest magnitude


def close(got, want, tol=TOL):
    return max_err(got, want) <= tol * max(1.0, want.abs().max().item())


def make_model(arch, layer, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(ARCHS[arch], attn_layer=LAYERS[layer], **{**SMALL, **kwargs})
    for blk in model.blocks:
        assert isinstance(blk.attn, LAYERS[layer])
        blk.attn.backend = "cpp"
    return model


def images(batch=2):
    return torch.randn(batch, 3, 32, 32)


def buffers(model):
    """Every BatchNorm statistic and counter, by name."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def assert_same_buffers(a, b, tol=TOL):
    assert a.keys() == b.keys()
    for name in a:
        assert close(a[name], b[name], tol), name


def assert_same_grads(model, other, tol=TOL):
    theirs = dict(other.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and theirs[name].grad is not None, name
        assert close(p.grad, theirs[name].grad, tol), name


def check_train_step(eager, transformed, x, run=None, set_mode=True, tol=TOL):
    """One training step of both: outputs, parameter gradients, running statistics.
    set_mode=False: `transformed` keeps the mode it was built in (an exported program)."""
    run = run or (lambda m, t: m(t))
    eager.train()
    if set_mode:
        transformed.train()
    want, got = eager(x), run(transformed, x)
    assert close(got, want, tol)
    dy = torch.randn_like(want)
    want.backward(dy)
    got.backward(dy)
    holder = getattr(transformed, "_orig_mod", transformed)  # torch.compile's wrapper
    assert_same_grads(holder, eager, tol)
    assert_same_buffers(buffers(holder), buffers(eager), tol)


def check_eval(eager, transformed, x, run=None, tol=TOL):
    run = run or (lambda m, t: m(t))
    eager.eval(), transformed.eval()
    with torch.no_grad():
        assert close(run(transformed, x), eager(x), tol)


def timm_twin(arch, model):
    """The same model with timm's own Attention, holding the same weights (strict load)."""
    torch.manual_seed(0)
    twin = timm.create_model(ARCHS[arch], **SMALL)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin


# ----------------------------------------------------------------------- forward, backward


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_forward_backward_match_timms_attention(arch):
    model = make_model(arch, "fused")
    check_train_step(timm_twin(arch, model), model, images())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_refiner_forward_backward_trains_every_parameter(arch):
    model = make_model(arch, "refiner").train()
    before = buffers(model)
    out = model(images())
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.DLA.conv_exp.weight.grad.abs().sum() > 0
    after = buffers(model)
    for name in before:
        if name.endswith("num_batches_tracked"):
            assert after[name].item() == before[name].item() + 1, name
        elif name.endswith("running_mean"):
            assert not torch.equal(after[name], before[name]), name


# ---------------------------------------------------------------------------- TorchScript


@pytest.mark.slow
@pytest.mark.parametrize("arch,layer", CASES, ids=IDS)
def test_torchscript_matches_eager_and_runs_the_kernels(arch, layer):
    eager = make_model(arch, layer)
    scripted = torch.jit.script(copy.deepcopy(eager))
    # The scripted layer calls the C++ op itself, not a Python fallback.
    assert OPS[layer] in str(scripted.inlined_graph)
    check_train_step(eager, scripted, images())
    check_eval(eager, scripted, images())


@pytest.mark.slow
@pytest.mark.parametrize("arch,layer", CASES, ids=IDS)
def test_torchscript_save_and_load(arch, layer):
    eager = make_model(arch, layer).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(copy.deepcopy(eager)), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    check_eval(eager, loaded, images())
    check_train_step(eager, loaded, images())


@pytest.mark.slow  # scripts a whole model
def test_torchscript_refuses_backends_it_cannot_run():
    model = make_model("vit", "fused")
    model.blocks[0].attn.backend = "reference"
    scripted = torch.jit.script(model)
    # TorchScript raises torch.jit.Error carrying the RuntimeError's message.
    with pytest.raises(torch.jit.Error, match="under TorchScript runs the C\\+\\+ kernels only"):
        scripted(images())


def test_torchscript_keeps_exported_maps_on_the_module():
    layer = FusedAttention(64, num_heads=4, export="cls", backend="cpp")
    scripted = torch.jit.script(copy.deepcopy(layer))
    x = torch.randn(2, 17, 64)
    assert close(scripted(x), layer(x))
    assert scripted.maps is not None and close(scripted.maps, layer.maps)


# ---------------------------------------------------------------------------------- FX


def fx_model(model):
    """timm's FX feature extractor returning the model's output node, traced in the model's
    current mode (timm's leaf modules and autowrapped functions, torchvision's tracer)."""
    _, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, [eval_nodes[-1]]), eval_nodes[-1]


@pytest.mark.slow
@pytest.mark.parametrize("arch,layer", CASES, ids=IDS)
def test_fx_trace_keeps_the_attention_call_as_one_node(arch, layer):
    eager = make_model(arch, layer)
    traced, node = fx_model(copy.deepcopy(eager).train())
    calls = [n for n in traced.graph.nodes if n.target is WRAPPED[layer]]
    assert len(calls) == SMALL["depth"]
    check_train_step(eager, traced, images(), run=lambda m, t: m(t)[node])
    traced, node = fx_model(copy.deepcopy(eager).eval())
    check_eval(eager, traced, images(), run=lambda m, t: m(t)[node])


@pytest.mark.slow
@pytest.mark.parametrize("arch,layer", CASES, ids=IDS)
def test_fx_then_torchscript(arch, layer):
    eager = make_model(arch, layer)
    traced, node = fx_model(copy.deepcopy(eager).train())
    scripted = torch.jit.script(traced)
    check_train_step(eager, scripted, images(), run=lambda m, t: m(t)[node])
    traced, node = fx_model(copy.deepcopy(eager).eval())
    check_eval(eager, torch.jit.script(traced), images(), run=lambda m, t: m(t)[node])


def test_refiner_counters_and_cumulative_momentum_step_when_the_graph_runs():
    """momentum=None (1 / num_batches_tracked) over three steps: FX, TorchScript, eager."""
    torch.manual_seed(0)
    eager = RefinerAttention(64, num_heads=4, backend="cpp").train()
    for bn in (eager.DLA.bn1, eager.DLA.bn2, eager.DLA.bn3, eager.adapt_bn):
        bn.momentum = None
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    scripted = torch.jit.script(copy.deepcopy(eager))
    assert buffers(traced)["adapt_bn.num_batches_tracked"].item() == 0  # tracing ran nothing
    for _ in range(3):
        x = torch.randn(2, 17, 64)
        want = eager(x)
        for other in (traced, scripted):
            assert close(other(x), want)
    for other in (traced, scripted):
        assert_same_buffers(buffers(other), buffers(eager))
    assert buffers(eager)["DLA.bn2.num_batches_tracked"].item() == 3


def test_fx_refuses_state_it_cannot_keep():
    model = make_model("vit", "fused")
    model.blocks[1].attn.export = "cls"
    with pytest.raises(RuntimeError, match="FX cannot trace a layer with export set"):
        torch.fx.symbolic_trace(model)
    model.blocks[1].attn.export = None
    model.blocks[0].attn.capture_qk = True
    with pytest.raises(RuntimeError, match="FX cannot trace a layer with capture_qk set"):
        torch.fx.symbolic_trace(model)


@pytest.mark.slow  # FX-traces a whole model
def test_plain_symbolic_trace_and_intermediate_nodes():
    eager = make_model("vit", "fused").eval()
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    x = images()
    with torch.no_grad():
        assert close(traced(x), eager(x))
        feats = create_feature_extractor(eager, {"blocks.0": "b0", "blocks.1": "b1"})(x)
        seen = {}
        hooks = [eager.blocks[i].register_forward_hook(
            lambda mod, inp, out, i=i: seen.__setitem__(f"b{i}", out)) for i in range(2)]
        eager(x)
    for h in hooks:
        h.remove()
    for name in ("b0", "b1"):
        assert close(feats[name], seen[name])


# ------------------------------------------------------------------ torch.export, compile


@pytest.mark.slow
@pytest.mark.parametrize("arch,layer", CASES, ids=IDS)
def test_torch_export(arch, layer):
    """Exported in each mode (an exported module keeps the mode it was exported in)."""
    eager = make_model(arch, layer)
    x = images()
    for training in (True, False):
        eager.train(training)
        program = torch.export.export(copy.deepcopy(eager), (x,))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert OPS[layer].replace("::", ".") + ".default" in targets
        exported = program.module()
        if training:
            check_train_step(eager, exported, images(), set_mode=False)
        else:
            with torch.no_grad():
                y = images()
                assert close(exported(y), eager(y))


@pytest.mark.slow
@pytest.mark.parametrize("arch,layer", CASES, ids=IDS)
def test_torch_compile_fullgraph_forward_and_backward(arch, layer):
    """In float64: inductor reorders float32 sums, and the refiner's float32 gradients are good
    to only ~1e-3 relative (its BatchNorm backwards amplify rounding), so a float32 comparison
    would need a tolerance that hides real differences. One block: inductor compiles the
    forward, the backward and the eval forward from scratch, and a second block of the same
    layer only doubles that work."""
    torch._dynamo.reset()
    eager = make_model(arch, layer, depth=1).double()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = images().double()
    check_train_step(eager, compiled, x, tol=1e-10)
    check_eval(eager, compiled, x, tol=1e-10)


# ------------------------------------------------------------------------------ autocast


def _autocast_run(model, x, dy, spy=None):
    """A training step under CPU bfloat16 autocast: (output, parameter gradients)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), (spy or contextlib.nullcontext()):
        out = model(x)
        out.float().backward(dy)
    return out, [p.grad for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("arch,layer", CASES, ids=IDS)
def test_autocast_bfloat16_runs_the_kernels_in_bfloat16(arch, layer):
    """The op sees bfloat16 q; outputs and gradients are within twice the error (vs float64) of
    a bfloat16 reference: timm's own Attention (SDPA) for FusedAttention, the reference
    backend under the same autocast for RefinerAttention."""
    model = make_model(arch, layer).train()
    if layer == "fused":
        reference = timm_twin(arch, model).train()
    else:
        reference = copy.deepcopy(model)
        for blk in reference.blocks:
            blk.attn.backend = "reference"
    truth = copy.deepcopy(model).double()
    x = images()
    want = truth(x.double())
    dy = torch.randn_like(want)
    want.backward(dy)
    truth_grads = [p.grad for p in truth.parameters()]
    before = buffers(model)
    spy = OpDtypes()
    out, grads = _autocast_run(model, x, dy.float(), spy)
    ref, ref_grads = _autocast_run(reference, x, dy.float())
    assert spy.dtypes(OPS[layer], 0) == {torch.bfloat16}
    assert all(g.dtype == torch.float32 for g in grads)
    for got, r, t in zip([out, *grads], [ref, *ref_grads], [want, *truth_grads]):
        assert max_err(got, t) <= 2 * max_err(r, t) + 1e-3 * max(1.0, t.abs().max().item())
    after = buffers(model)
    for name in after:  # the refiner's BatchNorm statistics: float32 and updated
        assert after[name].dtype == before[name].dtype, name
        if name.endswith("running_mean") or name.endswith("running_var"):
            assert after[name].dtype == torch.float32 and not torch.equal(after[name],
                                                                          before[name]), name


@pytest.mark.slow
def test_torch_compile_under_autocast():
    torch._dynamo.reset()
    eager = make_model("vit", "fused").eval()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = eager(x), compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert close(got, want, 2e-2)


@pytest.mark.slow  # scripts a whole model
def test_torchscript_under_autocast():
    eager = make_model("vit", "refiner").eval()
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = images()
    spy = OpDtypes()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = eager(x)
        with spy:
            got = scripted(x)
    assert spy.dtypes(OPS["refiner"], 0) == {torch.bfloat16}
    assert close(got, want, 2e-2)


# ----------------------------------------------------------- intermediates and features


@pytest.mark.parametrize("arch,layer", CASES, ids=IDS)
def test_forward_intermediates(arch, layer):
    model = make_model(arch, layer).eval()
    x = images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert close(final, model.forward_features(x))
        assert [tuple(t.shape) for t in inter] == [(2, 64, 8, 8)] * 2
        if layer == "fused":
            final_t, inter_t = timm_twin(arch, model).eval().forward_intermediates(x)
            assert close(final, final_t)
            for a, b in zip(inter, inter_t):
                assert close(a, b)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_features_only_model(layer):
    torch.manual_seed(0)
    feats = timm.create_model(ARCHS["vit"], attn_layer=LAYERS[layer], features_only=True,
                              out_indices=(0, 1), **SMALL)
    feats.eval()
    x = images()
    with torch.no_grad():
        got = feats(x)
        _, want = feats.model.forward_intermediates(x, indices=(0, 1), intermediates_only=False)
    assert [tuple(t.shape) for t in got] == [(2, 64, 8, 8)] * 2
    for a, b in zip(got, want):
        assert close(a, b)
