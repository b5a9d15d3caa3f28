"""The Triton attention-matching kernels as torch ops: fastattnreg::triton_attention_match_fwd /
_bwd, with their autograd rule.

Registered like ops/triton_attention.py: `torch.library.triton_op`s on CUDA (the implementation
only allocates and launches through `wrap_triton`, so it is its own fake kernel), opaque
`custom_op`s with the fake kernels below under TRITON_INTERPRET=1.

The forward returns one tensor more than the C++ op attention_match_fwd: the student's LSE over
the matched keys (B, H, R). For rows="cls" it differs from the full LSE (keys 1..N-1 only) and
the backward needs it; for rows="all" it is a copy of `lse` (O(B*H*N), a few KB). Both row LSEs
are non-differentiable outputs. Saved for the backward: q, k, v, out, lse, the teacher's q, k,
the two (B, H, R) row LSEs and the mask; never P.

attn_mask (as the C++ ops': bool or an additive bias of q's dtype, broadcastable to (B, H, N, N))
applies to the student's and the teacher's logits alike and gets no gradient: the autograd rule
returns None for it and refuses a mask that requires grad (ops/match_autograd.py).
Imported only when Triton is installed (see fastattnreg.backend).
"""
from __future__ import annotations

import torch

from ..triton import match as _kernels
from .checks import MATCH_KINDS, MATCH_ROWS, check_attn_mask, check_choice
from .match_autograd import register_match_autograd
from .triton_ops import (check_saved_attention, check_tensor, check_triton_inputs,
                         contiguous_or_none, define_triton_op, unit_stride)

FWD_NAME = "fastattnreg::triton_attention_match_fwd"
BWD_NAME = "fastattnreg::triton_attention_match_bwd"
FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor teacher_q, Tensor teacher_k, Tensor? attn_mask, "
    "float scale, float teacher_scale, str kind, str rows) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "(Tensor? dout, Tensor? dlse, Tensor? drow_loss, Tensor q, Tensor k, Tensor v, Tensor out, "
    "Tensor lse, Tensor teacher_q, Tensor teacher_k, Tensor teacher_row_lse, "
    "Tensor student_row_lse, Tensor? attn_mask, float scale, float teacher_scale, str kind, "
    "str rows) "
    "-> (Tensor, Tensor, Tensor)"
)


# ------------------------------------------------------------------------------------ checks


def _check_fwd(q, k, v, tq, tk, attn_mask, scale, teacher_scale, kind, rows) -> None:
    check_triton_inputs(q, k, v, scale, "none", ("none",))
    check_triton_inputs(tq, tk, tk, teacher_scale, "none", ("none",))
    check_choice("kind", kind, MATCH_KINDS)
    check_choice("rows", rows, MATCH_ROWS)
    if tq.shape[:3] != q.shape[:3]:
        raise ValueError(f"teacher_q must match the student's (B, H, N) = {tuple(q.shape[:3])}; "
                         f"got {tuple(tq.shape[:3])}")
    if tq.dtype != q.dtype or tq.device != q.device:
        raise ValueError(f"teacher_q must have the student's dtype and device ({q.dtype}, "
                         f"{q.device}); got ({tq.dtype}, {tq.device})")
    if rows == "cls" and q.shape[2] < 2:
        raise ValueError(f"rows='cls' needs N >= 2; got N = {q.shape[2]}")
    check_attn_mask(attn_mask, q)


def _check_bwd(dout, dlse, drow_loss, q, k, v, out, lse, tq, tk, trow_lse, srow_lse, attn_mask,
               scale, teacher_scale, kind, rows) -> None:
    _check_fwd(q, k, v, tq, tk, attn_mask, scale, teacher_scale, kind, rows)
    B, H, N, _ = q.shape
    R = _kernels.matched_rows(rows, N)
    check_saved_attention(q, out, lse, dout, dlse)
    check_tensor(trow_lse, "teacher_row_lse", (B, H, R), torch.float32, q.device)
    check_tensor(srow_lse, "student_row_lse", (B, H, R), torch.float32, q.device)
    if drow_loss is not None:
        check_tensor(drow_loss, "drow_loss", (B, H, R), torch.float32, q.device)


# ------------------------------------------------------------------------- implementations


def _fwd_impl(q, k, v, tq, tk, attn_mask, scale, teacher_scale, kind, rows):
    _check_fwd(q, k, v, tq, tk, attn_mask, scale, teacher_scale, kind, rows)
    q, k, v, tq, tk = (unit_stride(t) for t in (q, k, v, tq, tk))
    # The mask is read through its own strides, broadcast axes included: never copied.
    return _kernels.match_fwd(q, k, v, tq, tk, attn_mask, scale, teacher_scale, kind, rows)


def _bwd_impl(dout, dlse, drow_loss, q, k, v, out, lse, tq, tk, trow_lse, srow_lse, attn_mask,
               scale, teacher_scale, kind, rows):
    _check_bwd(dout, dlse, drow_loss, q, k, v, out, lse, tq, tk, trow_lse, srow_lse, attn_mask,
               scale, teacher_scale, kind, rows)
    q, k, v, tq, tk = (unit_stride(t) for t in (q, k, v, tq, tk))
    # Gradients can arrive as expanded views (the mean's backward); the kernels read them dense.
    dout, dlse, drow_loss = (contiguous_or_none(t) for t in (dout, dlse, drow_loss))
    out, lse, trow_lse, srow_lse = (t.contiguous() for t in (out, lse, trow_lse, srow_lse))
    return _kernels.match_bwd(dout, dlse, drow_loss, q, k, v, out, lse, tq, tk, trow_lse,
                              srow_lse, attn_mask, scale, teacher_scale, kind, rows)


def _fwd_fake(q, k, v, tq, tk, attn_mask, scale, teacher_scale, kind, rows):
    _check_fwd(q, k, v, tq, tk, attn_mask, scale, teacher_scale, kind, rows)
    B, H, N, D = q.shape
    R = _kernels.matched_rows(rows, N)
    f32 = {"dtype": torch.float32}
    return (q.new_empty((B, H, N, D)), q.new_empty((B, H, N), **f32),
            q.new_empty((B, H, R), **f32), q.new_empty((B, H, R), **f32),
            q.new_empty((B, H, R), **f32))


def _bwd_fake(dout, dlse, drow_loss, q, k, v, out, lse, tq, tk, trow_lse, srow_lse, attn_mask,
              scale, teacher_scale, kind, rows):
    _check_bwd(dout, dlse, drow_loss, q, k, v, out, lse, tq, tk, trow_lse, srow_lse, attn_mask,
               scale, teacher_scale, kind, rows)
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


triton_attention_match_fwd = define_triton_op(FWD_NAME, _fwd_impl, FWD_SCHEMA, _fwd_fake)
triton_attention_match_bwd = define_triton_op(BWD_NAME, _bwd_impl, BWD_SCHEMA, _bwd_fake)

# ---------------------------------------------------------------------------------- autograd

register_match_autograd(FWD_NAME.split("::")[1], BWD_NAME.split("::")[1])
