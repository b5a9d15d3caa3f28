"""structured_init_ and mimetic_init_ (fastattnreg.init), on our ViT and on timm's.

The structured check reads the maps that the fused C++ kernel exports for the pseudo input and
checks them against attention_ref before counting argmax hits, so a wrong kernel map could not
pass as a good init. On timm's ViT the pseudo input is taken from the model's own forward
(its patches and prefix tokens zeroed, so only the position embedding reaches the first block)
and each block's own norm1 and qkv make the maps: the heads must be impulses on the model as
it runs. Mimetic measure: the Pearson correlation of the flattened products
W_q^h W_k^hT and W_v W_o with the targets the init cut them from (and with I, for the sign).
"""
import copy

import pytest
import torch

import fastattnreg
from fastattnreg.init import mimetic_init_, pseudo_input, structured_init_
from fastattnreg.init.layers import attention_layers
from fastattnreg.init.structured import impulse_offsets, impulse_targets
from fastattnreg.models.pos_embed import sincos_pos_embed_2d
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


@pytest.mark.parametrize("pos_embed", ["sincos", "learn"])
def test_structured_init_writes_only_q_and_k(pos_embed):
    """A sincos model keeps every other tensor bit for bit (its buffer already holds the
    embedding); a learned embedding becomes the sin-cos one, class slot zero."""
    model = create_model("vit_tiny_patch4_32", **SMALL, pos_embed=pos_embed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = structured_init_(model, method="closed_form", seed=0)
    assert report.pos_embed == "write_sincos" and report.prefix_tokens == 1
    assert report.pos_embed_frozen == (pos_embed == "sincos")  # a buffer has no gradient
    after = model.state_dict()
    sincos = torch.cat([torch.zeros(1, 64), sincos_pos_embed_2d(8, 64)]).unsqueeze(0)
    assert torch.equal(after["pos_embed"], sincos)
    assert torch.equal(before["pos_embed"], sincos) == (pos_embed == "sincos")
    width = 64  # H * D
    for name, value in after.items():
        if name == "pos_embed":
            continue
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


def model_pseudo_tokens(model, img_size: int = 32) -> torch.Tensor:
    """(1, p + g*g, C): the first block's input when only the position embedding reaches it.

    Runs the model's own forward_features on a copy whose patch projection and class/register
    tokens are zero, so the tokens are what the model adds from pos_embed (with its own
    no_embed_class, register and norm_pre handling); a pre-hook on blocks[0] reads them.
    """
    m = copy.deepcopy(model).eval()
    seen = {}
    with torch.no_grad():
        m.patch_embed.proj.weight.zero_()
        if m.patch_embed.proj.bias is not None:
            m.patch_embed.proj.bias.zero_()
        for name in ("cls_token", "reg_token"):
            if getattr(m, name, None) is not None:
                getattr(m, name).zero_()
        hook = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x",
                                                                                       args[0]))
        m.forward_features(torch.zeros(1, 3, img_size, img_size))
        hook.remove()
    return seen["x"]


def block_maps(block, tokens: torch.Tensor) -> torch.Tensor:
    """(1, H, N, N) softmax maps of block.attn on block.norm1(tokens), from its own qkv."""
    attn = block.attn
    with torch.no_grad():
        x = block.norm1(tokens)
        B, N, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        _, maps = attention_ref(q, k, v, scale=attn.scale, export="full")
    return maps


