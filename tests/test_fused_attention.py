"""FusedAttention as a drop-in for timm.layers.Attention inside timm's VisionTransformer."""
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from fastattnreg import FusedAttention, attention_ref  # noqa: E402
from conftest import max_err, requires_cpp  # noqa: E402

pytestmark = requires_cpp

CONFIGS = {
    # head dim 16, CLS token, qkv bias (timm's ViT defaults)
    "cls_d16": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=True),
    # head dim 48 and 80, QK-norm, global average pooling, no class token
    "gap_qknorm_d48": dict(img_size=32, patch_size=4, embed_dim=96, depth=2, num_heads=2,
                           qk_norm=True, class_token=False, global_pool="avg"),
    "d80_scale_norm": dict(img_size=16, patch_size=4, embed_dim=160, depth=1, num_heads=2,
                           scale_attn_norm=True),
}


def _pair(config, fused_timm):
    """A timm ViT and the same ViT with FusedAttention, sharing one state dict (strict load)."""
    torch.manual_seed(0)
    ref = VisionTransformer(num_classes=7, **config)
    for blk in ref.blocks:
        blk.attn.fused_attn = fused_timm
    ours = VisionTransformer(num_classes=7, attn_layer=FusedAttention, **config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fused_timm", [True, False], ids=["timm_sdpa", "timm_eager"])
def test_matches_timm_outputs_and_every_parameter_gradient(name, fused_timm):
    ref, ours = _pair(CONFIGS[name], fused_timm)
    img = CONFIGS[name]["img_size"]
    x = torch.randn(3, 3, img, img)
    target = torch.randn(3, 7)
    out_ref, out = ref(x), ours(x)
    assert max_err(out, out_ref) <= 1e-5
    ((out_ref - target) ** 2).sum().backward()
    ((out - target) ** 2).sum().backward()
    ref_params = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad is not None, pname
        assert max_err(p.grad, ref_params[pname].grad) <= 1e-5, pname


def test_parameter_names_are_timms():
    ours = FusedAttention(48, num_heads=3, qkv_bias=True, qk_norm=True, scale_norm=True,
                          norm_layer=nn.LayerNorm, gated=True)
    names = {n.split(".")[0] for n, _ in ours.named_parameters()}
    assert names == {"qkv", "q_norm", "k_norm", "norm", "gate", "proj"}
    theirs = timm.layers.Attention(48, num_heads=3, qkv_bias=True, qk_norm=True, scale_norm=True,
                                   norm_layer=nn.LayerNorm, gated=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 17, 48)
    assert max_err(ours(x), theirs(x)) <= 1e-5


@pytest.mark.parametrize("export", ["full", "head_mean", "cls"])
def test_export_keeps_maps_with_their_graph(export):
    attn = FusedAttention(48, num_heads=3, export=export)
    x = torch.randn(2, 17, 48, requires_grad=True)
    attn(x)
    assert attn.maps is not None and attn.maps.grad_fn is not None
    # The maps equal the reference maps computed from the module's own q, k.
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 3, 16).permute(2, 0, 3, 1, 4).unbind(0)
    _, ref_maps = attention_ref(q, k, v, export=export)
    assert max_err(attn.maps, ref_maps) <= 1e-6
    attn.maps.square().sum().backward()
    assert attn.qkv.weight.grad is not None and attn.qkv.weight.grad.abs().sum() > 0


def test_maps_from_every_block_of_a_timm_vit():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3,
                              num_classes=5, attn_layer=FusedAttention)
    for blk in model.blocks:
        blk.attn.export = "cls"
    model(torch.randn(2, 3, 32, 32))
    assert [tuple(b.attn.maps.shape) for b in model.blocks] == [(2, 3, 17)] * 3


def test_unsupported_features_are_clear_errors():
    attn = FusedAttention(48, num_heads=3)
    x = torch.randn(2, 17, 48)
    with pytest.raises(NotImplementedError, match="is_causal"):
        attn(x, is_causal=True)
    with pytest.raises(ValueError, match=r"dim must be divisible by num_heads; got dim=50, num_heads=3"):
        FusedAttention(50, num_heads=3)
    with pytest.raises(ValueError, match=r"export must be one of .*got 'all'"):
        FusedAttention(48, export="all")
