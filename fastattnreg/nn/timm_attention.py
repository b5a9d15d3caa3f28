"""TimmAttention: the part of timm's Attention that FusedAttention and RefinerAttention share.

Constructor keywords, checks and parameter names are timm's (`qkv`, `q_norm`, `k_norm`,
`attn_drop`, `norm`, `gate`, `proj`, `proj_drop`), so a subclass is accepted by
`timm.models.VisionTransformer(attn_layer=...)` and loads timm state dicts. A subclass adds its
attention call between project_qkv (x -> q, k, v) and project_out (attention output -> x).
"""
from typing import Callable, Dict, Optional, Tuple, Type

import torch
from torch import nn

from ..ops.checks import check_choice


class TimmAttention(nn.Module):
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
        device=None,
        dtype=None,
        *,
        export: Optional[str] = None,
        exports: tuple = (None,),
        backend: str = "auto",
        map_layers: Optional[Callable[[int, dict], Dict[str, nn.Module]]] = None,
    ) -> None:
        """timm's Attention keywords, then the subclass's: export, one of `exports` (its op's
        choices); backend, the ops' backend; map_layers(num_heads, factory_kwargs), the
        subclass's modules acting on the attention maps, registered after attn_drop and before
        norm, so that every parameter draws its initial values from the RNG in the order the
        original layers create them."""
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if attn_head_dim is None:
            if num_heads < 1 or dim % num_heads != 0:
                raise ValueError(
                    f"dim must be divisible by num_heads; got dim={dim}, num_heads={num_heads}")
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        check_choice("export", export, exports)
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim**-0.5
        self.export = export
        self.backend = backend
        self.maps: Optional[torch.Tensor] = None  # the last forward's maps, by `export`

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)  # its p is read; the kernels apply the dropout
        if map_layers is not None:
            for name, layer in map_layers(num_heads, dd).items():
                setattr(self, name, layer)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                    Optional[torch.Tensor]]:
        """x (B, N, dim) -> q, k, v, each (B, H, N, D) (q and k after q_norm / k_norm), and the
        sigmoid gate (B, N, H * D) of a gated layer, else None."""
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # (B, N, 3 * H * D) -> three (B, H, N, D)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v, gate

    def project_out(self, out: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention output (B, H, N, D) -> (B, N, dim_out): heads merged, norm, times the
        gate when there is one, proj and proj_drop."""
        B, _, N, _ = out.shape
        x = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)
