"""attention_match(): a student's attention and its divergence from a teacher's, fused.

The C++ kernels (csrc/cpu/match.cpp) and the Triton kernels (triton/match.py, registered by
ops/triton_match.py) compute, per matched query row, the student's and the teacher's attention
from their q, k and reduce the divergence in the same pass, so neither model's (B, H, N, N) maps
is ever stored; the backward folds the loss gradient into the attention backward. This file
adds the fake kernels of torch.ops.fastattnreg.attention_match_fwd / _bwd, registers their
autograd rule (ops/match_autograd.py) and defines the public `attention_match()`; the reference
`attention_match_ref` is in ops/match_ref.py.

Shapes: q, k, v (B, H, N, D); teacher_q, teacher_k (B, H, N, Dt), Dt may differ from D.
Matched rows: rows="all", every query row over every key (R = N); rows="cls", query 0 over keys
1..N-1 (GTA's form, R = 1) with both softmaxes renormalised over those keys (our choice: it
keeps KL a divergence, zero exactly when the two CLS->patch distributions agree).
The loss is the mean over batch, heads and matched rows of the per-row divergence:
  kind="kl"          KL(teacher || student) = sum_j pt_j (log pt_j - log ps_j)
  kind="mse_probs"   sum_j (ps_j - pt_j)^2
  kind="mse_logits"  sum_j (ss_j - st_j)^2, the scaled pre-softmax logits (GTA's form)
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .checks import (MATCH_KINDS, MATCH_ROWS, accumulation_dtype, check_attn_mask,
                     check_choice, check_match_mask_needs_no_grad, check_qkv, check_scale)
from .match_autograd import register_match_autograd
from .match_ref import attention_match_ref


if _backend.cpp_available():

    @torch.library.register_fake("fastattnreg::attention_match_fwd")
    def _match_fwd_fake(q, k, v, teacher_q, teacher_k, attn_mask, scale, teacher_scale, kind,
                        rows):
        B, H, N, _ = q.shape
        R = 1 if rows == "cls" else N
        acc = accumulation_dtype(q.dtype)
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((B, H, N), dtype=acc),
            q.new_empty((B, H, R), dtype=acc),
            q.new_empty((B, H, R), dtype=acc),
        )

    @torch.library.register_fake("fastattnreg::attention_match_bwd")
    def _match_bwd_fake(dout, dlse, drow_loss, q, k, v, out, lse, teacher_q, teacher_k, teacher_lse,
                        attn_mask, scale, teacher_scale, kind, rows):
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))

    register_match_autograd("attention_match_fwd", "attention_match_bwd")


if _backend.triton_installed():
    from . import triton_match as _triton_match  # noqa: F401  (registers the ops)


def attention_match(q, k, v, teacher_q, teacher_k, *, attn_mask=None, kind="kl", rows="all",
                    scale=None, teacher_scale=None, backend="auto"):
    """The student's attention output and its mean per-row divergence from the teacher's.

    Returns (out, loss): out (B, H, N, D) like `attention(q, k, v, attn_mask=attn_mask)`, loss a
    scalar (float32, or float64 for float64 inputs). Gradients reach q, k, v through both; the
    teacher gets none. attn_mask (attention()'s meaning) applies to both models' logits: masked
    keys take no part in the divergence, and a matched row with every key masked contributes 0
    (it still counts in the mean). The mask gets no gradient (a float one that requires grad is
    refused). See the module docstring for `kind` and `rows`.
    """
    check_choice("kind", kind, MATCH_KINDS)
    check_choice("rows", rows, MATCH_ROWS)
    check_choice("backend", backend, _backend.BACKENDS)
    check_scale("scale", scale)
    check_scale("teacher_scale", teacher_scale)
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor; got {type(q).__name__}")
    impl = _backend.resolve(backend, q.device)
    check_qkv(q, k, v, impl)
    check_qkv(teacher_q, teacher_k, teacher_k, impl, names=("teacher_q", "teacher_k", "teacher_k"))
    if teacher_q.shape[:3] != q.shape[:3]:
        raise ValueError(
            "teacher_q must match the student's (B, H, N) = "
            f"{tuple(q.shape[:3])}; got {tuple(teacher_q.shape[:3])}"
        )
    if teacher_q.dtype != q.dtype or teacher_q.device != q.device:
        raise ValueError(
            f"teacher_q must have the student's dtype and device ({q.dtype}, {q.device}); "
            f"got ({teacher_q.dtype}, {teacher_q.device})"
        )
    check_scale("scale", scale, q.dtype)
    check_scale("teacher_scale", teacher_scale, q.dtype)
    check_attn_mask(attn_mask, q)
    check_match_mask_needs_no_grad(attn_mask)
    if rows == "cls" and q.shape[2] < 2:
        raise ValueError(f"rows='cls' matches query 0 over keys 1..N-1 and needs N >= 2; got N = {q.shape[2]}")
    if impl == "reference":
        return attention_match_ref(q, k, v, teacher_q.detach(), teacher_k.detach(),
                                   attn_mask=attn_mask, kind=kind, rows=rows, scale=scale,
                                   teacher_scale=teacher_scale)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    teacher_scale = float(teacher_q.shape[-1] ** -0.5 if teacher_scale is None else teacher_scale)
    ops = torch.ops.fastattnreg
    fwd = ops.triton_attention_match_fwd if impl == "triton" else ops.attention_match_fwd
    # C++: (out, lse, teacher_lse, row_loss); Triton adds the student's matched-row LSE.
    out, _, _, row_loss = fwd(q, k, v, teacher_q.detach(), teacher_k.detach(), attn_mask, scale,
                              teacher_scale, kind, rows)[:4]
    return out, row_loss.mean()
