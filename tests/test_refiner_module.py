"""RefinerAttention: loads the state dict of an eager refiner built from plain nn.Conv2d /
nn.BatchNorm2d with the public code's names and computes what it computes, in training (running
statistics, num_batches_tracked) and eval mode; works as timm's attn_layer."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastattnreg import RefinerAttention, refined_attention_ref
from fastattnreg.models import attention_rollout, create_model
from fastattnreg.ops.checks import REFINER_EXPORTS
from fastattnreg.train.plots import attention_grids
from conftest import max_err, requires_cpp

pytestmark = requires_cpp


class PlainDLA(nn.Module):
    def __init__(self, heads, expansion, ksize):
        super().__init__()
        hidden = heads * expansion
        self.conv_exp = nn.Conv2d(heads, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depth_sep_conv = nn.Conv2d(hidden, hidden, ksize, padding=ksize // 2, groups=hidden,
                                        bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv_pro = nn.Conv2d(hidden, heads, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(heads)

    def forward(self, attn):
        x = F.relu6(self.bn1(self.conv_exp(attn)))
        x = F.relu6(self.bn2(self.depth_sep_conv(x)))
        return self.bn3(self.conv_pro(x))


class PlainRefinerAttention(nn.Module):
    """The eager refiner as users write it: timm names plus the public Refiner code's."""

    def __init__(self, dim, heads, expansion, ksize):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.DLA = PlainDLA(heads, expansion, ksize)
        self.adapt_bn = nn.BatchNorm2d(heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
        attn = self.adapt_bn(self.DLA(attn) + attn)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def _randomise_batch_norms(module, momentum_none=False):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if momentum_none:
                    m.momentum = None


@pytest.mark.parametrize("expansion,ksize,momentum_none", [(3, 3, False), (2, 5, True), (1, 3, False)])
def test_loads_the_plain_modules_state_dict_and_matches_it(expansion, ksize, momentum_none):
    torch.manual_seed(0)
    dim, heads = 24, 3
    plain = PlainRefinerAttention(dim, heads, expansion, ksize).double()
    _randomise_batch_norms(plain, momentum_none)
    fused = RefinerAttention(dim, num_heads=heads, qkv_bias=True, expansion=expansion,
                             kernel_size=ksize, backend="cpp").double()
    fused.load_state_dict(plain.state_dict(), strict=True)
    for m in fused.modules():
        if isinstance(m, nn.BatchNorm2d) and momentum_none:
            m.momentum = None
    for step in range(3):  # training steps: outputs, gradients, running statistics, counters
        x = torch.randn(2, 17, dim, dtype=torch.float64)
        want, got = plain(x), fused(x)
        assert max_err(got, want) < 1e-11, step
        dy = torch.randn_like(want)
        g_want = torch.autograd.grad(want, list(plain.parameters()), dy)
        g_got = torch.autograd.grad(got, list(fused.parameters()), dy)
        names = [n for n, _ in plain.named_parameters()]
        assert names == [n for n, _ in fused.named_parameters()]
        for name, a, b in zip(names, g_got, g_want):
            assert max_err(a, b) < 1e-9 * max(1.0, b.abs().max().item()), name
    sd_plain, sd_fused = plain.state_dict(), fused.state_dict()
    for key, want in sd_plain.items():
        if key.endswith("num_batches_tracked"):
            assert sd_fused[key].item() == want.item() == 3, key
        else:
            assert max_err(sd_fused[key], want) < 1e-12, key
    plain.eval(), fused.eval()
    x = torch.randn(2, 17, dim, dtype=torch.float64)
    assert max_err(fused(x), plain(x)) < 1e-11


def test_attention_dropout_in_training_only_and_reproducible():
    torch.manual_seed(0)
    m = RefinerAttention(24, num_heads=3, attn_drop=0.3, backend="cpp")
    x = torch.randn(2, 17, 24)
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    torch.manual_seed(2)
    c = m(x)
    assert torch.equal(a, b) and max_err(a, c) > 1e-4
    m.eval()
    assert torch.equal(m(x), m(x))


def test_timm_vision_transformer_builds_and_trains_with_it():
    timm = pytest.importorskip("timm")
    model = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                          num_heads=3, num_classes=5, attn_layer=RefinerAttention)
    assert isinstance(model.blocks[0].attn, RefinerAttention)
    assert "blocks.0.attn.DLA.depth_sep_conv.weight" in model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    assert model.blocks[0].attn.DLA.conv_exp.weight.grad.abs().sum() > 0
    assert model.blocks[1].attn.adapt_bn.num_batches_tracked.item() == 1
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 5)


