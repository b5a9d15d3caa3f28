"""GTALoss and AttentionLink (fastattnreg/nn/regularizers.py) against eager recomputations.

The references here are built from the models' own q, k (captured by hooks on each layer's
`qkv` Linear, with their graph) and plain-PyTorch attention maps in float64: they state the
formulas of docs/methods.md sections 3 and 4 directly, independently of the fused kernels.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from fastattnreg import AttentionLink, FusedAttention, GTALoss, attention_match  # noqa: E402
from conftest import max_err, requires_cpp  # noqa: E402

pytestmark = requires_cpp

KINDS_ROWS = [(kind, rows) for kind in ("mse_logits", "kl") for rows in ("cls", "all")]


def _vit(**kw):
    """A tiny timm ViT with FusedAttention: 32 px, 8 px patches (4x4 grid, N = 17), 3 heads."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5,
               attn_layer=FusedAttention)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def _perturb(model, std=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))


def _layers(model):
    return [m for m in model.modules() if isinstance(m, FusedAttention)]


def _qk_by_hooks(model, x, grad=True):
    """Run model(x); return per FusedAttention layer (q, k, scale), q, k (B, H, N, D) with graph."""
    layers = _layers(model)
    outs = {}
    handles = [m.qkv.register_forward_hook(lambda _m, _i, o, j=j: outs.__setitem__(j, o))
               for j, m in enumerate(layers)]
    try:
        with torch.set_grad_enabled(grad):
            model(x)
    finally:
        for h in handles:
            h.remove()
    result = []
    for j, m in enumerate(layers):
        B, N, _ = outs[j].shape
        q, k, _ = outs[j].reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        result.append((m.q_norm(q), m.k_norm(k), m.scale))
    return result


def _eager_gta(student, source, x, layers, kind, rows, weight=1.0, dtype=torch.float64):
    """weight * sum_layers sum_heads mean_{batch, rows} divergence, from eager maps in `dtype`."""
    s_qk = _qk_by_hooks(student, x)
    t_qk = _qk_by_hooks(source, x, grad=False)
    total = 0.0
    for i in layers:
        (qs, ks, ss), (qt, kt, st) = s_qk[i], t_qk[i]
        s_logits = ss * qs.to(dtype) @ ks.to(dtype).transpose(-2, -1)  # (B, H, N, N)
        t_logits = st * qt.to(dtype) @ kt.to(dtype).transpose(-2, -1)
        if rows == "cls":  # query 0 over the patch keys 1..N-1
            s_logits, t_logits = s_logits[:, :, :1, 1:], t_logits[:, :, :1, 1:]
        if kind == "mse_logits":
            per_row = (s_logits - t_logits).square().sum(-1)  # (B, H, R)
        else:  # KL(teacher || student) of the softmax rows
            lt, ls = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
            per_row = (lt.exp() * (lt - ls)).sum(-1)
        total = total + per_row.mean(dim=(0, 2)).sum()  # mean over batch and rows, sum over heads
    return weight * total


def _assert_close_to_reference(value, student, source, x, layers, kind, rows, weight=1.0):
    """The precision rule: the float32 module is within 2x the error of the float32 eager formula
    (against float64), with a floor of 1e-4 relative: a KL row is a sum of terms of size
    |log p| ~ 3 that cancel to ~0.01, so either float32 result may be off by ~1e-5 relative
    by chance. A wrong formula (a missing mean, sum, renormalisation) is off by far more."""
    ref = _eager_gta(student, source, x, layers, kind, rows, weight).item()
    ref32 = _eager_gta(student, source, x, layers, kind, rows, weight, torch.float32).item()
    assert abs(value.item() - ref) <= max(2 * abs(ref32 - ref), 1e-4 * abs(ref)), (value, ref, ref32)


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


# ------------------------------------------------------------------------------------- GTA


