"""FusedAttention.forward(x, attn_mask) with timm's meaning (SDPA's: bool True = takes part, a
float mask is added to the logits) and attention dropout (attn_drop) inside the fused kernels.

Every test runs on both backends: the C++ kernels and the plain-PyTorch reference take masks
and dropout alike.
"""
import copy

import pytest
import torch

timm = pytest.importorskip("timm")

from fastattnreg import FusedAttention, RefinerAttention, attention_match_ref, attention_ref  # noqa: E402
from fastattnreg.exports import maps_shape  # noqa: E402
from fastattnreg.ops.dropout import draw_rng, dropout_keep_mask  # noqa: E402
from conftest import max_err, requires_cpp  # noqa: E402

pytestmark = requires_cpp

BACKENDS = ["reference", "cpp"]
DIM, HEADS, N = 48, 3, 17


def pair(backend, **kwargs):
    """timm's Attention and FusedAttention with the same float64 weights (strict load)."""
    torch.manual_seed(0)
    theirs = timm.layers.Attention(DIM, num_heads=HEADS, qkv_bias=True, **kwargs).double()
    ours = FusedAttention(DIM, num_heads=HEADS, qkv_bias=True, backend=backend, **kwargs)
    ours = ours.double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def key_padding_mask(B=2):
    """(B, 1, 1, N) bool, True = the key takes part; sample b drops its last 3 + 2b keys."""
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    for b in range(B):
        keep[b, ..., N - 3 - 2 * b:] = False
    return keep


def check_against_timm(theirs, ours, mask, mask_grad=False):
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    dy = torch.randn(2, N, DIM, dtype=torch.float64)
    results = []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_()
        mi = mask.detach().clone().requires_grad_(mask_grad)
        out = module(xi, attn_mask=mi)
        inputs = (xi, mi) if mask_grad else (xi,)
        results.append((out, torch.autograd.grad(out, inputs, dy)))
    (want, want_grads), (got, got_grads) = results
    assert max_err(got, want) <= 1e-10
    for g, w in zip(got_grads, want_grads):
        assert max_err(g, w) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_bool_mask_matches_timm(backend):
    check_against_timm(*pair(backend), key_padding_mask())


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_bias_and_its_gradient_match_timm(backend):
    bias = torch.randn(N, N, dtype=torch.float64)
    check_against_timm(*pair(backend), bias, mask_grad=True)


@pytest.mark.parametrize("fused_timm", [True, False], ids=["timm_sdpa", "timm_eager"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vit_with_a_mask_matches_timm(backend, fused_timm):
    kw = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=DIM, depth=2,
              num_heads=HEADS, num_classes=5)
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", **kw).double()
    for blk in theirs.blocks:
        blk.attn.fused_attn = fused_timm
    ours = timm.create_model("vit_tiny_patch16_224", attn_layer=FusedAttention, **kw).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for blk in ours.blocks:
        blk.attn.backend = backend
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    mask = key_padding_mask()  # N = 1 + 16 patches = 17 tokens
    assert max_err(ours(x, attn_mask=mask), theirs(x, attn_mask=mask)) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_fx_traced_layer_takes_the_mask_at_run_time(backend):
    _, ours = pair(backend)
    traced = torch.fx.symbolic_trace(copy.deepcopy(ours))
    x, mask = torch.randn(2, N, DIM, dtype=torch.float64), key_padding_mask()
    assert max_err(traced(x, mask), ours(x, attn_mask=mask)) <= 1e-12
    assert max_err(traced(x), ours(x)) <= 1e-12


def test_torchscript_layer_takes_the_mask():
    _, ours = pair("cpp")
    _, want = pair("reference")
    scripted = torch.jit.script(copy.deepcopy(ours))
    x, mask = torch.randn(2, N, DIM, dtype=torch.float64), key_padding_mask()
    assert max_err(scripted(x, mask), want(x, attn_mask=mask)) <= 1e-10


# -------------------------------------------------------------------------- attention dropout


def by_hand(layer, x, p, seed):
    """layer's forward with attention_ref and the dropout keep-mask the kernels draw from
    torch's generator after torch.manual_seed(seed)."""
    B = x.shape[0]
    q, k, v = layer.qkv(x).reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    torch.manual_seed(seed)
    keep = dropout_keep_mask(maps_shape("full", *q.shape[:3]), p, draw_rng(q.device))
    out = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep)
    return layer.proj(out.transpose(1, 2).reshape(B, N, DIM))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dropout_in_training_only(backend):
    _, ours = pair(backend, attn_drop=0.3)
    _, plain = pair(backend)
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    ours.train()
    torch.manual_seed(7)
    out = ours(x)
    assert max_err(out, by_hand(ours, x, 0.3, seed=7)) <= 1e-10
    assert max_err(out, plain(x)) > 1e-3  # dropout did act
    torch.manual_seed(7)
    assert torch.equal(ours(x), out)  # repeatable under one seed
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.isfinite(ours.qkv.weight.grad).all()
    ours.eval(), plain.eval()
    assert torch.equal(ours(x), plain(x))


def test_torchscript_dropout_draws_as_eager():
    _, ours = pair("cpp", attn_drop=0.3)
    scripted = torch.jit.script(copy.deepcopy(ours)).train()
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    torch.manual_seed(3)
    got = scripted(x)
    assert max_err(got, by_hand(ours, x, 0.3, seed=3)) <= 1e-10


# ------------------------------------------------------------------------------ clear errors


def test_match_teacher_takes_a_mask_and_refuses_dropout():
    layer = FusedAttention(DIM, num_heads=HEADS, attn_drop=0.1, backend="cpp")
    x = torch.randn(2, N, DIM)
    t = torch.randn(2, HEADS, N, DIM // HEADS)
    layer.match_teacher = (t, t, "kl", "all", None)
    with pytest.raises(NotImplementedError, match=r"no attention dropout yet; got attn_drop=0.1"):
        layer(x)
    layer.eval()  # no dropout in eval mode: the teacher runs, with the mask on both sides
    mask = key_padding_mask()
    out = layer(x, attn_mask=mask)
    layer.match_teacher = None
    assert torch.equal(out, layer(x, attn_mask=mask))
    qkv = layer.qkv(x).reshape(2, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    layer.match_teacher = (t, t, "kl", "all", None)
    layer(x, attn_mask=mask)
    want = attention_match_ref(q, k, qkv[2], t, t, attn_mask=mask, kind="kl")[1]
    assert torch.allclose(layer.match_loss, want, atol=1e-5)


def test_refiner_refuses_a_mask_naming_its_shape():
    layer = RefinerAttention(DIM, num_heads=HEADS, backend="cpp")
    with pytest.raises(NotImplementedError, match=r"attn_mask is not supported .*shape "
                                                  r"\(2, 1, 1, 17\)"):
        layer(torch.randn(2, N, DIM), attn_mask=key_padding_mask())
    counts = [bn.num_batches_tracked.item() for bn in (layer.DLA.bn1, layer.adapt_bn)]
    assert counts == [0, 0]  # refused before any BatchNorm counter moved


@pytest.mark.parametrize("cls", [FusedAttention, RefinerAttention])
def test_is_causal_is_a_clear_error(cls):
    with pytest.raises(NotImplementedError, match="is_causal=True is not supported"):
        cls(DIM, num_heads=HEADS)(torch.randn(2, N, DIM), is_causal=True)

