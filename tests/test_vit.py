"""fastattnreg.models: ViTConfig, VisionTransformer, presets, timm compatibility, maps, rollout."""
import dataclasses
import inspect

import pytest
import torch

import fastattnreg
from fastattnreg.models import (PRESETS, ViTConfig, VisionTransformer, attention_rollout,
                                cls_rollout_grid, create_model, load_timm_state_dict,
                                sincos_pos_embed_2d)
from fastattnreg.nn.attention import FusedAttention
from fastattnreg.nn.refiner import RefinerAttention

from conftest import max_err, requires_cpp
from vit_test_data import digits_batch

SMALL = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=2,
             num_heads=4)
TIMM_PRESETS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")


def timm_twin(model: VisionTransformer):
    """timm's VisionTransformer with model's configuration (a learned pos_embed stands in for
    a fixed sin-cos one: timm has no fixed embedding; the state dict carries the values)."""
    import timm  # an optional dependency (the test extra)

    c = model.config
    return timm.models.VisionTransformer(
        img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans,
        num_classes=c.num_classes, embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, class_token=c.class_token,
        global_pool=c.global_pool)


@pytest.mark.parametrize("name", TIMM_PRESETS)
def test_timm_presets_have_timm_names_and_shapes(name):
    """Built on the meta device: every key and shape of timm's registered model, no memory."""
    import timm  # an optional dependency (the test extra)

    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(name, pretrained=False)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b


@pytest.mark.parametrize("class_token,global_pool,pos_embed", [
    (True, "token", "learn"), (False, "avg", "learn"), (True, "avg", "sincos"),
])
def test_timm_checkpoint_round_trip(class_token, global_pool, pos_embed):
    model = create_model("vit_tiny_patch4_32", **SMALL, class_token=class_token,
                         global_pool=global_pool, pos_embed=pos_embed).eval()
    theirs = timm_twin(model).eval()
    x = torch.randn(3, 3, 32, 32)
    # timm -> ours, strictly (a state dict, a wrapped checkpoint, the module itself)
    load_timm_state_dict(model, {"model": theirs.state_dict()})
    load_timm_state_dict(model, theirs)
    with torch.no_grad():
        assert max_err(model(x), theirs(x)) < 1e-5
        assert max_err(model.forward_features(x), theirs.forward_features(x)) < 1e-5
    # ours -> timm, strictly, after our weights changed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    theirs.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert max_err(model(x), theirs(x)) < 1e-5


def test_timm_state_dict_of_another_config_is_named():
    model = create_model("vit_tiny_patch4_32", **SMALL)
    other = timm_twin(create_model("vit_tiny_patch4_32", **{**SMALL, "num_classes": 5}))
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(5, 64\) vs model \(10, 64\)"):
        load_timm_state_dict(model, other.state_dict())


def test_sincos_pos_embed_is_a_fixed_buffer():
    model = create_model("vit_tiny_patch4_32", **SMALL, pos_embed="sincos")
    assert "pos_embed" in model.state_dict()
    assert all("pos_embed" not in n for n, _ in model.named_parameters())
    expected = sincos_pos_embed_2d(8, 64)
    assert torch.equal(model.pos_embed[0, 1:], expected)
    assert torch.count_nonzero(model.pos_embed[0, 0]) == 0  # the class token's position
    # The rows are distinct and a shift by one column is a rotation: equal norms everywhere.
    assert torch.allclose(expected.norm(dim=1), torch.full((64,), 32 ** 0.5))
    assert torch.cdist(expected, expected).add(torch.eye(64)).min() > 0.1


@requires_cpp
@pytest.mark.parametrize("attn", ["fused", "refiner"])
def test_every_parameter_gets_a_finite_gradient_on_digits(attn):
    model = create_model("vit_tiny_patch2_8", attn=attn, backend="cpp", drop_path_rate=0.1)
    cls = FusedAttention if attn == "fused" else RefinerAttention
    assert all(type(blk.attn) is cls and blk.attn.backend == "cpp" for blk in model.blocks)
    images, labels = digits_batch(24)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@requires_cpp
def test_cpp_and_reference_backends_agree():
    torch.manual_seed(0)
    cpp = create_model("vit_tiny_patch4_32", **SMALL, backend="cpp", global_pool="avg",
                       class_token=False)
    ref = create_model("vit_tiny_patch4_32", **SMALL, backend="reference", global_pool="avg",
                       class_token=False)
    ref.load_state_dict(cpp.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_c, out_r = cpp(x), ref(x)
    assert max_err(out_c, out_r) < 1e-5
    out_c.square().sum().backward()
    out_r.square().sum().backward()
    for (name, a), b in zip(cpp.named_parameters(), ref.parameters()):
        assert max_err(a.grad, b.grad) < 1e-4 * max(1.0, b.grad.abs().max().item()), name


@requires_cpp
def test_attention_maps_come_from_the_fused_kernel_and_restore_state():
    model = create_model("vit_tiny_patch4_32", **SMALL, backend="cpp").eval()
    ref = create_model("vit_tiny_patch4_32", **SMALL, backend="reference").eval()
    ref.load_state_dict(model.state_dict())
    model.blocks[1].attn.export = "cls"  # a regulariser's setting must survive the call
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    full = model.attention_maps(x, export="full")
    assert len(full) == 2 and full[0].shape == (2, 4, 65, 65)
    assert model.blocks[0].attn.export is None and model.blocks[1].attn.export == "cls"
    assert model.blocks[0].attn.maps is None
    ref_full = ref.attention_maps(x, export="full")
    for a, b in zip(full, ref_full):
        assert max_err(a, b) < 1e-5
        assert torch.allclose(a.sum(-1), torch.ones(2, 4, 65))
    mean = model.attention_maps(x, export="head_mean")
    cls = model.attention_maps(x, export="cls")
    for f, m, c in zip(full, mean, cls):
        assert max_err(m, f.mean(1)) < 1e-6 and max_err(c, f[:, :, 0]) < 1e-6
    full[1].sum().backward()  # differentiable, back to the images
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="export must be one of"):
        model.attention_maps(x, export="rows")


