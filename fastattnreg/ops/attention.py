"""attention(): fused attention that also returns exact, differentiable attention maps.

Layers: the C++ kernels (csrc/cpu/attention.cpp) are registered as
torch.ops.fastattnreg.attention_fwd / attention_bwd; this file adds their fake (meta) kernels and
the autograd rule (ops/attention_autograd.py) and the public `attention()`; the plain-PyTorch
reference `attention_ref` is in ops/attention_ref.py.
The Triton kernels (fastattnreg/triton/attention.py) are registered, with their own autograd
rule, as torch.ops.fastattnreg.triton_attention_fwd / _bwd by ops/triton_attention.py.
Shapes: q, k, v (B, H, N, D); maps "full" (B, H, N, N), "head_mean" (B, N, N), "cls" and
"key_mean" (B, H, N); attn_mask broadcastable to (B, H, N, N); the dropout stream's rng (2,)
int64 (seed, offset), see ops/dropout.py.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from ..exports import maps_shape
from .attention_autograd import register_attention_autograd
from .attention_ref import attention_ref
from .checks import (ATTENTION_EXPORTS, accumulation_dtype, check_attn_mask, check_choice,
                     check_dropout_p, check_qkv, check_scale)
from .dropout import draw_rng, dropout_keep_mask


def mask_grad_shape(q: torch.Tensor, attn_mask, mask_grad: bool) -> tuple[int, ...]:
    """Shape of the backward ops' dmask output: (B, H, N, N) when asked for, else (0,)."""
    B, H, N, _ = q.shape
    return (B, H, N, N) if mask_grad and attn_mask is not None else (0,)


if _backend.cpp_available():

    @torch.library.register_fake("fastattnreg::attention_fwd")
    def _attention_fwd_fake(q, k, v, attn_mask, rng, scale, export, dropout_p):
        B, H, N, _ = q.shape
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = q.new_empty((B, H, N), dtype=accumulation_dtype(q.dtype))
        return out, lse, q.new_empty(maps_shape(export, *q.shape[:3]))

    @torch.library.register_fake("fastattnreg::attention_bwd")
    def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, dmaps, attn_mask, rng, scale, export,
                            dropout_p, mask_grad):
        # dmask has q's dtype: a float mask must have it, and a bool one gets no gradient.
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty(mask_grad_shape(q, attn_mask, mask_grad)),
        )

    register_attention_autograd("attention_fwd", "attention_bwd")


if _backend.triton_installed():
    from . import triton_attention as _triton_attention  # noqa: F401  (registers the ops)


def attention(q, k, v, *, attn_mask=None, dropout_p=0.0, scale=None, export=None,
              return_lse=False, backend="auto"):
    """Attention softmax(scale * q k^T + mask) v that can also return its maps and log-sum-exp.

    Args:
        q, k, v: (B, H, N, D) tensors of one dtype and device.
        attn_mask: None, a bool mask (True = the key takes part) or an additive float bias of
            q's dtype, broadcastable to (B, H, N, N), as in SDPA: key padding (B, 1, 1, N),
            shared (N, N), per head (1, H, N, N) or full. Read through its broadcast strides,
            never expanded in memory. A float bias gets its gradient. Masked entries of the
            maps are exactly 0; a row whose every key is masked gives zeros in out and the maps
            and an LSE of -inf.
        dropout_p: attention dropout in [0, 1): entries of P are dropped before P v (kept ones
            scaled by 1 / (1 - p)) with a counter-based stream drawn from torch's generator
            (ops/dropout.py), regenerated in the backward, repeatable under torch.manual_seed.
            Applied whenever dropout_p > 0, as F.scaled_dot_product_attention does. The
            exported maps and the LSE are those before dropout.
        scale: logit scale; default D ** -0.5; else 0 or a magnitude within
            ops.checks.scale_limits(q.dtype): a normal number of the accumulation type (float32;
            float64 for float64 q) whose square is finite.
        export: None, "full" (B, H, N, N), "head_mean" (B, N, N: mean over heads), "cls"
            (B, H, N: the softmax row of query 0) or "key_mean" (B, H, N: the attention each key
            receives, averaged over the queries). Maps are exact probabilities and carry
            gradients back into q and k.
        return_lse: also return the log-sum-exp of the scaled, masked logits (B, H, N), natural
            log, float32 (float64 for float64 inputs); differentiable.
        backend: "auto" | "cpp" | "triton" | "reference" (see fastattnreg.backend). "auto"
            runs the Triton kernels on CUDA tensors (float16, bfloat16, float32; D 16..128).

    Returns:
        out (B, H, N, D), then maps if `export` is set, then lse if `return_lse`.
    """
    check_choice("export", export, ATTENTION_EXPORTS)
    check_choice("backend", backend, _backend.BACKENDS)
    check_scale("scale", scale)
    check_dropout_p(dropout_p)
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor; got {type(q).__name__}")
    impl = _backend.resolve(backend, q.device)
    check_qkv(q, k, v, impl)
    check_scale("scale", scale, q.dtype)
    check_attn_mask(attn_mask, q)
    dropout_p = float(dropout_p)
    rng = draw_rng(q.device) if dropout_p > 0 else None
    if impl == "reference":
        keep = (dropout_keep_mask(maps_shape("full", *q.shape[:3]), dropout_p, rng)
                if rng is not None else None)
        return attention_ref(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                             dropout_mask=keep, scale=scale, export=export,
                             return_lse=return_lse)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    export_name = "none" if export is None else export
    ops = torch.ops.fastattnreg
    fwd = ops.triton_attention_fwd if impl == "triton" else ops.attention_fwd
    out, lse, maps = fwd(q, k, v, attn_mask, rng, scale, export_name, dropout_p)
    result = [out]
    if export is not None:
        result.append(maps)
    if return_lse:
        result.append(lse)
    return result[0] if len(result) == 1 else tuple(result)