@pytest.mark.parametrize("kwargs,match", [
    ({"expansion": 0}, "expansion must be an integer >= 1"),
    ({"kernel_size": 4}, "kernel_size must be an odd integer"),
    ({"num_heads": 5}, "dim must be divisible by num_heads"),
    ({"attn_drop": 1.0}, "attn_drop must be a probability"),
])
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefinerAttention(24, **{"num_heads": 3, **kwargs})


def test_batch_norm_in_another_mode_raises():
    m = RefinerAttention(24, num_heads=3, backend="cpp")
    m.DLA.bn2.eval()
    with pytest.raises(NotImplementedError, match="must be in the module's mode"):
        m(torch.randn(1, 5, 24))


@pytest.mark.parametrize("export", REFINER_EXPORTS[1:])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_maps_match_the_reference_from_the_modules_parameters(training, export):
    torch.manual_seed(0)
    m = RefinerAttention(24, num_heads=3, qkv_bias=True, expansion=2, kernel_size=3,
                         export=export, backend="cpp").double().train(training)
    _randomise_batch_norms(m)
    assert m.export == export and m.maps is None
    bns = (m.DLA.bn1, m.DLA.bn2, m.DLA.bn3, m.adapt_bn)
    running = ([bn.running_mean.clone() for bn in bns], [bn.running_var.clone() for bn in bns])
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    m(x)
    q, k, v = m.qkv(x).reshape(2, 17, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)
    _, want = refined_attention_ref(
        q, k, v, m.DLA.conv_exp.weight, m.DLA.depth_sep_conv.weight, m.DLA.conv_pro.weight,
        [bn.weight for bn in bns], [bn.bias for bn in bns], *running, training=training,
        momentum=0.1, eps=1e-5, scale=8 ** -0.5, export=export)
    assert m.maps.shape == want.shape and max_err(m.maps, want) < 1e-11
    # The maps keep their graph: their gradient reaches qkv and every refiner parameter.
    params = [m.qkv.weight, m.DLA.conv_exp.weight, m.DLA.depth_sep_conv.weight,
              m.DLA.conv_pro.weight, *[bn.weight for bn in bns], *[bn.bias for bn in bns]]
    dmaps = torch.randn_like(want)
    got = torch.autograd.grad((m.maps * dmaps).sum(), params)
    ref = torch.autograd.grad((want * dmaps).sum(), params)
    for a, b in zip(got, ref):
        assert max_err(a, b) < 1e-9 * max(1.0, b.abs().max().item())
    m.export = None  # switched off: the next forward leaves no new maps
    m.maps = None
    m(x)
    assert m.maps is None


def test_bad_export_raises():
    with pytest.raises(ValueError, match="export must be one of"):
        RefinerAttention(24, num_heads=3, export="rows")


def test_attention_maps_of_a_refiner_vit_match_the_reference_backend():
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch2_8", attn="refiner", backend="cpp").eval()
    ref = create_model("vit_tiny_patch2_8", attn="refiner", backend="reference").eval()
    ref.load_state_dict(model.state_dict())
    model.blocks[1].attn.export = "cls"  # a regulariser's setting must survive the call
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    full = model.attention_maps(x, export="full")
    assert len(full) == 4 and full[0].shape == (2, 4, 17, 17)
    assert model.blocks[0].attn.export is None and model.blocks[1].attn.export == "cls"
    for a, b in zip(full, ref.attention_maps(x, export="full")):
        assert max_err(a, b) < 1e-5 * max(1.0, b.abs().max().item())
    mean = model.attention_maps(x, export="head_mean")
    cls = model.attention_maps(x, export="cls")
    for f, m, c in zip(full, mean, cls):
        assert max_err(m, f.mean(1)) < 1e-6 and max_err(c, f[:, :, 0]) < 1e-6
    full[2].square().sum().backward()  # differentiable, back to the images
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_compare_attention_figure_grids_of_a_refiner_vit():
    """The `compare` figure's grids (train/plots.py) from a Refiner ViT's maps A*: the last
    block's class-token row over the patches, and the rollout only while every map is
    non-negative (a negative A* entry leaves it out)."""
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch2_8", attn="refiner", backend="cpp")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        model(x)  # one training step moves the running statistics off their init
    last, rolled = attention_grids(model, x)
    with torch.no_grad():
        maps = model.attention_maps(x, export="head_mean")
    assert all(bool((m >= 0).all()) for m in maps)  # near init A* is still non-negative
    assert last.shape == rolled.shape == (3, 4, 4)
    assert torch.equal(last, maps[-1][:, 0, 1:].reshape(3, 4, 4))
    assert torch.equal(rolled, attention_rollout(maps)[:, 0, 1:].reshape(3, 4, 4))
    with torch.no_grad():
        model.blocks[-1].attn.adapt_bn.bias.fill_(-1.0)  # A* of the last block goes negative
    last, rolled = attention_grids(model, x)
    assert rolled is None and bool((last < 0).any())
