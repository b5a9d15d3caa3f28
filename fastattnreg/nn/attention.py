"""FusedAttention: a drop-in for timm.layers.Attention backed by fastattnreg.attention.

Same constructor keywords and parameter names as timm's Attention (`qkv`, `q_norm`, `k_norm`,
`norm`, `gate`, `proj`), so `timm.models.VisionTransformer(attn_layer=FusedAttention)` builds and
timm state dicts load with strict=True. With `export` set, the maps of the last forward stay on
`module.maps` with their autograd graph, for a regulariser to use.

Two slots let a regulariser (nn/regularizers.py: GTALoss) drive a layer without hooks; both are
off by default and the owner clears them after each step so that no tensor outlives it:
  capture_qk = True   each forward stores (q.detach(), k.detach()) (B, H, N, D), after q_norm /
                      k_norm, on `module.captured_qk`: a teacher's queries and keys.
  match_teacher = (teacher_q, teacher_k, kind, rows, teacher_scale)
                      forward calls `attention_match` against that teacher instead of
                      `attention` (same `out`) and stores the scalar loss, with its graph, on
                      `module.match_loss`.
"""
from __future__ import annotations

from typing import Optional, Type

import torch
from torch import nn

from ..ops.attention import EXPORTS, attention
from ..ops.checks import check_choice
from ..ops.match import attention_match


class FusedAttention(nn.Module):
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
                    f"dim must be divisible by num_heads; got dim={dim}, num_heads={num_heads}"
                )
            attn_head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        check_choice("export", export, EXPORTS)
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim**-0.5
        self.export = export
        self.backend = backend
        self.maps: Optional[torch.Tensor] = None
        self.capture_qk = False
        self.captured_qk: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # (teacher_q, teacher_k, kind, rows, teacher_scale): see the module docstring.
        self.match_teacher: Optional[tuple] = None
        self.match_loss: Optional[torch.Tensor] = None

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError(
                "FusedAttention: attn_mask is not supported by the fused kernels yet; got a mask "
                f"of shape {tuple(attn_mask.shape)} (use timm.layers.Attention for masked inputs)"
            )
        if is_causal:
            raise NotImplementedError("FusedAttention: is_causal=True is not supported yet")
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"FusedAttention: attn_drop={self.attn_drop.p} needs dropout inside the fused "
                "kernel, which is not supported yet; set attn_drop=0 (timm's default)"
            )
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # (B, N, 3 * H * D) -> three (B, H, N, D)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.capture_qk:
            self.captured_qk = (q.detach(), k.detach())
        if self.match_teacher is not None:
            if self.export is not None:
                raise RuntimeError(
                    f"FusedAttention: export={self.export!r} cannot be combined with a match "
                    "teacher (attention_match returns no maps); set export=None"
                )
            teacher_q, teacher_k, kind, rows, teacher_scale = self.match_teacher
            out, self.match_loss = attention_match(
                q, k, v, teacher_q, teacher_k, kind=kind, rows=rows, scale=self.scale,
                teacher_scale=teacher_scale, backend=self.backend,
            )
        elif self.export is None:
            out = attention(q, k, v, scale=self.scale, backend=self.backend)
        else:
            out, self.maps = attention(
                q, k, v, scale=self.scale, export=self.export, backend=self.backend
            )
        x = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)
