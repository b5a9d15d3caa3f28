"""attention(): fused attention that also returns exact, differentiable attention maps.

Layers: the C++ kernels (csrc/cpu/attention.cpp) are registered as
torch.ops.fastattnreg.attention_fwd / attention_bwd; this file adds their fake (meta) kernels and
the autograd rule, the plain-PyTorch reference `attention_ref`, and the public `attention()`.
The Triton kernels (fastattnreg/triton/attention.py) are registered, with their own autograd
rule, as torch.ops.fastattnreg.triton_attention_fwd / _bwd by ops/triton_attention.py.
Shapes: q, k, v (B, H, N, D); maps "full" (B, H, N, N), "head_mean" (B, N, N), "cls" (B, H, N).
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .attention_autograd import register_attention_autograd
from .checks import check_choice, check_qkv, check_scale

EXPORTS = (None, "full", "head_mean", "cls")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # The LSE is kept in the accumulation type: float32, or float64 for float64 inputs.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _maps_shape(q: torch.Tensor, export: str) -> tuple[int, ...]:
    B, H, N, _ = q.shape
    return {"full": (B, H, N, N), "head_mean": (B, N, N), "cls": (B, H, N), "none": (0,)}[export]


def attention_ref(q, k, v, *, scale=None, export=None, return_lse=False, upcast=True):
    """Plain-PyTorch attention with the same outputs as `attention()`.

    upcast=True computes in float32 (float64 stays float64) and casts out and maps back to the
    input dtype; upcast=False computes in the input dtype (the "reference run in that dtype" of
    the low-precision error rule).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    logits = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N)
    probs = logits.softmax(dim=-1)
    out = (probs @ v).to(dtype)
    result = [out]
    if export is not None:
        maps = {"full": probs, "head_mean": probs.mean(dim=1), "cls": probs[:, :, 0, :]}[export]
        result.append(maps.to(dtype))
    if return_lse:
        result.append(torch.logsumexp(logits.to(_lse_dtype(dtype)), dim=-1))
    return result[0] if len(result) == 1 else tuple(result)


if _backend.cpp_available():

    @torch.library.register_fake("fastattnreg::attention_fwd")
    def _attention_fwd_fake(q, k, v, scale, export):
        B, H, N, _ = q.shape
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = q.new_empty((B, H, N), dtype=_lse_dtype(q.dtype))
        return out, lse, q.new_empty(_maps_shape(q, export))

    @torch.library.register_fake("fastattnreg::attention_bwd")
    def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, dmaps, scale, export):
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
        )

    register_attention_autograd("attention_fwd", "attention_bwd")


if _backend.triton_installed():
    from . import triton_attention as _triton_attention  # noqa: F401  (registers the ops)


def attention(q, k, v, *, scale=None, export=None, return_lse=False, backend="auto"):
    """Attention softmax(scale * q k^T) v that can also return its maps and log-sum-exp.

    Args:
        q, k, v: (B, H, N, D) tensors of one dtype and device.
        scale: logit scale; default D ** -0.5.
        export: None, "full" (B, H, N, N), "head_mean" (B, N, N: mean over heads) or "cls"
            (B, H, N: the softmax row of query 0). Maps are exact probabilities and carry
            gradients back into q and k.
        return_lse: also return the log-sum-exp of the scaled logits (B, H, N), natural log,
            float32 (float64 for float64 inputs); differentiable.
        backend: "auto" | "cpp" | "triton" | "reference" (see fastattnreg.backend). "auto"
            runs the Triton kernels on CUDA tensors (float16, bfloat16, float32; D 16..128).

    Returns:
        out (B, H, N, D), then maps if `export` is set, then lse if `return_lse`.
    """
    check_choice("export", export, EXPORTS)
    check_choice("backend", backend, _backend.BACKENDS)
    check_scale("scale", scale)
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor; got {type(q).__name__}")
    impl = _backend.resolve(backend, q.device)
    check_qkv(q, k, v, impl)
    if impl == "reference":
        return attention_ref(q, k, v, scale=scale, export=export, return_lse=return_lse)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    export_name = "none" if export is None else export
    ops = torch.ops.fastattnreg
    fwd = ops.triton_attention_fwd if impl == "triton" else ops.attention_fwd
    out, lse, maps = fwd(q, k, v, scale, export_name)
    result = [out]
    if export is not None:
        result.append(maps)
    if return_lse:
        result.append(lse)
    return result[0] if len(result) == 1 else tuple(result)