def test_attention_maps_name_a_layer_without_maps():
    model = create_model("vit_tiny_patch2_8")
    model.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(RuntimeError, match="Identity does not export attention maps"):
        model.attention_maps(torch.randn(1, 1, 8, 8))


def test_attention_rollout():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 5, 5).softmax(-1) for _ in range(3)]
    roll = attention_rollout(maps)
    assert roll.shape == (2, 5, 5)
    assert torch.allclose(roll.sum(-1), torch.ones(2, 5))  # still a row-stochastic matrix
    eye = torch.eye(5)
    a = [0.5 * m.mean(1) + 0.5 * eye for m in maps]
    assert torch.allclose(roll, a[2] @ a[1] @ a[0], atol=1e-6)
    assert torch.allclose(attention_rollout([m.mean(1) for m in maps]), roll)  # head_mean input
    assert torch.allclose(attention_rollout(maps, residual=1.0), eye.expand(2, 5, 5))
    assert torch.allclose(attention_rollout(maps[:1], residual=0.0, head_fusion="max"),
                          maps[0].amax(1) / maps[0].amax(1).sum(-1, keepdim=True))
    dropped = attention_rollout(maps[:1], residual=0.0, discard_ratio=0.4)
    # The 2 smallest of 5 entries per row are discarded, except the class-token column 0.
    low = maps[0].mean(1).topk(2, dim=-1, largest=False).indices
    expected = torch.zeros(2, 5, 5, dtype=torch.bool).scatter_(-1, low, True)
    expected[..., 0] = False
    assert torch.equal(dropped == 0, expected)
    assert cls_rollout_grid(torch.randn(2, 10, 10), 3).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        attention_rollout(maps, head_fusion="median")
    with pytest.raises(ValueError, match=r"maps\[1\] has shape \(2, 4, 4\)"):
        attention_rollout([maps[0], maps[1][..., :4, :4]])


def test_presets_and_overrides():
    assert set(PRESETS) >= {"vit_tiny_patch2_8", "vit_tiny_patch4_32", *TIMM_PRESETS}
    digits = create_model("vit_tiny_patch2_8")
    assert digits.config.num_tokens == 17 and digits.config.in_chans == 1
    model = create_model("vit_tiny_patch2_8", num_classes=3, backend="reference")
    assert model.head.out_features == 3 and model.blocks[0].attn.backend == "reference"
    assert PRESETS["vit_tiny_patch2_8"].num_classes == 10  # the preset is not modified
    assert create_model("vit_tiny_patch2_8", num_classes=0)(torch.zeros(2, 1, 8, 8)).shape == (2, 64)
    # fields documented by a comment each
    source = inspect.getsource(ViTConfig)
    for f in dataclasses.fields(ViTConfig):
        line = next(l for l in source.splitlines() if l.strip().startswith(f"{f.name}:"))
        assert "#" in line, f.name


def test_drop_path_is_random_in_training_only():
    model = create_model("vit_tiny_patch2_8", drop_path_rate=0.5)
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_bad_config_errors_are_named():
    with pytest.raises(ValueError, match="patch_size=3 must divide img_size=8"):
        create_model("vit_tiny_patch2_8", patch_size=3)
    with pytest.raises(ValueError, match="embed_dim=66 must be divisible by num_heads=4"):
        create_model("vit_tiny_patch2_8", embed_dim=66)
    with pytest.raises(ValueError, match=r"unknown ViT preset 'vit_huge'; known presets: \["
                                         r"'vit_base_patch16_224'"):
        create_model("vit_huge")
    with pytest.raises(ValueError, match=r"unknown ViTConfig field\(s\) \['heads'\]"):
        create_model("vit_tiny_patch2_8", heads=2)
    with pytest.raises(ValueError, match="global_pool='token' needs class_token=True"):
        ViTConfig(class_token=False)
    with pytest.raises(ValueError, match="ViTConfig.attn must be one of"):
        ViTConfig(attn="linear")
    with pytest.raises(ValueError, match="backend must be one of"):
        ViTConfig(backend="cuda")
    with pytest.raises(ValueError, match="ViTConfig.pos_embed must be one of"):
        ViTConfig(pos_embed="rope")
    with pytest.raises(ValueError, match=r"images must be \(B, 1, 8, 8\); got shape \(2, 1, 9, 9\)"):
        create_model("vit_tiny_patch2_8")(torch.zeros(2, 1, 9, 9))
    config = ViTConfig()
    config.patch_size = 5  # changed after construction: checked again by the model
    with pytest.raises(ValueError, match="patch_size=5 must divide img_size=224"):
        VisionTransformer(config)


def test_public_names():
    assert fastattnreg.models.create_model is create_model
    assert fastattnreg.models.VisionTransformer is VisionTransformer