def test_fused_attention_capture_and_match_slots():
    attn = FusedAttention(48, num_heads=3, qkv_bias=True)
    x = torch.randn(2, 17, 48)
    plain = attn(x)
    attn.capture_qk = True
    assert max_err(attn(x), plain) == 0
    q, k = attn.captured_qk
    assert tuple(q.shape) == (2, 3, 17, 16) and not q.requires_grad and not k.requires_grad
    (hq, hk, _), = _qk_by_hooks(attn, x)
    assert max_err(q, hq) == 0 and max_err(k, hk) == 0

    tq, tk = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8)
    attn.capture_qk, attn.match_teacher = False, (tq, tk, "kl", "all", 0.3)
    out = attn(x)
    _, loss = attention_match(hq, hk, hq, tq, tk, kind="kl", rows="all", teacher_scale=0.3)
    assert max_err(out, plain) == 0 and attn.match_loss.grad_fn is not None
    assert max_err(attn.match_loss, loss) <= 1e-6
    attn.export = "cls"
    with pytest.raises(RuntimeError, match=r"export='cls' cannot be combined with a match teacher"):
        attn(x)



@pytest.mark.parametrize("kind,rows", KINDS_ROWS + [("mse_probs", "all")])
def test_gta_is_exactly_zero_with_zero_gradient_at_step_0(kind, rows):
    source = _vit()
    student = copy.deepcopy(source)
    gta = GTALoss(student, source, kind=kind, rows=rows).train()
    x = torch.randn(4, 3, 32, 32)
    logits, reg = gta(x)
    assert reg.item() == 0.0
    params = [p for p in student.parameters()]
    for name_p, g in zip(student.named_parameters(), _grads(reg, params)):
        assert g is None or torch.count_nonzero(g) == 0, name_p[0]
    # The student's forward is unchanged by the matching (same attention output).
    assert max_err(logits, source(x)) <= 1e-6


@pytest.mark.parametrize("kind,rows", KINDS_ROWS)
def test_gta_equals_eager_formula_and_trains_only_the_student(kind, rows):
    source = _vit()
    student = copy.deepcopy(source)
    _perturb(student)
    gta = GTALoss(student, source, kind=kind, rows=rows, weight=0.7)
    x = torch.randn(3, 3, 32, 32)
    _, reg = gta(x)
    assert torch.isfinite(reg) and reg.item() > 0
    _assert_close_to_reference(reg, student, source, x, range(3), kind, rows, weight=0.7)
    ref = _eager_gta(student, source, x, range(3), kind, rows, weight=0.7)

    params = [p for p in student.parameters()]
    grads, ref_grads = _grads(reg, params), _grads(ref, params)
    scale = max(g.abs().max().item() for g in ref_grads if g is not None)
    for (name, _), g, rg in zip(student.named_parameters(), grads, ref_grads):
        assert (g is None) == (rg is None), name
        if g is not None:
            assert max_err(g, rg) <= 1e-4 * scale, name
    # Gradients reach every block's q/k projection (rows 0..2C of qkv), never the source.
    reg.backward()
    for blk in student.blocks:
        assert blk.attn.qkv.weight.grad[: 2 * 48].abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in source.parameters())


def test_gta_layer_subset_matches_reference_and_differs_from_all_layers():
    source = _vit()
    student = copy.deepcopy(source)
    _perturb(student)
    x = torch.randn(2, 3, 32, 32)
    _, reg_sub = GTALoss(student, source, layers=[0, 2])(x)
    _, reg_all = GTALoss(student, source)(x)
    _assert_close_to_reference(reg_sub, student, source, x, [0, 2], "mse_logits", "cls")
    assert reg_all.item() > reg_sub.item() > 0


