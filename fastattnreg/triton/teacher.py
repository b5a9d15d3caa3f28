"""The teacher plug-in of the attention kernels: what the fused attention-matching loss
(attention_match) adds to attention's forward and backward, as @triton.jit helpers.

attention.py's _fwd_kernel (TEACHER_LSE) runs the teacher's online LSE beside the student's, and
its backward kernel (TEACHER) adds the loss's gradient L to dS = P * (dP - delta) + L; match.py
holds the loss itself and its launchers. Shapes: teacher_q, teacher_k (B, H, N, Dt), Dt may
differ from D; per matched row (R = N for rows="all", R = 1 for rows="cls": query 0 over keys
1..N-1) the student's and the teacher's LSE over the matched keys, the row loss and, in the
backward, its upstream gradient g and the mse_probs row term c, all (B, H, R) float32.

The loss reads scaled logits in natural units (ss = scale * q k^T, st = teacher_scale * tq tk^T)
and probabilities exp(s - lse), never the log of a probability:
  KIND_KL          kl          sum_j pt_j ((st_j - tlse) - (ss_j - slse))   KL(teacher || student)
  KIND_MSE_PROBS   mse_probs   sum_j (ps_j - pt_j)^2
  KIND_MSE_LOGITS  mse_logits  sum_j (ss_j - st_j)^2                        (needs no LSE)
Its gradient with respect to the student's scaled logits:
  kl          g (ps - pt)
  mse_probs   ps * (G - c),  G = 2 g (ps - pt),  c = sum_j ps_j G_j  (a row pre-pass)
  mse_logits  2 g (ss - st)
A masked key has logit -inf in both rows: its probabilities are 0 and its kl / mse_logits term
and gradient are set to 0 (where -inf - -inf would be NaN). A matched row whose every key is
masked has a row LSE of -inf; 0 stands in for it inside exp (_lse_or_zero).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .tiles import _apply_mask, _dot

# The loss kinds as the kernels' compile-time KIND argument (module-level constexprs, the form in
# which a @triton.jit function may read a global), and by attention_match's kind names.
KIND_KL = tl.constexpr(0)
KIND_MSE_PROBS = tl.constexpr(1)
KIND_MSE_LOGITS = tl.constexpr(2)
KINDS = {"kl": KIND_KL.value, "mse_probs": KIND_MSE_PROBS.value,
         "mse_logits": KIND_MSE_LOGITS.value}


class Teacher(NamedTuple):
    """What the launchers pass for the teacher. q, k: (B, H, N, Dt) with stride 1 on Dt; scale:
    its logit scale; kind: a KINDS value; cls: rows="cls"; rows: R. For the backward also the
    (B, H, R) float32 row LSEs of the forward (student_lse, teacher_lse), the loss's upstream
    gradient drow (or None: no loss gradient) and c (mse_probs; any tensor otherwise)."""

    q: torch.Tensor
    k: torch.Tensor
    scale: float
    kind: int
    cls: bool
    rows: int
    student_lse: torch.Tensor | None = None
    teacher_lse: torch.Tensor | None = None
    drow: torch.Tensor | None = None
    c: torch.Tensor | None = None


@triton.jit
def _matched(rows, cols, N, R, CLS: tl.constexpr):
    """Mask of the matched (row, key) pairs of a tile: rows < R over every key, or for CLS
    query 0 over keys 1..N-1."""
    if CLS:
        return (rows < R)[:, None] & ((cols >= 1) & (cols < N))[None, :]
    else:
        return (rows < R)[:, None] & (cols < N)[None, :]


@triton.jit
def _lse_or_zero(lse):
    """Row LSEs (BLOCK_M,) with 0 standing in for -inf (a matched row whose every key is masked):
    exp(-inf - 0) = 0 then gives its probabilities, where exp(-inf - -inf) would give NaN."""
    return tl.where(lse == float("-inf"), 0.0, lse)


@triton.jit
def _pair_logits(raw, tq, tk, rows, cols, N, scale, teacher_scale, mask_ptr, stride_ai,
                 stride_aj, MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(ss, st): the student's and the teacher's masked logit tiles in natural units, from the
    student's raw = q k^T (BLOCK_M, BLOCK_N) and the teacher's tq (BLOCK_M, TD_PAD) and tk
    (BLOCK_N, TD_PAD) tiles."""
    ss = _apply_mask(raw * scale, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, False)
    st = _apply_mask(_dot(tq, tl.trans(tk), UPCAST, PRECISION) * teacher_scale, rows, cols, N,
                     mask_ptr, stride_ai, stride_aj, MASK, False)
    return ss, st