def interior_hits(maps: torch.Tensor, grid: int, offsets, prefix: int, kernel_size: int):
    """Per head: the fraction of interior tokens (every k x k offset stays on the grid) whose
    row argmax over all keys is the head's target."""
    target = impulse_targets(grid, offsets).argmax(-1) + prefix  # (H, g*g)
    r = torch.arange(grid)
    inner = (r >= kernel_size // 2) & (r < grid - kernel_size // 2)
    rows = (inner[:, None] & inner[None, :]).reshape(-1)
    hit = maps[0, :, prefix:, :].argmax(-1) == target
    return hit[:, rows].double().mean(-1).tolist()


TIMM_VARIANTS = {
    "cls": dict(class_token=True, global_pool="token"),
    "no_cls": dict(class_token=False, global_pool="avg"),
    "no_embed_class": dict(class_token=True, global_pool="token", no_embed_class=True),
    "reg4_no_embed_class": dict(class_token=True, global_pool="token", reg_tokens=4,
                                no_embed_class=True),
    "reg2_embedded": dict(class_token=True, global_pool="token", reg_tokens=2),
    "dynamic_img_size": dict(class_token=True, global_pool="token", dynamic_img_size=True),
    "pre_norm": dict(class_token=True, global_pool="token", pre_norm=True),
    "rms_norm": dict(class_token=True, global_pool="token", norm_layer=torch.nn.RMSNorm),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(TIMM_VARIANTS))
@pytest.mark.parametrize("method", ["fit", "closed_form"])
def test_structured_init_on_stock_timm_vit_attends_as_impulse(variant, method):
    """Stock timm ViT (learned, random pos_embed): after the default init every head of every
    block hits its target on every interior token of the model's own pseudo input; with the
    model's original random embedding put back, the same heads miss (the check can fail)."""
    torch.manual_seed(0)
    model = small_timm_vit(**TIMM_VARIANTS[variant])
    with torch.no_grad():  # norms that are not the identity: the fit must use the model's
        for norm in [blk.norm1 for blk in model.blocks] + [model.norm_pre]:
            if getattr(norm, "weight", None) is not None:
                norm.weight.copy_(torch.linspace(0.7, 1.3, 64))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(torch.linspace(-0.1, 0.1, 64))
    random_pos = model.pos_embed.detach().clone()
    report = structured_init_(model, kernel_size=3, method=method, seed=0)
    prefix = model.num_prefix_tokens
    assert report.pos_embed == "write_sincos" and report.prefix_tokens == prefix
    assert not report.pos_embed_frozen and model.pos_embed.requires_grad
    covered = 0 if model.no_embed_class else prefix
    sincos = torch.cat([torch.zeros(covered, 64), sincos_pos_embed_2d(8, 64)])
    assert torch.equal(model.pos_embed[0].detach(), sincos)
    tokens = model_pseudo_tokens(model)
    assert tokens.shape == (1, prefix + 64, 64)
    for block in model.blocks:
        assert min(interior_hits(block_maps(block, tokens), 8, report.offsets, prefix, 3)) == 1.0
    assert min(report.hits) >= 0.95
    with torch.no_grad():
        model.pos_embed.copy_(random_pos)
    tokens = model_pseudo_tokens(model)
    missed = interior_hits(block_maps(model.blocks[0], tokens), 8, report.offsets, prefix, 3)
    assert max(missed) < 0.3, missed


def test_structured_init_on_our_learned_embedding_attends_as_impulse():
    model = create_model("vit_tiny_patch4_32", **SMALL, pos_embed="learn")
    report = structured_init_(model, kernel_size=5, method="fit", offsets="ordered", seed=2)
    tokens = model_pseudo_tokens(model)
    for block in model.blocks:
        assert min(interior_hits(block_maps(block, tokens), 8, report.offsets, 1, 5)) == 1.0


def test_structured_init_freeze_pos_embed():
    for model in (small_timm_vit(class_token=True, global_pool="token"),
                  create_model("vit_tiny_patch4_32", **SMALL, pos_embed="learn")):
        report = structured_init_(model, seed=0, freeze_pos_embed=True)
        assert report.pos_embed_frozen and not model.pos_embed.requires_grad
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert model.pos_embed.grad is None
        assert model.cls_token.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="freeze_pos_embed must be a bool; got 'yes'"):
        structured_init_(model, freeze_pos_embed="yes")


def test_structured_init_as_is_fits_the_learned_embedding():
    """as_is leaves the random learned embedding alone and fits on it: the heads hit on the
    model's own pseudo input (8x8 tokens in 64 channels can be told apart) as the report says,
    where the sin-cos fit of the same seed misses on that embedding."""
    torch.manual_seed(1)
    model = small_timm_vit(class_token=True, global_pool="token")
    other = copy.deepcopy(model)
    before = model.pos_embed.detach().clone()
    report = structured_init_(model, method="fit", seed=0, pos_embed="as_is")
    assert report.pos_embed == "as_is" and not report.pos_embed_frozen
    assert torch.equal(model.pos_embed.detach(), before) and model.pos_embed.requires_grad
    assert report.converged
    tokens = model_pseudo_tokens(model)
    targets = impulse_targets(8, report.offsets)
    for block in model.blocks:
        rates = hit_rates(block_maps(block, tokens), 8, report.offsets, prefix=1)
        assert min(rates) >= 0.85, rates
        assert max(abs(a - b) for a, b in zip(rates, report.hits)) <= 2 / targets.shape[1]
    sincos = structured_init_(other, method="fit", seed=0)
    with torch.no_grad():
        other.pos_embed.copy_(before)
    rates = hit_rates(block_maps(other.blocks[0], model_pseudo_tokens(other)), 8, sincos.offsets,
                      prefix=1)
    assert max(rates) < 0.3, rates


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