class _TinyAttnNet(nn.Module):
    """Not a timm model: two FusedAttention layers on a token sequence (B, N, C)."""

    def __init__(self, dim=32, heads=2, head_dim=None):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.attn1 = FusedAttention(dim, num_heads=heads, attn_head_dim=head_dim)
        self.mid = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.attn2 = FusedAttention(dim, num_heads=heads, attn_head_dim=head_dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn1(x)
        x = x + self.attn2(self.mid(x))
        return self.head(x[:, 0])


@pytest.mark.parametrize("kind,rows", [("kl", "all"), ("mse_logits", "cls")])
def test_gta_with_an_own_model_whose_teacher_head_dim_differs(kind, rows):
    source = _TinyAttnNet(head_dim=24)  # teacher D = 24, student D = 16, same 2 heads
    student = _TinyAttnNet(head_dim=16)
    x = torch.randn(3, 11, 8)
    _, reg = GTALoss(student, source, kind=kind, rows=rows)(x)
    _assert_close_to_reference(reg, student, source, x, [0, 1], kind, rows)


def test_gta_keeps_the_source_frozen_and_clears_every_slot():
    source = _vit()
    student = copy.deepcopy(source)
    gta = GTALoss(student, source).train()
    assert not source.training and student.training
    assert not any(p.requires_grad for p in source.parameters())
    gta(torch.randn(2, 3, 32, 32))
    for m in _layers(student) + _layers(source):
        assert m.captured_qk is None and m.match_teacher is None and m.match_loss is None
        assert not m.capture_qk
    # A failing student forward still clears the slots.
    with pytest.raises(Exception):
        gta(torch.randn(2, 3, 16, 16))
    assert all(m.match_teacher is None for m in _layers(student))


def test_gta_bad_arguments_name_the_value():
    source = _vit()
    student = copy.deepcopy(source)
    with pytest.raises(ValueError, match=r"layer index 7 is out of range.*3 FusedAttention"):
        GTALoss(student, source, layers=[0, 7])
    with pytest.raises(ValueError, match=r"layers must not repeat an index; got \[1, 1\]"):
        GTALoss(student, source, layers=[1, 1])
    with pytest.raises(ValueError, match=r"student \(Sequential\) has no FusedAttention layers"):
        GTALoss(nn.Sequential(nn.Linear(4, 4)), source)
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'l2'"):
        GTALoss(student, source, kind="l2")
    with pytest.raises(ValueError, match=r"rows must be one of .*got 'patch'"):
        GTALoss(student, source, rows="patch")
    with pytest.raises(ValueError, match=r"weight must be a finite number; got nan"):
        GTALoss(student, source, weight=float("nan"))
    with pytest.raises(ValueError, match=r"same object"):
        GTALoss(source, source)
    with pytest.raises(ValueError, match=r"num_heads=3 but source has num_heads=4"):
        GTALoss(student, _vit(num_heads=4))
    with pytest.raises(ValueError, match=r"student has 3 FusedAttention layers but source has 2"):
        GTALoss(student, _vit(depth=2))
    pooled = _vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=r"rows='cls' needs a class token but the student has "
                                         r"num_prefix_tokens=0; use rows='all'"):
        GTALoss(copy.deepcopy(pooled), pooled)
    with pytest.raises(ValueError, match=r"but the source has num_prefix_tokens=0"):
        GTALoss(student, pooled)
    GTALoss(copy.deepcopy(pooled), pooled, rows="all")  # every row: no class token needed


# -------------------------------------------------------------------------------------- AAL


def _cnn():
    """A small frozen-guide CNN: named layers '2' (8 ch, 32x32) and '4' (16 ch, 16x16)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(16, 4, 3, stride=2, padding=1),
    )


def _eager_aal(aal, vit, cnn, x, prefix, received=False, cnn_ends=(3, 5)):
    """Unweighted AAL loss from eager maps and the module's link weights, in float64."""
    maps = []
    for q, k, scale in _qk_by_hooks(vit, x):
        probs = (scale * q.double() @ k.double().transpose(-2, -1)).softmax(-1)  # (B, H, N, N)
        rows = probs.mean(dim=2) if received else probs[:, :, 0]  # (B, H, N)
        maps.append(rows[:, :, prefix:])
    B = x.shape[0]
    vit_maps = torch.cat(maps, dim=1).reshape(B, -1, 4, 4)  # (B, M*H, g, g)
    with torch.no_grad():
        feats = [cnn[:end](x) for end in cnn_ends]  # outputs of cnn[end - 1]
        cnn_maps = torch.cat([F.interpolate(f, size=(4, 4), mode="bicubic", align_corners=False)
                              for f in feats], dim=1).double()  # (B, C, g, g)
    w = aal.link_weight().double().flatten(1)  # (C, M*H)
    a_hat = torch.einsum("cm,bmhw->bchw", w, vit_maps) + aal.links.bias.double()[:, None, None]
    a_n = a_hat.flatten(2) / a_hat.flatten(2).norm(dim=-1, keepdim=True)
    b_n = cnn_maps.flatten(2) / cnn_maps.flatten(2).norm(dim=-1, keepdim=True)
    return (a_n - b_n).square().sum(dim=(1, 2)).mean(), vit_maps, cnn_maps


