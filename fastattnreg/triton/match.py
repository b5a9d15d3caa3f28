"""The fused attention-matching loss (attention_match) on Triton: its own row-loss kernels, and
launchers that run attention.py's kernels with the teacher plug-in (teacher.py) switched on, as
the C++ kernels take their Teacher.

Shapes: q, k, v, out and their gradients (B, H, N, D); teacher_q, teacher_k (B, H, N, Dt); lse
(B, H, N) float32 (the student's, over every key, for `out`); per matched row (R = N for
rows="all", R = 1 for rows="cls") the row LSEs, the row loss and its gradient (B, H, R) float32.
The loss, its gradient and the masking rules: teacher.py. A teacher that is a copy of the
student gives ss == st and slse == tlse bit for bit (the teacher's LSE is computed by the same
instructions as the student's), so the loss and its gradient are exactly 0. A matched row whose
every key is masked has a row LSE of -inf, loss and gradient 0; its student output is 0 and its
lse -inf, as attention()'s.

Kernels and launches:
  forward   attention's _fwd_kernel -> out, lse, and for rows="all" (kl, mse_probs) with
            TEACHER_LSE the teacher's LSE of every row in the same online pass;
            _match_loss_kernel, one block of matched rows: for rows="cls" both LSEs over keys
            1..N-1 first, then the student's and the teacher's probabilities tile by tile over
            the keys and the row loss reduced in the same loop.
  backward  _match_c_kernel (mse_probs only), one block of matched rows: c = sum_j ps_j G_j;
            then attention's backward (delta, dK/dV, dQ) with TEACHER, which adds the loss's
            gradient to dS.
Extra memory: O(B * H * N) (the LSEs, delta, c, the row losses); no (B, H, N, N) tensor for
either model. dK/dV and dQ have one writer per block (no atomics): reruns are bitwise equal.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import launch_bwd, launch_fwd
from .teacher import (
    KIND_MSE_LOGITS, KIND_MSE_PROBS, KINDS, Teacher, _lse_or_zero, _loss_terms, _matched,
    _pair_logits, _teacher_rows,
)
from .tiles import (
    MATCH_TILES, _dot, _load_tile, _lse_end, _lse_step, _query_program, dot_options, mask_args,
    strides, traceable, tuned,
)

__all__ = ["KINDS", "match_bwd", "match_fwd", "matched_rows"]


@tuned(MATCH_TILES, teacher=True)
@triton.jit
def _match_loss_kernel(Q, K, TQ, TK, Mask, Lse, TLse, SRowLse, TRowLse, RowLoss,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
                       stride_ab, stride_ah, stride_ai, stride_aj,
                       H, N, R, scale, teacher_scale,
                       KIND: tl.constexpr, CLS: tl.constexpr, MASK: tl.constexpr,
                       HEAD_DIM: tl.constexpr, TEACHER_DIM: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                       EVEN_D: tl.constexpr, TD_PAD: tl.constexpr, EVEN_TD: tl.constexpr):
    """Row losses of matched rows [program_id(0) * BLOCK_M, ...) < R, and the row LSEs they used
    (SRowLse, TRowLse: (B, H, R); -inf for a row with every matched key masked; 0 for
    mse_logits, which uses none)."""
    z, z64, b, h, rows = _query_program(H, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_td = tl.arange(0, TD_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, R, offs_d, HEAD_DIM, EVEN_D)
    tq = _load_tile(TQ + b * stride_tqb + h * stride_tqh, rows, stride_tqn, R, offs_td,
                    TEACHER_DIM, EVEN_TD)
    k_base = K + b * stride_kb + h * stride_kh
    tk_base = TK + b * stride_tkb + h * stride_tkh
    mask_ptr = Mask + b * stride_ab + h * stride_ah

    slse = tl.zeros((BLOCK_M,), tl.float32)
    tlse = tl.zeros((BLOCK_M,), tl.float32)
    if KIND != KIND_MSE_LOGITS:
        if CLS:
            # Both softmaxes renormalised over keys 1..N-1, masked keys left out.
            sm = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            sl = tl.zeros((BLOCK_M,), tl.float32)
            tm = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            tsum = tl.zeros((BLOCK_M,), tl.float32)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + tl.arange(0, BLOCK_N)
                patch = (cols >= 1)[None, :]
                k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
                tk = _load_tile(tk_base, cols, stride_tkn, N, offs_td, TEACHER_DIM, EVEN_TD)
                ss, st = _pair_logits(_dot(q, tl.trans(k), UPCAST, PRECISION), tq, tk, rows, cols,
                                      N, scale, teacher_scale, mask_ptr, stride_ai, stride_aj,
                                      MASK, UPCAST, PRECISION)
                sm, sl = _lse_step(sm, sl, tl.where(patch, ss, float("-inf")), False)
                tm, tsum = _lse_step(tm, tsum, tl.where(patch, st, float("-inf")), False)
            slse = _lse_end(sm, sl, False)
            tlse = _lse_end(tm, tsum, False)
        else:
            slse = tl.load(Lse + (z64 * N + rows), mask=rows < R, other=0.0)
            tlse = tl.load(TLse + (z64 * N + rows), mask=rows < R, other=0.0)

    loss = tl.zeros((BLOCK_M,), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
        tk = _load_tile(tk_base, cols, stride_tkn, N, offs_td, TEACHER_DIM, EVEN_TD)
        ss, st = _pair_logits(_dot(q, tl.trans(k), UPCAST, PRECISION), tq, tk, rows, cols, N,
                              scale, teacher_scale, mask_ptr, stride_ai, stride_aj, MASK, UPCAST,
                              PRECISION)
        terms = _loss_terms(ss, st, slse, tlse, KIND)
        loss += tl.sum(tl.where(_matched(rows, cols, N, R, CLS), terms, 0.0), 1)
    out_rows = z64 * R + rows
    tl.store(RowLoss + out_rows, loss, mask=rows < R)
    tl.store(SRowLse + out_rows, slse, mask=rows < R)
    tl.store(TRowLse + out_rows, tlse, mask=rows < R)


@tuned(MATCH_TILES, teacher=True)
@triton.jit
def _match_c_kernel(Q, K, TQ, TK, Mask, SRowLse, TRowLse, DRow, C,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
                    stride_ab, stride_ah, stride_ai, stride_aj, H, N, R, scale, teacher_scale,
                    CLS: tl.constexpr, MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                    TEACHER_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                    EVEN_D: tl.constexpr, TD_PAD: tl.constexpr, EVEN_TD: tl.constexpr):
    """mse_probs' row term c_i = sum_j ps_ij G_ij (B, H, R) over the matched keys of the matched
    rows [program_id(0) * BLOCK_M, ...) < R, G = 2 g (ps - pt) (0 on masked keys)."""
    z, z64, b, h, rows = _query_program(H, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_td = tl.arange(0, TD_PAD)
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, R, offs_d, HEAD_DIM, EVEN_D)
    tq = _load_tile(TQ + b * stride_tqb + h * stride_tqh, rows, stride_tqn, R, offs_td,
                    TEACHER_DIM, EVEN_TD)
    slse, tlse, g, _ = _teacher_rows(SRowLse, TRowLse, DRow, C, z64, R, rows, 0)
    slse = _lse_or_zero(slse)
    tlse = _lse_or_zero(tlse)
    c = tl.zeros((BLOCK_M,), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + b * stride_kb + h * stride_kh, cols, stride_kn, N, offs_d, HEAD_DIM,
                       EVEN_D)
        tk = _load_tile(TK + b * stride_tkb + h * stride_tkh, cols, stride_tkn, N, offs_td,
                        TEACHER_DIM, EVEN_TD)
        ss, st = _pair_logits(_dot(q, tl.trans(k), UPCAST, PRECISION), tq, tk, rows, cols, N,
                              scale, teacher_scale, mask_ptr, stride_ai, stride_aj, MASK, UPCAST,
                              PRECISION)
        ps = tl.exp(ss - slse[:, None])
        pt = tl.exp(st - tlse[:, None])
        pg = ps * (2.0 * g[:, None] * (ps - pt))
        c += tl.sum(tl.where(_matched(rows, cols, N, R, CLS), pg, 0.0), 1)
    tl.store(C + (z64 * R + rows), c, mask=rows < R)


# --------------------------------------------------------------------------------- launchers


def matched_rows(rows: str, N: int) -> int:
    """R, the number of matched query rows per head."""
    return 1 if rows == "cls" else N


def match_fwd(q, k, v, tq, tk, attn_mask, scale: float, teacher_scale: float, kind: str,
              rows: str):
    """(out, lse, teacher_row_lse, row_loss, student_row_lse).

    out (B,H,N,D) in q's dtype; lse (B,H,N) float32 over every key (-inf where every key is
    masked); the rest (B,H,R) float32: the row LSEs over the matched keys (-inf where each of
    them is masked; 0 for mse_logits) and the per-row loss (0 for such rows). q, k, v, tq, tk:
    CUDA tensors (CPU under TRITON_INTERPRET=1) with stride 1 on the head dim. attn_mask: None,
    bool or a float bias of q's dtype, broadcastable to (B, H, N, N), any strides (read in place).
    """
    B, H, N, D = q.shape
    R = matched_rows(rows, N)
    teacher = Teacher(tq, tk, teacher_scale, KINDS[kind], rows == "cls", R)
    dev = q.device
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    # The teacher's LSE over every key, needed only for rows="all" with kl / mse_probs.
    teacher_lse_all = not teacher.cls and teacher.kind != KIND_MSE_LOGITS.value
    tlse = torch.empty((B, H, N) if teacher_lse_all else (1,), dtype=torch.float32, device=dev)
    srow_lse, trow_lse, row_loss = (torch.empty((B, H, R), dtype=torch.float32, device=dev)
                                    for _ in range(3))
    launch_fwd(q, k, v, scale, attn_mask, None, out, lse, teacher,
               tlse if teacher_lse_all else None)
    mask, mask_strides, mask_kind = mask_args(attn_mask, q, B, H, N)
    traceable(_match_loss_kernel)[lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), B * H)](
        q, k, tq, tk, mask, lse, tlse, srow_lse, trow_lse, row_loss, *strides(q), *strides(k),
        *strides(tq), *strides(tk), *mask_strides, H, N, R, scale, teacher_scale,
        KIND=teacher.kind, CLS=teacher.cls, MASK=mask_kind, HEAD_DIM=D, TEACHER_DIM=tq.shape[-1],
        **dot_options(q.dtype))
    return out, lse, trow_lse, row_loss, srow_lse


def match_bwd(dout, dlse, drow_loss, q, k, v, out, lse, tq, tk, teacher_row_lse,
              student_row_lse, attn_mask, scale: float, teacher_scale: float, kind: str,
              rows: str):
    """dq, dk, dv (B,H,N,D) in q's dtype from the gradients of out, lse and the row losses
    (each optional). Gradients and saved tensors are contiguous; see match_fwd for the rest."""
    B, H, N, D = q.shape
    R = matched_rows(rows, N)
    kind_id, cls = KINDS[kind], rows == "cls"
    probs = kind_id == KIND_MSE_PROBS.value  # its gradient needs the row term c (a pre-pass)
    c = torch.empty((B, H, R) if probs else (1,), dtype=torch.float32, device=q.device)
    if probs and drow_loss is not None:
        mask, mask_strides, mask_kind = mask_args(attn_mask, q, B, H, N)
        traceable(_match_c_kernel)[lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), B * H)](
            q, k, tq, tk, mask, student_row_lse, teacher_row_lse, drow_loss, c, *strides(q),
            *strides(k), *strides(tq), *strides(tk), *mask_strides, H, N, R, scale,
            teacher_scale, CLS=cls, MASK=mask_kind, HEAD_DIM=D, TEACHER_DIM=tq.shape[-1],
            **dot_options(q.dtype))
    teacher = Teacher(tq, tk, teacher_scale, kind_id, cls, R, student_row_lse, teacher_row_lse,
                      drow_loss, c)
    return launch_bwd(dout, q, k, v, out, lse, dlse, scale, attn_mask, teacher=teacher)