def assert_unchanged(model, snap):
    state, grads = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads


def bad_model(case: str):
    """(model, kwargs, error pattern) for one model structured_init_ cannot initialise."""
    vit = small_timm_vit
    if case == "no_pos_embed":
        return vit(class_token=True, global_pool="token", pos_embed="none"), {}, \
            r"VisionTransformer.pos_embed is None: .* needs a \(1, tokens, C\) tensor"
    if case == "rows":
        model = vit(class_token=True, global_pool="token")
        model.pos_embed = torch.nn.Parameter(torch.zeros(1, 60, 64))
        return model, {}, r"pos_embed has 60 rows; a 8x8 patch grid needs 64 plus 1 .*: 65"
    if case == "rows_no_embed_class":
        model = vit(class_token=True, global_pool="token", no_embed_class=True)
        model.pos_embed = torch.nn.Parameter(torch.zeros(1, 65, 64))
        return model, {}, r"has 65 rows; .* needs 64 plus 0 .*no_embed_class=True\): 64"
    if case == "width":
        model = vit(class_token=True, global_pool="token")
        model.pos_embed = torch.nn.Parameter(torch.zeros(1, 65, 32))
        return model, {}, r"pos_embed must have shape \(1, tokens, 64\).*got \(1, 65, 32\)"
    if case == "non_square_grid":
        return vit(class_token=True, global_pool="token", img_size=(32, 48)), {}, \
            r"square patch grid; got 8x12"
    if case == "uninferable_grid":
        model = vit(class_token=True, global_pool="token")
        model.patch_embed.grid_size = None
        model.pos_embed = torch.nn.Parameter(torch.zeros(1, 51, 64))
        return model, {}, r"no patch_embed.grid_size .* 51 rows \(1 prefix rows \+ 50 patches\)"
    if case == "grid_size_argument":
        return vit(class_token=True, global_pool="token"), {"grid_size": 7}, \
            r"has 65 rows; a 7x7 patch grid needs 49 plus 1 .*: 50"
    if case == "dim_not_multiple_of_4":
        return vit(class_token=True, global_pool="token", embed_dim=66, num_heads=6), {}, \
            r"sin-cos embedding needs dim divisible by 4; got dim=66"
    if case == "no_norm1":
        model = vit(class_token=True, global_pool="token")
        del model.blocks[0].norm1
        return model, {}, r"no block with `attn` = the first attention layer .* `norm1`"
    assert case == "mode"
    return vit(class_token=True, global_pool="token"), {"pos_embed": "learned"}, \
        r"pos_embed must be one of \('write_sincos', 'as_is'\); got 'learned'"


BOTH_MODES = ["no_pos_embed", "rows", "rows_no_embed_class", "width", "non_square_grid",
              "uninferable_grid", "grid_size_argument", "no_norm1"]


@pytest.mark.parametrize("case, mode", [(c, m) for c in BOTH_MODES
                                        for m in ("write_sincos", "as_is")]
                         + [("dim_not_multiple_of_4", "write_sincos"), ("mode", None)])
def test_structured_init_bad_models_raise_before_any_change(case, mode):
    model, kwargs, pattern = bad_model(case)
    kwargs = {"pos_embed": mode, **kwargs} if mode else kwargs
    snap = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        structured_init_(model, seed=0, freeze_pos_embed=True, **kwargs)
    assert_unchanged(model, snap)


def test_structured_init_infers_the_grid_from_pos_embed():
    model = small_timm_vit(class_token=True, global_pool="token", reg_tokens=2)
    model.patch_embed.grid_size = None
    report = structured_init_(model, method="closed_form", offsets="ordered", seed=0)
    assert report.grid_size == 8 and report.prefix_tokens == 3 and min(report.hits) >= 0.95


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
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0; got -1"):
        mimetic_init_(model, alpha=-1)
    timm_qk_norm = small_timm_vit(class_token=True, global_pool="token", qk_norm=True)
    with pytest.raises(ValueError, match="q_norm is set"):
        mimetic_init_(timm_qk_norm)


def test_public_names():
    assert fastattnreg.init.structured_init_ is structured_init_
    assert fastattnreg.init.mimetic_init_ is mimetic_init_
