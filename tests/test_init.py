"""structured_init_ and mimetic_init_ (fastattnreg.init), on our ViT and on timm's.

The structured check reads the maps that the fused C++ kernel exports for the pseudo input and
checks them against attention_ref before counting argmax hits, so a wrong kernel map could not
pass as a good init. Mimetic measure: the Pearson correlation of the flattened products
W_q^h W_k^hT and W_v W_o with the targets the init cut them from (and with I, for the sign).
"""
import pytest
import torch

import fastattnreg
from fastattnreg.init import mimetic_init_, pseudo_input, structured_init_
from fastattnreg.init.layers import attention_layers
from fastattnreg.init.structured import impulse_offsets, impulse_targets
from fastattnreg.init.layers import make_generator
from fastattnreg.models import create_model
from fastattnreg.ops.attention import attention_ref

from conftest import max_err, requires_cpp
from vit_test_data import digits_batch, small_timm_vit

# A 8x8 grid (32 px, 4 px patches): big enough for kernel 5 to have interior tokens, small
# enough that the fit takes a second or two.
SMALL = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=2,
             num_heads=4)


def qkv_heads(layer):
    """W_q, W_k, W_v per head (H, C, D) and W_o (H*D, C) of an AttentionLayer, float64."""
    H, D, C = layer.num_heads, layer.head_dim, layer.dim
    w = layer.module.qkv.weight.detach().double()
    wq, wk, wv = (w[i * H * D:(i + 1) * H * D].reshape(H, D, C).transpose(1, 2)
                  for i in range(3))
    return wq, wk, wv, layer.module.proj.weight.detach().double().T


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def pseudo_tokens(grid: int, dim: int, class_token: bool) -> torch.Tensor:
    """(1, N, C) float32 pseudo input, the class token's row zero (its layer-normed zero
    position embedding), as structured_init_ assumes."""
    pe = pseudo_input(grid, dim).float()
    if class_token:
        pe = torch.cat([pe.new_zeros(1, dim), pe])
    return pe.unsqueeze(0)


def fused_and_reference_maps(attn, tokens):
    """The (1, H, N, N) maps the layer's fused kernel exports, and attention_ref's."""
    attn.export = "full"
    with torch.no_grad():
        attn(tokens)
        fused = attn.maps
        B, N, _ = tokens.shape
        q, k, v = attn.qkv(tokens).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        _, ref = attention_ref(q, k, v, scale=attn.scale, export="full")
    attn.export, attn.maps = None, None
    return fused, ref


def hit_rates(maps: torch.Tensor, grid: int, offsets, prefix: int) -> list[float]:
    """Per head: the fraction of tokens whose shifted token is on the grid (every token for the
    interior, plus the border tokens a given offset keeps on the grid) whose row argmax, over
    all N keys, is that shifted token."""
    targets = impulse_targets(grid, offsets)  # (H, g*g, g*g)
    valid = targets.sum(-1) > 0
    rows = maps[0, :, prefix:, :]  # (H, g*g, N): the patch queries, all keys (CLS too)
    hits = (rows.argmax(-1) == targets.argmax(-1) + prefix) & valid
    return (hits.sum(-1).double() / valid.sum(-1)).tolist()


