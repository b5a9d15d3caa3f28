"""FusedAttention: a drop-in for timm.layers.Attention backed by fastattnreg.attention.

Same constructor keywords and parameter names as timm's Attention (`qkv`, `q_norm`, `k_norm`,
`norm`, `gate`, `proj`), so `timm.models.VisionTransformer(attn_layer=FusedAttention)` builds and
timm state dicts load with strict=True. forward(x, attn_mask) takes timm's (SDPA's) mask: bool
(True = takes part) or an additive float bias, broadcastable to (B, H, N, N); attention dropout
(attn_drop) runs inside the fused kernels in training mode. With `export` set, the maps of the
last forward stay on `module.maps` with their autograd graph, for a regulariser to use.

Two slots let a regulariser (nn/regularizers.py: GTALoss) drive a layer without hooks; both are
off by default and the owner clears them after each step so that no tensor outlives it:
  capture_qk = True   each forward stores (q.detach(), k.detach()) (B, H, N, D), after q_norm /
                      k_norm, on `module.captured_qk`: a teacher's queries and keys.
  match_teacher = (teacher_q, teacher_k, kind, rows, teacher_scale)
                      forward calls `attention_match` against that teacher instead of
                      `attention` (same `out`) and stores the scalar loss, with its graph, on
                      `module.match_loss`.

Where timm's Attention goes, this goes: torch.jit.script (the forward calls the C++ ops
directly when scripting, see ops/jit.py; the scripted model saves and loads), FX symbolic
tracing (`fused_attention` is a leaf of the graph: torch.fx.wrap), torch.export, torch.compile
and torch.autocast (the ops' autocast rules, ops/autocast.py). An FX graph cannot keep state on
the module, so tracing a layer with `export`, `capture_qk` or a match teacher set raises.
"""

from typing import Optional, Tuple, Type

import torch
from torch import nn

from ..ops.attention import EXPORTS, attention
from ..ops.checks import check_choice
from ..ops.jit import attention_match_script, attention_script
from ..ops.match import attention_match


def shape_str(t: torch.Tensor) -> str:
    """"(2, 1, 17, 17)": a tensor's shape, written alike in Python and TorchScript."""
    return "(" + ", ".join([str(s) for s in t.shape]) + ")"


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: Optional[torch.Tensor], is_causal: bool, dropout_p: float,
                    scale: float, export: Optional[str], backend: str
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """attention(q, k, v, ...) as (out (B, H, N, D), maps or None): one call that FX keeps as a
    single graph node (torch.fx.wrap below) and TorchScript compiles through ops/jit.py.
    attn_mask and is_causal are checked here, not in the module: FX passes a traced model's
    own attn_mask / is_causal inputs down as proxies, whose values are known only when the
    graph runs."""
    if is_causal:
        raise NotImplementedError("FusedAttention: is_causal=True is not supported yet; pass a "
                                  "causal attn_mask instead")
    if torch.jit.is_scripting():
        return attention_script(q, k, v, attn_mask, dropout_p, scale, export, backend)
    else:
        result = attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale,
                           export=export, backend=backend)
        if export is None:
            return result, None
        return result[0], result[1]


torch.fx.wrap("fused_attention")


class FusedAttention(nn.Module):
    # Types of the state slots, for TorchScript (it cannot infer them from a None).
    maps: Optional[torch.Tensor]
    captured_qk: Optional[Tuple[torch.Tensor, torch.Tensor]]
    match_teacher: Optional[Tuple[torch.Tensor, torch.Tensor, str, str, Optional[float]]]
    match_loss: Optional[torch.Tensor]
    export: Optional[str]

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
        self.captured_qk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
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
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        # (B, N, 3 * H * D) -> three (B, H, N, D)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if not torch.jit.is_scripting():
            if isinstance(q, torch.fx.Proxy):
                self._refuse_fx_state()
        if self.capture_qk:
            self.captured_qk = (q.detach(), k.detach())
        dropout_p = self.attn_drop.p if self.training else 0.0
        export = self.export  # locals: TorchScript refines Optional locals, not attributes
        teacher = self.match_teacher
        if teacher is not None:
            if export is not None:
                raise RuntimeError(
                    "FusedAttention: export='" + export + "' cannot be combined with a "
                    "match teacher (attention_match returns no maps); set export=None")
            if is_causal:
                raise NotImplementedError("FusedAttention: is_causal=True is not supported yet")
            if dropout_p > 0.0:
                raise NotImplementedError(
                    "FusedAttention: a match teacher (attention_match) takes no attention "
                    "dropout yet; got attn_drop=" + str(dropout_p) + " in training mode")
            teacher_q, teacher_k, kind, rows, teacher_scale = teacher
            if torch.jit.is_scripting():
                out, loss = attention_match_script(q, k, v, teacher_q, teacher_k, attn_mask,
                                                   kind, rows, self.scale, teacher_scale,
                                                   self.backend)
            else:
                out, loss = attention_match(
                    q, k, v, teacher_q, teacher_k, attn_mask=attn_mask, kind=kind, rows=rows,
                    scale=self.scale, teacher_scale=teacher_scale, backend=self.backend,
                )
            self.match_loss = loss
        else:
            result = fused_attention(q, k, v, attn_mask, is_causal, dropout_p, self.scale,
                                     export, self.backend)
            out = result[0]
            if export is not None:
                self.maps = result[1]
        x = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)

    @torch.jit.unused
    def _refuse_fx_state(self) -> None:
        """Raises when FX traces a layer whose forward keeps state on the module."""
        used = [name for name, on in (("export", self.export is not None),
                                      ("capture_qk", self.capture_qk),
                                      ("match_teacher", self.match_teacher is not None)) if on]
        if used:
            raise RuntimeError(
                f"FusedAttention: FX cannot trace a layer with {', '.join(used)} set: the graph "
                "cannot keep maps, captured q/k or a match loss on the module; clear them "
                "(export=None, capture_qk=False, match_teacher=None) before tracing")
