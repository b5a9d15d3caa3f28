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

from typing import Optional, Tuple

import torch

from ..ops.attention import attention
from ..ops.checks import ATTENTION_EXPORTS
from ..ops.jit import attention_match_script, attention_script
from ..ops.match import attention_match
from .timm_attention import TimmAttention


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


class FusedAttention(TimmAttention):
    # Types of the state slots, for TorchScript (it cannot infer them from a None).
    maps: Optional[torch.Tensor]
    captured_qk: Optional[Tuple[torch.Tensor, torch.Tensor]]
    match_teacher: Optional[Tuple[torch.Tensor, torch.Tensor, str, str, Optional[float]]]
    match_loss: Optional[torch.Tensor]
    export: Optional[str]

    def __init__(self, dim: int, num_heads: int = 8, *, export: Optional[str] = None,
                 backend: str = "auto", **timm_args) -> None:
        """timm_args: timm's other Attention keywords (qkv_bias, qk_norm, attn_drop, ...; see
        TimmAttention). export: None or one of ops.checks.ATTENTION_EXPORTS."""
        super().__init__(dim, num_heads, export=export, exports=ATTENTION_EXPORTS,
                         backend=backend, **timm_args)
        self.capture_qk = False
        self.captured_qk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # (teacher_q, teacher_k, kind, rows, teacher_scale): see the module docstring.
        self.match_teacher: Optional[tuple] = None
        self.match_loss: Optional[torch.Tensor] = None

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        q, k, v, gate = self.project_qkv(x)
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
        return self.project_out(out, gate)

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
