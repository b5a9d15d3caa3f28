"""RefinerAttention: timm-compatible attention with Refiner's map refinement (methods.md §1),
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
their running statistics (track_running_stats=True, affine=True): anything else raises.

Attention dropout (attn_drop > 0, training only): the keep-mask is drawn from torch's generator
as a (B, H, N, N) bool tensor and read by the fused kernels, so it costs one byte per map entry
and is drawn with a different random stream than nn.Dropout (same distribution).

Maps: with `export` set ("full", "head_mean", "cls", as FusedAttention's), each forward leaves
the refined attention A* (the map that meets v, after the convolutions, BatchNorms, residual and
adapt_bn) on `module.maps`, autograd graph attached, written by the fused kernels.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn

from ..ops.checks import check_choice
from ..ops.refiner import refined_attention
from ..ops.refiner_export import EXPORTS


class RefinerConvs(nn.Module):
    """The refiner's convolutions and BatchNorms (the public code's `DLA`): parameters only."""

    def __init__(self, heads: int, expansion: int, kernel_size: int, device=None,
                 dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        hidden = heads * expansion
        self.conv_exp = nn.Conv2d(heads, hidden, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(hidden, **dd)
        self.depth_sep_conv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2,
                                        groups=hidden, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(hidden, **dd)
        self.conv_pro = nn.Conv2d(hidden, heads, 1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(heads, **dd)


class RefinerAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        expansion: int = 3,
        kernel_size: int = 3,
        export: Optional[str] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if attn_head_dim is None:
            if num_heads < 1 or dim % num_heads != 0:
                raise ValueError(
                    f"dim must be divisible by num_heads; got dim={dim}, num_heads={num_heads}")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1:
            raise ValueError(f"expansion must be an integer >= 1; got {expansion!r}")
        if (isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1
                or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd integer >= 1 (zero 'same' padding); "
                             f"got {kernel_size!r}")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must be a probability in [0, 1); got {attn_drop!r}")
        check_choice("export", export, EXPORTS)
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim**-0.5
        self.export = export
        self.backend = backend
        self.maps: Optional[torch.Tensor] = None  # A* of the last forward, by `export`

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)  # its p is read; the kernels apply the mask
        self.DLA = RefinerConvs(num_heads, expansion, kernel_size, **dd)
        self.adapt_bn = nn.BatchNorm2d(num_heads, **dd)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _batch_norms(self) -> tuple[nn.BatchNorm2d, ...]:
        return (self.DLA.bn1, self.DLA.bn2, self.DLA.bn3, self.adapt_bn)

    def _bn_momentum(self) -> list[float]:
        """Counts the step on every BatchNorm and returns their momenta, as nn.BatchNorm2d does
        in training mode (momentum=None: 1 / num_batches_tracked)."""
        for bn in self._batch_norms():  # all checked before any counter moves
            if not (bn.track_running_stats and bn.affine) or bn.running_mean is None:
                raise NotImplementedError(
                    "RefinerAttention: every BatchNorm needs affine=True and "
                    "track_running_stats=True (the fused kernel keeps running statistics)")
            if bn.training != self.training:
                raise NotImplementedError(
                    "RefinerAttention: the BatchNorms must be in the module's mode (training="
                    f"{self.training}); got a BatchNorm with training={bn.training}")
        momenta = []
        for bn in self._batch_norms():
            if self.training:
                bn.num_batches_tracked.add_(1)
                momenta.append(1.0 / float(bn.num_batches_tracked) if bn.momentum is None
                               else bn.momentum)
            else:
                momenta.append(0.0)
        return momenta

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError(
                "RefinerAttention: attn_mask is not supported by the fused kernels; got a mask "
                f"of shape {tuple(attn_mask.shape)}")
        if is_causal:
            raise NotImplementedError("RefinerAttention: is_causal=True is not supported")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # (B, N, 3 * H * D) -> three (B, H, N, D)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bns = self._batch_norms()
        momentum = self._bn_momentum()

        def cast(t):  # autocast: the activations' dtype, e.g. bfloat16 under float32 params
            return t if t.dtype == q.dtype else t.to(q.dtype)

        result = refined_attention(
            q, k, v, cast(self.DLA.conv_exp.weight), cast(self.DLA.depth_sep_conv.weight),
            cast(self.DLA.conv_pro.weight), [cast(bn.weight) for bn in bns],
            [cast(bn.bias) for bn in bns], [bn.running_mean for bn in bns],
            [bn.running_var for bn in bns], training=self.training, momentum=momentum,
            eps=[bn.eps for bn in bns], scale=self.scale,
            attn_drop=self.attn_drop.p if self.training else 0.0, export=self.export,
            backend=self.backend,
        )
        if self.export is None:
            out = result
        else:
            out, self.maps = result
        x = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)