@requires_cpp
@pytest.mark.parametrize("method", ["fit", "closed_form"])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("class_token", [True, False])
def test_structured_init_heads_hit_their_shifted_token(method, kernel_size, class_token):
    pool = "token" if class_token else "avg"
    model = create_model("vit_tiny_patch4_32", **SMALL, class_token=class_token,
                         global_pool=pool, pos_embed="sincos", backend="cpp")
    offsets = "random" if method == "fit" else "ordered"
    report = structured_init_(model, kernel_size=kernel_size, method=method, offsets=offsets,
                              seed=1)
    assert report.layers == 2 and report.grid_size == 8 and len(report.offsets) == 4
    assert all(max(abs(m), abs(n)) <= kernel_size // 2 for m, n in report.offsets)
    if method == "fit":
        assert report.converged and report.error <= 0.05 and 0 < report.steps < 10_000
    tokens = pseudo_tokens(8, 64, class_token)
    for block in model.blocks:
        fused, ref = fused_and_reference_maps(block.attn, tokens)
        assert max_err(fused, ref) < 1e-5
        rates = hit_rates(fused, 8, report.offsets, int(class_token))
        assert min(rates) >= 0.95, rates
    assert min(report.hits) >= 0.95


def test_offsets_ordered_centre_first_and_random_reproducible():
    gen = make_generator(0)
    ordered = impulse_offsets(12, 3, "ordered", gen)
    assert ordered[0] == (0, 0) and len(set(ordered[:9])) == 9 and ordered[9:] == ordered[:3]
    assert impulse_offsets(25, 5, "ordered", gen)[9:] == sorted(
        (m, n) for m in range(-2, 3) for n in range(-2, 3) if max(abs(m), abs(n)) == 2)
    a = create_model("vit_tiny_patch4_32", **SMALL)
    b = create_model("vit_tiny_patch4_32", **SMALL)
    ra = structured_init_(a, seed=5, steps=20)
    rb = structured_init_(b, seed=5, steps=20)
    assert ra.offsets == rb.offsets
    qk = slice(0, 128)  # the q and k rows; v differs (the two models' own random init)
    assert torch.equal(a.blocks[0].attn.qkv.weight[qk], b.blocks[0].attn.qkv.weight[qk])
    draws = {tuple(impulse_offsets(4, 5, "random", make_generator(s))) for s in range(5)}
    assert len(draws) > 1


def test_structured_init_writes_only_q_and_k():
    model = create_model("vit_tiny_patch4_32", **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structured_init_(model, method="closed_form", seed=0)
    after = model.state_dict()
    width = 64  # H * D
    for name, value in after.items():
        if name.endswith("attn.qkv.weight"):
            assert torch.equal(value[2 * width:], before[name][2 * width:])  # v untouched
            assert not torch.equal(value[:width], before[name][:width])
        elif name.endswith("attn.qkv.bias"):
            assert torch.count_nonzero(value[:2 * width]) == 0
            assert torch.equal(value[2 * width:], before[name][2 * width:])
        else:
            assert torch.equal(value, before[name]), name
    w0, w1 = (blk.attn.qkv.weight[:2 * width] for blk in model.blocks)
    assert torch.equal(w0, w1)  # the same fit in every layer


def test_structured_and_mimetic_init_work_on_timm_vit():
    model = small_timm_vit(class_token=True, global_pool="token")
    report = structured_init_(model, kernel_size=3, method="fit", seed=0)
    assert report.converged and report.layers == 2
    tokens = pseudo_tokens(8, 64, class_token=True)
    attn = model.blocks[1].attn
    with torch.no_grad():
        q, k, v = attn.qkv(tokens).reshape(1, 65, 3, 4, 16).permute(2, 0, 3, 1, 4)
        _, maps = attention_ref(q, k, v, export="full")
    assert min(hit_rates(maps, 8, report.offsets, prefix=1)) >= 0.95

    rep = mimetic_init_(model, seed=0)
    layer = attention_layers(model)[0]
    wq, wk, wv, wo = qkv_heads(layer)
    assert pearson(wq[0] @ wk[0].T, rep.qk_targets[0][0]) > 0.6
    assert pearson(wv.permute(1, 0, 2).reshape(64, 64) @ wo, rep.vo_targets[0]) > 0.999


def test_mimetic_products_correlate_with_their_targets():
    model = create_model("vit_tiny_patch4_32", **SMALL)
    baseline = qkv_heads(attention_layers(model)[0])
    rep = mimetic_init_(model, alpha=0.7, beta=0.7, seed=3)
    assert rep.layers == 2
    eye = torch.eye(64, dtype=torch.float64)
    for i, layer in enumerate(attention_layers(model)):
        wq, wk, wv, wo = qkv_heads(layer)
        for h in range(4):
            qk = wq[h] @ wk[h].T  # (C, C): rank D = 16 of 64, so not exact
            assert pearson(qk, rep.qk_targets[i][h]) > 0.6
            assert pearson(qk, eye) > 0.3 and qk.diagonal().mean() > 0.2
        vo = wv.permute(1, 0, 2).reshape(64, 64) @ wo  # all heads: H * D = C, so exact
        assert max_err(vo, rep.vo_targets[i]) < 1e-5
        assert pearson(vo, eye) < -0.5
        assert abs(vo.diagonal().mean().item() + 0.4) < 0.05
    # The measure tells inits apart: timm's default init is uncorrelated with I.
    wq, wk, _, _ = baseline
    assert abs(pearson(wq[0] @ wk[0].T, eye)) < 0.1
    # beta = 0: no identity part, so no correlation with I left.
    mimetic_init_(model, beta=0.0, delta=0.0, seed=3)
    wq, wk, _, _ = qkv_heads(attention_layers(model)[0])
    assert abs(pearson(wq[0] @ wk[0].T, eye)) < 0.1


@pytest.mark.parametrize("init", ["fit", "closed_form", "mimetic"])
def test_real_images_forward_backward_finite_after_init(init):
    model = create_model("vit_tiny_patch2_8", backend="auto")
    if init == "mimetic":
        mimetic_init_(model, seed=0)
    else:
        report = structured_init_(model, method=init, seed=0)
        assert min(report.hits) >= 0.95, report
    images, labels = digits_batch(32)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_init_bad_arguments_are_named():
    model = create_model("vit_tiny_patch2_8")
    with pytest.raises(ValueError, match="method must be one of"):
        structured_init_(model, method="svd")
    with pytest.raises(ValueError, match="offsets must be one of"):
        structured_init_(model, offsets="spiral")
    with pytest.raises(ValueError, match="kernel_size must be 3 or 5; got 4"):
        structured_init_(model, kernel_size=4)
    with pytest.raises(ValueError, match=r"patch grid \(2x2\) is too small for kernel_size=5"):
        structured_init_(create_model("vit_tiny_patch2_8", img_size=4), kernel_size=5)
    with pytest.raises(ValueError, match="has no attention layer"):
        structured_init_(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="alpha must be a number >= 0; got -1"):
        mimetic_init_(model, alpha=-1)
    timm_qk_norm = small_timm_vit(class_token=True, global_pool="token", qk_norm=True)
    with pytest.raises(ValueError, match="q_norm is set"):
        mimetic_init_(timm_qk_norm)


def test_public_names():
    assert fastattnreg.init.structured_init_ is structured_init_
    assert fastattnreg.init.mimetic_init_ is mimetic_init_
