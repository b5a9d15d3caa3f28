"""RefinerAttention: timm-compatible attention with Refiner's map refinement (docs/methods.md §1),
backed by fastattnreg.refined_attention.

Parameter names are timm's (`qkv`, `q_norm`, `k_norm`, `norm`, `gate`, `proj`) plus the public
Refiner code's (`DLA.conv_exp`, `DLA.bn1`, `DLA.depth_sep_conv`, `DLA.bn2`, `DLA.conv_pro`,
`DLA.bn3`, `adapt_bn`), so `timm.models.VisionTransformer(attn_layer=RefinerAttention)` builds
and those state-dict entries load. The modules here hold parameters and buffers only: the
computation is one `refined_attention` call.

BatchNorms: in training mode the batch statistics are used and each BatchNorm's running
statistics and num_batches_tracked are updated exactly as nn.BatchNorm2d's own forward would
(momentum=None: cumulative average); in eval mode the running statistics are used. The four
BatchNorms must be in the module's mode (train() / eval() on the module sets them) and keep
their running statistics (track_running_stats=True, affine=True): anything else raises. They are
StatsBatchNorm2d (nn/batchnorm.py): in a bfloat16 or float16 layer the running statistics stay
float32, so their running averages keep moving (the kernels read and update them in float32).

Attention dropout (attn_drop > 0, training only): the keep-mask is drawn from torch's generator
as a (B, H, N, N) bool tensor and read by the fused kernels, so it costs one byte per map entry
and is drawn with a different random stream than nn.Dropout (same distribution).

Where timm's Attention goes, this goes: torch.jit.script (the C++ ops called directly, see
ops/jit.py), FX symbolic tracing (`refiner_attention`, counters included, is one leaf node:
torch.fx.wrap), torch.export, torch.compile and torch.autocast (refined_attention casts q, k, v
and the weights, never the running statistics). attn_mask raises: the refiner kernels take none.

Maps: with `export` set ("full", "head_mean", "cls", as FusedAttention's), each forward leaves
the refined attention A* (the map that meets v, after the convolutions, BatchNorms, residual and
adapt_bn) on `module.maps`, autograd graph attached, written by the fused kernels. An FX graph
cannot keep state on the module, so tracing a layer with `export` set raises.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..ops.checks import REFINER_EXPORTS
from ..ops.jit import refined_attention_script
from ..ops.refiner import refined_attention
from .attention import shape_str
from .batchnorm import StatsBatchNorm2d
from .timm_attention import TimmAttention


def bn_momenta(num_batches_tracked: List[torch.Tensor], momentum: List[float],
               cumulative: List[bool], training: bool) -> List[float]:
    """Each BatchNorm's factor for this step, as nn.BatchNorm2d's forward computes it: its
    momentum, or 1 / num_batches_tracked after this step where cumulative (momentum=None);
    0 in eval mode."""
    out: List[float] = []
    for i in range(len(momentum)):
        if not training:
            out.append(0.0)
        elif cumulative[i]:
            out.append(1.0 / (float(num_batches_tracked[i].item()) + 1.0))
        else:
            out.append(momentum[i])
    return out


def refiner_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: Optional[torch.Tensor], is_causal: bool,
                      conv_exp_weight: torch.Tensor, conv_dw_weight: torch.Tensor,
                      conv_pro_weight: torch.Tensor, bn_weight: List[torch.Tensor],
                      bn_bias: List[torch.Tensor], running_mean: List[torch.Tensor],
                      running_var: List[torch.Tensor], num_batches_tracked: List[torch.Tensor],
                      momentum: List[float], cumulative: List[bool], eps: List[float],
                      training: bool, scale: float, attn_drop: float, export: Optional[str],
                      backend: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """refined_attention(...) plus the BatchNorms' step counters, (out (B, H, N, D), maps or
    None by `export`): one call
    that FX keeps as a single graph node (torch.fx.wrap below), so that the running statistics
    and num_batches_tracked move when the graph runs, not when it is traced; TorchScript
    compiles it through ops/jit.py. The counters move after the kernels succeed. attn_mask and
    is_causal are refused here, not in the module: FX passes a traced model's own attn_mask /
    is_causal inputs down as proxies, whose values are known only when the graph runs."""
    if attn_mask is not None:
        raise NotImplementedError(
            "RefinerAttention: attn_mask is not supported by the fused refiner kernels; got a "
            "mask of shape " + shape_str(attn_mask))
    if is_causal:
        raise NotImplementedError("RefinerAttention: is_causal=True is not supported")
    momenta = bn_momenta(num_batches_tracked, momentum, cumulative, training)
    if torch.jit.is_scripting():
        out, maps = refined_attention_script(q, k, v, conv_exp_weight, conv_dw_weight,
                                             conv_pro_weight, bn_weight, bn_bias, running_mean,
                                             running_var, momenta, eps, training, scale,
                                             attn_drop, export, backend)
    else:
        result = refined_attention(q, k, v, conv_exp_weight, conv_dw_weight, conv_pro_weight,
                                   bn_weight, bn_bias, running_mean, running_var,
                                   training=training, momentum=momenta, eps=eps, scale=scale,
                                   attn_drop=attn_drop, export=export, backend=backend)
        if export is None:
            out, maps = result, None
        else:
            out, maps = result[0], result[1]
    if training:
        with torch.no_grad():
            for count in num_batches_tracked:
                count.add_(1)
    return out, maps


torch.fx.wrap("refiner_attention")


class RefinerConvs(nn.Module):
    """The refiner's convolutions and BatchNorms (the public code's `DLA`): parameters only."""

    def __init__(self, heads: int, expansion: int, kernel_size: int, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = heads * expansion
        self.conv_exp = nn.Conv2d(heads, hidden, 1, bias=False, **dd)
        self.bn1 = StatsBatchNorm2d(hidden, **dd)
        self.depth_sep_conv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                                        groups=hidden, bias=False, **dd)
        self.bn2 = StatsBatchNorm2d(hidden, **dd)
        self.conv_pro = nn.Conv2d(hidden, heads, 1, bias=False, **dd)
        self.bn3 = StatsBatchNorm2d(heads, **dd)


class RefinerAttention(TimmAttention):
    # Types of the state slots, for TorchScript (it cannot infer them from a None).
    maps: Optional[torch.Tensor]
    export: Optional[str]

    def __init__(self, dim: int, num_heads: int = 8, *, expansion: int = 3,
                 kernel_size: int = 3, attn_drop: float = 0.0, export: Optional[str] = None,
                 backend: str = "auto", **timm_args) -> None:
        """timm_args: timm's other Attention keywords (qkv_bias, qk_norm, ...; see
        TimmAttention). expansion: the refiner's channels per head; kernel_size: its odd
        depthwise kernel; export: None or one of ops.checks.REFINER_EXPORTS."""
        # Checked before the base class creates (and initialises) any parameter.
        if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1:
            raise ValueError(f"expansion must be an integer >= 1; got {expansion!r}")
        if (isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1
                or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd integer >= 1 (zero 'same' padding); "
                             f"got {kernel_size!r}")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must be a probability in [0, 1); got {attn_drop!r}")

        def map_layers(heads: int, dd: dict) -> dict:
            # the public Refiner code's names: DLA (the convolutions) and adapt_bn
            return {"DLA": RefinerConvs(heads, expansion, kernel_size, **dd),
                    "adapt_bn": StatsBatchNorm2d(heads, **dd)}

        super().__init__(dim, num_heads, attn_drop=attn_drop, export=export,
                         exports=REFINER_EXPORTS, backend=backend, map_layers=map_layers,
                         **timm_args)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        q, k, v, gate = self.project_qkv(x)
        # The four BatchNorms in kernel order bn1, bn2, bn3, adapt_bn, all checked first.
        weights: List[torch.Tensor] = []
        biases: List[torch.Tensor] = []
        means: List[torch.Tensor] = []
        variances: List[torch.Tensor] = []
        counts: List[torch.Tensor] = []
        for bn in (self.DLA.bn1, self.DLA.bn2, self.DLA.bn3, self.adapt_bn):
            # affine=False leaves weight None; track_running_stats=False the statistics.
            weight, bias = bn.weight, bn.bias
            mean, var, count = bn.running_mean, bn.running_var, bn.num_batches_tracked
            if (weight is None or bias is None or mean is None or var is None
                    or count is None):
                raise NotImplementedError(
                    "RefinerAttention: every BatchNorm needs affine=True and "
                    "track_running_stats=True (the fused kernel keeps running statistics)")
            if bn.training != self.training:
                raise NotImplementedError(
                    "RefinerAttention: the BatchNorms must be in the module's mode (training="
                    + str(self.training) + "); got a BatchNorm with training="
                    + str(bn.training))
            weights.append(weight)
            biases.append(bias)
            means.append(mean)
            variances.append(var)
            counts.append(count)
        # Spelled out: TorchScript reads a submodule's constants (momentum, eps) only by path.
        # momentum=None (a cumulative average) travels as a flag: FX writes the lists into the
        # graph as literals, which TorchScript types List[float] / List[bool].
        settings: List[Optional[float]] = [self.DLA.bn1.momentum, self.DLA.bn2.momentum,
                                           self.DLA.bn3.momentum, self.adapt_bn.momentum]
        momenta: List[float] = []
        cumulative: List[bool] = []
        for m in settings:
            momenta.append(0.0 if m is None else m)
            cumulative.append(m is None)
        eps: List[float] = [self.DLA.bn1.eps, self.DLA.bn2.eps, self.DLA.bn3.eps,
                            self.adapt_bn.eps]
        export = self.export  # a local: TorchScript refines Optional locals, not attributes
        if export is not None and not torch.jit.is_scripting():
            if isinstance(q, torch.fx.Proxy):
                self._refuse_fx_export()
        out, maps = refiner_attention(
            q, k, v, attn_mask, is_causal, self.DLA.conv_exp.weight,
            self.DLA.depth_sep_conv.weight, self.DLA.conv_pro.weight, weights, biases, means,
            variances, counts, momenta, cumulative, eps, self.training, self.scale,
            self.attn_drop.p if self.training else 0.0, export, self.backend,
        )
        if export is not None:
            self.maps = maps
        return self.project_out(out, gate)

    @torch.jit.unused
    def _refuse_fx_export(self) -> None:
        """Raises when FX traces a layer that leaves its maps on the module."""
        raise RuntimeError(
            f"RefinerAttention: export={self.export!r} keeps the maps on the module, which an "
            "FX graph cannot do; set export=None before tracing")