@triton.jit
def _loss_terms(ss, st, slse, tlse, KIND: tl.constexpr):
    """Per-pair terms of the row loss (summed over keys by the caller), fp32; ss, st natural-unit
    logits with -inf on masked keys, whose terms are 0."""
    slse = _lse_or_zero(slse)
    tlse = _lse_or_zero(tlse)
    if KIND == KIND_KL:
        log_pt = st - tlse[:, None]
        return tl.where(st == float("-inf"), 0.0, tl.exp(log_pt) * (log_pt - (ss - slse[:, None])))
    elif KIND == KIND_MSE_PROBS:
        diff = tl.exp(ss - slse[:, None]) - tl.exp(st - tlse[:, None])
        return diff * diff
    else:
        diff = tl.where(st == float("-inf"), 0.0, ss - st)
        return diff * diff


@triton.jit
def _loss_grad(ss, st, slse, tlse, g, c, KIND: tl.constexpr):
    """Gradient of g * (row loss) with respect to the student's scaled logits ss, fp32; 0 on
    masked keys (ps = pt = 0 there, and mse_logits' difference is set to 0)."""
    slse = _lse_or_zero(slse)
    tlse = _lse_or_zero(tlse)
    if KIND == KIND_KL:
        return g[:, None] * (tl.exp(ss - slse[:, None]) - tl.exp(st - tlse[:, None]))
    elif KIND == KIND_MSE_PROBS:
        ps = tl.exp(ss - slse[:, None])
        G = 2.0 * g[:, None] * (ps - tl.exp(st - tlse[:, None]))
        return ps * (G - c[:, None])
    else:
        return 2.0 * g[:, None] * tl.where(st == float("-inf"), 0.0, ss - st)


@triton.jit
def _teacher_rows(SRowLse, TRowLse, DRow, C, z64, R, rows, KIND: tl.constexpr):
    """(slse, tlse, g, c) of the given matched rows of head z64, (BLOCK_M,) fp32, 0 past R; c
    only for mse_probs (the other kinds' C is a placeholder never read)."""
    offs = z64 * R + rows
    slse = tl.load(SRowLse + offs, mask=rows < R, other=0.0)
    tlse = tl.load(TRowLse + offs, mask=rows < R, other=0.0)
    g = tl.load(DRow + offs, mask=rows < R, other=0.0)
    if KIND == KIND_MSE_PROBS:
        c = tl.load(C + offs, mask=rows < R, other=0.0)
    else:
        c = tl.zeros(offs.shape, tl.float32)
    return slse, tlse, g, c


@triton.jit
def _loss_grad_tile(raw, tq, tk, rows, cols, N, R, scale, teacher_scale, slse, tlse, g, c,
                    mask_ptr, stride_ai, stride_aj, MASK: tl.constexpr, KIND: tl.constexpr,
                    CLS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The loss's gradient tile L (BLOCK_M, BLOCK_N) with respect to the student's scaled
    logits, 0 off the matched pairs; raw = q k^T, the rest as _pair_logits and _teacher_rows."""
    ss, st = _pair_logits(raw, tq, tk, rows, cols, N, scale, teacher_scale, mask_ptr, stride_ai,
                          stride_aj, MASK, UPCAST, PRECISION)
    lg = _loss_grad(ss, st, slse, tlse, g, c, KIND)
    return tl.where(_matched(rows, cols, N, R, CLS), lg, 0.0)