def test_aal_shapes_schedule_and_frozen_cnn():
    vit, cnn = _vit(depth=2), _cnn()
    aal = AttentionLink(vit, cnn, ["2", "4"]).train()
    assert tuple(aal.links.weight.shape) == (24, 6, 1, 1)  # C = 8 + 16, M*H = 2 * 3
    assert not cnn.training and not any(p.requires_grad for p in cnn.parameters())
    x = torch.randn(2, 3, 32, 32)
    logits, vit_maps = aal.vit_forward(x)
    assert tuple(logits.shape) == (2, 5) and tuple(vit_maps.shape) == (2, 6, 4, 4)
    assert tuple(aal.cnn_maps(x, (4, 4)).shape) == (2, 24, 4, 4)
    logits, loss = aal(x)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    assert all(m.export is None and m.maps is None for m in _layers(vit))  # restored, no leak
    assert aal.weight() == 2000.0 and aal.weight(3) == pytest.approx(2000 * 0.99**3)
    aal.set_epoch(2)
    assert aal.weight() == pytest.approx(2000 * 0.99**2)
    custom = AttentionLink(vit, cnn, ["4"], schedule=lambda e: 10.0 / (1 + e))
    assert custom.weight(4) == 2.0 and tuple(custom.links.weight.shape) == (16, 6, 1, 1)


@pytest.mark.parametrize("reg_tokens", [0, 2], ids=["cls", "cls_and_registers"])
def test_aal_loss_matches_direct_recomputation(reg_tokens):
    vit, cnn = _vit(depth=2, reg_tokens=reg_tokens), _cnn()
    aal = AttentionLink(vit, cnn, ["2", "4"], weight=3.0)
    aal.set_epoch(1)
    x = torch.randn(3, 3, 32, 32)
    _, loss = aal(x)
    ref, ref_vit_maps, ref_cnn_maps = _eager_aal(aal, vit, cnn, x, prefix=1 + reg_tokens)
    assert abs(loss.item() - 3.0 * 0.99 * ref.item()) <= 1e-5 * loss.item()
    assert max_err(aal.vit_forward(x)[1], ref_vit_maps) <= 1e-6
    assert max_err(aal.cnn_maps(x, (4, 4)), ref_cnn_maps) <= 1e-6
    params = [vit.blocks[0].attn.qkv.weight, aal.links.weight, aal.links.bias]
    grads = _grads(loss, params)
    ref_grads = _grads(3.0 * 0.99 * ref, params)
    # 1e-3 of the largest entry: the L2 normalisation's backward (g - a_n <a_n, g>) / |a| cancels
    # in float32, most for the bias, whose gradient sums that over the grid and the batch.
    for g, rg in zip(grads, ref_grads):
        assert max_err(g, rg) <= 1e-3 * rg.abs().max().item()


def test_aal_loss_decreases_over_a_few_steps():
    torch.manual_seed(1)
    vit, cnn = _vit(depth=2), _cnn()
    aal = AttentionLink(vit, cnn, ["2", "4"], weight=1.0)
    opt = torch.optim.Adam([p for p in aal.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 3, 32, 32)
    losses = []
    for _ in range(8):
        _, loss = aal(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_aal_advanced_keeps_exactly_k_strongest_links_per_channel():
    vit, cnn = _vit(depth=2), _cnn()
    aal = AttentionLink(vit, cnn, ["2", "4"], weight=1.0)
    adv = aal.advanced(2)
    assert adv.vit is vit and adv.cnn is cnn and adv is not aal
    mask = adv.link_mask.flatten(1)  # (C, M*H)
    assert mask.sum(dim=1).tolist() == [2.0] * 24
    strongest = aal.links.weight.detach().abs().flatten(1).topk(2, dim=1).indices.sort(1).values
    assert torch.equal(mask.nonzero()[:, 1].view(24, 2), strongest)
    assert torch.equal(adv.links.weight.flatten(1) != 0, mask.bool())

    # Trained further, the dropped links stay 0 and the loss stays finite.
    opt = torch.optim.AdamW([p for p in adv.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        _, loss = adv(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert (adv.links.weight.flatten(1) != 0).sum(dim=1).tolist() == [2] * 24

    frozen = aal.advanced(1, train_links=False)
    assert not frozen.links.weight.requires_grad and frozen.link_mask.sum() == 24
    for bad in (0, 7, 2.0, True):
        with pytest.raises(ValueError, match=rf"k must be an int in \[1, 6\].*got {bad!r}"):
            aal.advanced(bad)


def test_aal_cls_less_vit_uses_the_attention_each_patch_receives():
    vit = _vit(depth=2, class_token=False, global_pool="avg")  # N = 16 patches, no prefix
    cnn = _cnn()
    aal = AttentionLink(vit, cnn, ["4"], weight=1.0)
    x = torch.randn(2, 3, 32, 32)
    # The kernels reduce the columns (export="key_mean"): no layer exports its full maps.
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: seen.append(m.export))
             for b in vit.blocks]
    logits, loss = aal(x)
    for h in hooks:
        h.remove()
    assert seen == ["key_mean", "key_mean"]
    ref, ref_vit_maps, _ = _eager_aal(aal, vit, cnn, x, prefix=0, received=True, cnn_ends=(5,))
    assert tuple(logits.shape) == (2, 5)
    assert max_err(aal.vit_forward(x)[1], ref_vit_maps) <= 1e-6
    # "received" maps of a layer sum to N / N = 1 over the grid (columns of a stochastic matrix).
    assert max_err(ref_vit_maps.sum(dim=(2, 3)), torch.ones(2, 6)) <= 1e-9
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    loss.backward()
    assert vit.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"vit_map='cls' needs a CLS token.*num_prefix_tokens=0"):
        AttentionLink(vit, cnn, ["4"], vit_map="cls")


def test_aal_bad_arguments_name_the_value():
    vit, cnn = _vit(depth=2), _cnn()
    with pytest.raises(ValueError, match=r"cnn has no submodule named 'layer9'"):
        AttentionLink(vit, cnn, ["2", "layer9"])
    with pytest.raises(ValueError, match=r"cnn_layers must be a non-empty list.*got \[\]"):
        AttentionLink(vit, cnn, [])
    with pytest.raises(ValueError, match=r"vit \(Sequential\) has no FusedAttention layers"):
        AttentionLink(nn.Sequential(nn.Linear(3, 3)), cnn, ["2"])
    with pytest.raises(ValueError, match=r"layer index 2 is out of range: vit has 2"):
        AttentionLink(vit, cnn, ["2"], layers=[2])
    with pytest.raises(ValueError, match=r"vit_map must be one of .*got 'mean'"):
        AttentionLink(vit, cnn, ["2"], vit_map="mean")
    with pytest.raises(ValueError, match=r"decay must be > 0; got -0.5"):
        AttentionLink(vit, cnn, ["2"], decay=-0.5)
    with pytest.raises(ValueError, match=r"epoch must be an int >= 0; got -1"):
        AttentionLink(vit, cnn, ["2"]).set_epoch(-1)
    with pytest.raises(ValueError, match=r"cnn_input_size must be given"):
        AttentionLink(_TinyAttnNet(), cnn, ["2"])
