"""Triton kernels of the fused attention-matching loss (attention_match), and their launchers.

Shapes: q, k, v, out and their gradients (B, H, N, D); teacher_q, teacher_k (B, H, N, Dt), Dt may
differ from D; lse (B, H, N) float32 (the student's, over every key, for `out`); per matched row
(R = N for rows="all", R = 1 for rows="cls": query 0 over keys 1..N-1) the student's and the
teacher's log-sum-exp over the matched keys, the row loss and, in the backward, its upstream
gradient g, all (B, H, R) float32. A head (b, h) is program axis "z" = b * H + h.

The loss is computed from scaled logits in natural units (ss = scale * q k^T, st = teacher_scale *
tq tk^T) and probabilities exp(s - lse), never from the log of a probability:
  KIND 0  kl          sum_j pt_j ((st_j - tlse) - (ss_j - slse))     KL(teacher || student)
  KIND 1  mse_probs   sum_j (ps_j - pt_j)^2
  KIND 2  mse_logits  sum_j (ss_j - st_j)^2                          (needs no LSE)
Its gradient with respect to the student's scaled logits, L, joins the attention backward's
dS = P * (dP - delta) + L (dS is a gradient with respect to the scaled logits, as in attention.py):
  kl          g (ps - pt)
  mse_probs   ps * (G - c),  G = 2 g (ps - pt),  c = sum_j ps_j G_j  (a row pre-pass)
  mse_logits  2 g (ss - st)
A teacher that is a copy of the student gives ss == st and slse == tlse bit for bit (the teacher's
LSE is computed by the same instructions as the student's), so the loss and L are exactly 0.

Masks (MASK constexpr: 0 none, 1 bool, 2 additive float bias, as in attention.py) are read through
the strides of a (B, H, N, N) broadcast view, never materialised, and apply to the student's and
the teacher's logits alike (_apply_mask; the bias in natural units where the logits are, in log2
units inside the online softmax). A masked key has logit -inf in both rows: its probabilities are
0 and its kl / mse_logits term and gradient are set to 0 (where -inf - -inf would be NaN). A
matched row whose every key is masked has a row LSE of -inf; 0 stands in for it inside exp, so
its loss and gradient come out 0 without NaN (_lse_or_zero). Its student output is 0 and its lse
-inf, as attention()'s.

Kernels (each launched by the function of the same stem below):
  _match_fwd_kernel   one query block of one head: the student's online softmax -> out, lse (the
                      instructions of attention's _fwd_kernel without dropout), and for
                      rows="all" (kl, mse_probs) the teacher's LSE by the same online pass.
  _match_loss_kernel  one block of matched rows: for rows="cls" both LSEs over keys 1..N-1 first,
                      then the student's and the teacher's probabilities tile by tile over the
                      keys and the row loss reduced in the same loop.
  _match_delta_kernel backward pre-pass: delta = rowsum(dO * O) - dlse, and c for mse_probs.
  _match_dkdv_kernel  one key block: dV = P^T dO, dK = scale * dS^T Q (dS with the loss term).
  _match_dq_kernel    one query block: dQ = scale * dS K.
Extra memory: O(B * H * N) (the LSEs, delta, c, the row losses); no (B, H, N, N) tensor for
either model. dK/dV and dQ have one writer per block (no atomics): reruns are bitwise equal.
Tiles as in attention.py (autotuned on the GPU; one 64 x 64 tile in the interpreter); the
teacher's head dim is padded to a power of two (TD_PAD) and masked like the student's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .attention import (
    _DELTA_TILES, _DKDV_TILES, _DQ_TILES, _FWD_TILES, _LN2, _LOG2E, INTERPRET, LOG2E, _apply_mask,
    _dot, _dot_options, _load_tile, _logits, _mask_args, _operand, _probs, _store_tile, _strides,
)
from .attention import _tuned as _attention_tuned

KINDS = {"kl": 0, "mse_probs": 1, "mse_logits": 2}
_TUNING_KEY = ["N", "HEAD_DIM", "TEACHER_DIM", "KIND", "CLS", "HAS_DO", "HAS_DLSE", "HAS_DL",
               "MASK"]


def _teacher_dim_pad(args):
    return max(16, triton.next_power_of_2(args["TEACHER_DIM"]))


def _tuned(tiles):
    """attention._tuned with the match tuning key and the teacher's padded head dim too."""
    return _attention_tuned(tiles, key=_TUNING_KEY, extra_heuristics={
        "TD_PAD": _teacher_dim_pad,
        "EVEN_TD": lambda args: args["TEACHER_DIM"] == _teacher_dim_pad(args),
    })


# ----------------------------------------------------------------------------------- helpers


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
def _loss_terms(ss, st, slse, tlse, KIND: tl.constexpr):
    """Per-pair terms of the row loss (summed over keys by the caller), fp32; ss, st natural-unit
    logits with -inf on masked keys, whose terms are 0."""
    slse = _lse_or_zero(slse)
    tlse = _lse_or_zero(tlse)
    if KIND == 0:
        log_pt = st - tlse[:, None]
        return tl.where(st == float("-inf"), 0.0, tl.exp(log_pt) * (log_pt - (ss - slse[:, None])))
    elif KIND == 1:
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
    if KIND == 0:
        return g[:, None] * (tl.exp(ss - slse[:, None]) - tl.exp(st - tlse[:, None]))
    elif KIND == 1:
        ps = tl.exp(ss - slse[:, None])
        G = 2.0 * g[:, None] * (ps - tl.exp(st - tlse[:, None]))
        return ps * (G - c[:, None])
    else:
        return 2.0 * g[:, None] * tl.where(st == float("-inf"), 0.0, ss - st)


@triton.jit
def _row_c(C, offs, mask, KIND: tl.constexpr):
    """The mse_probs row term c (see the module docstring) of the given rows; 0 for the other
    kinds, whose C is a placeholder never read."""
    if KIND == 1:
        return tl.load(C + offs, mask=mask, other=0.0)
    else:
        return tl.zeros(offs.shape, tl.float32)


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the student's online softmax (log2 domain, fp32) from its masked logit
    tile s (BLOCK_M, BLOCK_N): the running row max m_i, row sum l_i and unnormalised output acc
    (BLOCK_M, D_PAD). The instructions of attention's _fwd_kernel without dropout, so out and lse
    equal attention()'s. m_new is -inf while every key so far is masked (l_i and acc still 0):
    0 stands in for it, so exp2 gives 0 rather than NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # P goes into the second GEMM in the input dtype (FlashAttention-2); V stays as loaded.
    acc = acc * alpha[:, None] + _dot(_operand(p, v, UPCAST), v, UPCAST, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _lse_step(m_i, l_i, s, LOG2: tl.constexpr):
    """One key block of an online log-sum-exp over the logit tile s (BLOCK_M, BLOCK_N), -inf on
    keys that take no part: exp2 (log2 units: the row sum's instructions of _softmax_step, so a
    teacher that copies the student gets its l_i bit for bit) or exp (natural units)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    if LOG2:
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), 1)
    else:
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
    return m_new, l_i


@triton.jit
def _lse_end(m_i, l_i, LOG2: tl.constexpr):
    """The natural-log LSE of an online pass; -inf for a row with no key (l_i = 0)."""
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    if LOG2:
        lse = (m_i + tl.log2(l_safe)) * _LN2
    else:
        lse = m_i + tl.log(l_safe)
    return tl.where(dead, float("-inf"), lse)


# ----------------------------------------------------------------------------------- forward


@_tuned(_FWD_TILES)
@triton.jit
def _match_fwd_kernel(Q, K, V, TQ, TK, Mask, Out, Lse, TLse,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn,
                      stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
                      stride_ab, stride_ah, stride_ai, stride_aj,
                      H, N, qk_scale, tqk_scale,
                      TEACHER_LSE: tl.constexpr, MASK: tl.constexpr,
                      HEAD_DIM: tl.constexpr, TEACHER_DIM: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                      EVEN_D: tl.constexpr, TD_PAD: tl.constexpr, EVEN_TD: tl.constexpr):
    """out and lse as attention's forward with the mask; TEACHER_LSE: the teacher's LSE of
    every row (rows "all"), masked alike, by the same log2-domain online pass as the student's
    (bitwise equal for a copy)."""
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_td = tl.arange(0, TD_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    if TEACHER_LSE:
        tq = _load_tile(TQ + b * stride_tqb + h * stride_tqh, rows, stride_tqn, N, offs_td,
                        TEACHER_DIM, EVEN_TD)
    tk_base = TK + b * stride_tkb + h * stride_tkh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    tm_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    tl_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
        v = _load_tile(v_base, cols, stride_vn, N, offs_d, HEAD_DIM, EVEN_D)
        s = _logits(q, k, rows, cols, N, qk_scale, mask_ptr, stride_ai, stride_aj, MASK, UPCAST,
                    PRECISION)
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, UPCAST, PRECISION)
        if TEACHER_LSE:
            tk = _load_tile(tk_base, cols, stride_tkn, N, offs_td, TEACHER_DIM, EVEN_TD)
            t = _logits(tq, tk, rows, cols, N, tqk_scale, mask_ptr, stride_ai, stride_aj, MASK,
                        UPCAST, PRECISION)
            tm_i, tl_i = _lse_step(tm_i, tl_i, t, True)

    # A row whose every key is masked ends with l_i = 0 and acc = 0: out 0 and LSE -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    z64 = z.to(tl.int64)
    _store_tile(Out + z64 * N * HEAD_DIM, rows, N, offs_d, acc / l_safe[:, None], HEAD_DIM, EVEN_D,
                UPCAST)
    tl.store(Lse + (z64 * N + rows), _lse_end(m_i, l_i, True), mask=rows < N)
    if TEACHER_LSE:
        tl.store(TLse + (z64 * N + rows), _lse_end(tm_i, tl_i, True), mask=rows < N)


@_tuned(_DELTA_TILES)
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
    """Row losses of matched rows [pid_m * BLOCK_M, ...) < R, and the row LSEs they used
    (SRowLse, TRowLse: (B, H, R); -inf for a row with every matched key masked; 0 for
    mse_logits, which uses none)."""
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    z64 = z.to(tl.int64)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
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
    if KIND != 2:
        if CLS:
            # Both softmaxes renormalised over keys 1..N-1, masked keys left out.
            sm = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            sl = tl.zeros((BLOCK_M,), tl.float32)
            tm = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            tsum = tl.zeros((BLOCK_M,), tl.float32)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + offs_n
                patch = (cols >= 1)[None, :]
                k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
                tk = _load_tile(tk_base, cols, stride_tkn, N, offs_td, TEACHER_DIM, EVEN_TD)
                ss = _apply_mask(_dot(q, tl.trans(k), UPCAST, PRECISION) * scale, rows, cols, N,
                                 mask_ptr, stride_ai, stride_aj, MASK, False)
                st = _apply_mask(_dot(tq, tl.trans(tk), UPCAST, PRECISION) * teacher_scale, rows,
                                 cols, N, mask_ptr, stride_ai, stride_aj, MASK, False)
                sm, sl = _lse_step(sm, sl, tl.where(patch, ss, float("-inf")), False)
                tm, tsum = _lse_step(tm, tsum, tl.where(patch, st, float("-inf")), False)
            slse = _lse_end(sm, sl, False)
            tlse = _lse_end(tm, tsum, False)
        else:
            slse = tl.load(Lse + (z64 * N + rows), mask=rows < R, other=0.0)
            tlse = tl.load(TLse + (z64 * N + rows), mask=rows < R, other=0.0)

    loss = tl.zeros((BLOCK_M,), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
        tk = _load_tile(tk_base, cols, stride_tkn, N, offs_td, TEACHER_DIM, EVEN_TD)
        ss = _apply_mask(_dot(q, tl.trans(k), UPCAST, PRECISION) * scale, rows, cols, N, mask_ptr,
                         stride_ai, stride_aj, MASK, False)
        st = _apply_mask(_dot(tq, tl.trans(tk), UPCAST, PRECISION) * teacher_scale, rows, cols,
                         N, mask_ptr, stride_ai, stride_aj, MASK, False)
        terms = _loss_terms(ss, st, slse, tlse, KIND)
        loss += tl.sum(tl.where(_matched(rows, cols, N, R, CLS), terms, 0.0), 1)
    out_rows = z64 * R + rows
    tl.store(RowLoss + out_rows, loss, mask=rows < R)
    tl.store(SRowLse + out_rows, slse, mask=rows < R)
    tl.store(TRowLse + out_rows, tlse, mask=rows < R)


# ---------------------------------------------------------------------------------- backward


@_tuned(_DELTA_TILES)
@triton.jit
def _match_delta_kernel(Q, K, TQ, TK, Mask, Out, DOut, DLse, SRowLse, TRowLse, DRow, Delta, C,
                        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                        stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
                        stride_ab, stride_ah, stride_ai, stride_aj,
                        H, N, R, scale, teacher_scale,
                        KIND: tl.constexpr, CLS: tl.constexpr, MASK: tl.constexpr,
                        HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_DL: tl.constexpr,
                        HEAD_DIM: tl.constexpr, TEACHER_DIM: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                        EVEN_D: tl.constexpr, TD_PAD: tl.constexpr, EVEN_TD: tl.constexpr):
    """delta_i = dO_i . O_i - dlse_i (B, H, N); for mse_probs also c_i = sum_j ps_ij G_ij over
    the matched keys of matched rows (B, H, R), G = 2 g (ps - pt) (0 on masked keys)."""
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    z64 = z.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    delta = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_DO:
        o = _load_tile(Out + z64 * N * HEAD_DIM, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
        do = _load_tile(DOut + z64 * N * HEAD_DIM, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + (z64 * N + rows), mask=rows < N, other=0.0)
    tl.store(Delta + (z64 * N + rows), delta, mask=rows < N)
    if KIND == 1 and HAS_DL:
        if pid_m * BLOCK_M < R:
            b = (z // H).to(tl.int64)
            h = (z % H).to(tl.int64)
            offs_td = tl.arange(0, TD_PAD)
            mask_ptr = Mask + b * stride_ab + h * stride_ah
            q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, R, offs_d,
                           HEAD_DIM, EVEN_D)
            tq = _load_tile(TQ + b * stride_tqb + h * stride_tqh, rows, stride_tqn, R, offs_td,
                            TEACHER_DIM, EVEN_TD)
            slse = _lse_or_zero(tl.load(SRowLse + (z64 * R + rows), mask=rows < R, other=0.0))
            tlse = _lse_or_zero(tl.load(TRowLse + (z64 * R + rows), mask=rows < R, other=0.0))
            g = tl.load(DRow + (z64 * R + rows), mask=rows < R, other=0.0)
            c = tl.zeros((BLOCK_M,), tl.float32)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + tl.arange(0, BLOCK_N)
                k = _load_tile(K + b * stride_kb + h * stride_kh, cols, stride_kn, N, offs_d,
                               HEAD_DIM, EVEN_D)
                tk = _load_tile(TK + b * stride_tkb + h * stride_tkh, cols, stride_tkn, N,
                                offs_td, TEACHER_DIM, EVEN_TD)
                ss = _apply_mask(_dot(q, tl.trans(k), UPCAST, PRECISION) * scale, rows, cols, N,
                                 mask_ptr, stride_ai, stride_aj, MASK, False)
                st = _apply_mask(_dot(tq, tl.trans(tk), UPCAST, PRECISION) * teacher_scale,
                                 rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, False)
                ps = tl.exp(ss - slse[:, None])
                pt = tl.exp(st - tlse[:, None])
                pg = ps * (2.0 * g[:, None] * (ps - pt))
                c += tl.sum(tl.where(_matched(rows, cols, N, R, CLS), pg, 0.0), 1)
            tl.store(C + (z64 * R + rows), c, mask=rows < R)


@_tuned(_DKDV_TILES)
@triton.jit
def _match_dkdv_kernel(Q, K, V, TQ, TK, Mask, DOut, Lse, Delta, SRowLse, TRowLse, DRow, C, DK,
                       DV,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn,
                       stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
                       stride_ab, stride_ah, stride_ai, stride_aj,
                       H, N, R, qk_scale, scale, teacher_scale,
                       KIND: tl.constexpr, CLS: tl.constexpr, MASK: tl.constexpr,
                       HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_DL: tl.constexpr,
                       HEAD_DIM: tl.constexpr, TEACHER_DIM: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                       EVEN_D: tl.constexpr, TD_PAD: tl.constexpr, EVEN_TD: tl.constexpr):
    """One key block of one head: dV = P^T dO and dK = scale * dS^T Q, dS with the loss term on
    the query blocks that hold matched rows; summed over query blocks in order."""
    pid_n = tl.program_id(0)
    z = tl.program_id(1)
    z64 = z.to(tl.int64)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_td = tl.arange(0, TD_PAD)
    k = _load_tile(K + b * stride_kb + h * stride_kh, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
    v = _load_tile(V + b * stride_vb + h * stride_vh, cols, stride_vn, N, offs_d, HEAD_DIM, EVEN_D)
    tk = _load_tile(TK + b * stride_tkb + h * stride_tkh, cols, stride_tkn, N, offs_td,
                    TEACHER_DIM, EVEN_TD)
    q_base = Q + b * stride_qb + h * stride_qh
    tq_base = TQ + b * stride_tqb + h * stride_tqh
    do_base = DOut + z64 * N * HEAD_DIM
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_base, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
        lse2 = tl.load(Lse + (z64 * N + rows), mask=rows < N, other=0.0) * _LOG2E
        delta = tl.load(Delta + (z64 * N + rows), mask=rows < N, other=0.0)
        raw = _dot(q, tl.trans(k), UPCAST, PRECISION)  # q k^T, (BLOCK_M, BLOCK_N)
        s = _apply_mask(raw * qk_scale, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, True)
        p = _probs(s, lse2, rows, N)
        dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_DO:
            do = _load_tile(do_base, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
            dv += _dot(tl.trans(_operand(p, do, UPCAST)), do, UPCAST, PRECISION)
            dp += _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_DL:
            if start_m < R:
                tq = _load_tile(tq_base, rows, stride_tqn, R, offs_td, TEACHER_DIM, EVEN_TD)
                st = _apply_mask(_dot(tq, tl.trans(tk), UPCAST, PRECISION) * teacher_scale,
                                 rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, False)
                ss = _apply_mask(raw * scale, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK,
                                 False)
                slse = tl.load(SRowLse + (z64 * R + rows), mask=rows < R, other=0.0)
                tlse = tl.load(TRowLse + (z64 * R + rows), mask=rows < R, other=0.0)
                g = tl.load(DRow + (z64 * R + rows), mask=rows < R, other=0.0)
                c = _row_c(C, z64 * R + rows, rows < R, KIND)
                lg = _loss_grad(ss, st, slse, tlse, g, c, KIND)
                ds += tl.where(_matched(rows, cols, N, R, CLS), lg, 0.0)
        dk += _dot(tl.trans(_operand(ds, q, UPCAST)), q, UPCAST, PRECISION)
    _store_tile(DK + z64 * N * HEAD_DIM, cols, N, offs_d, dk * scale, HEAD_DIM, EVEN_D, UPCAST)
    _store_tile(DV + z64 * N * HEAD_DIM, cols, N, offs_d, dv, HEAD_DIM, EVEN_D, UPCAST)


@_tuned(_DQ_TILES)
@triton.jit
def _match_dq_kernel(Q, K, V, TQ, TK, Mask, DOut, Lse, Delta, SRowLse, TRowLse, DRow, C, DQ,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
                     stride_ab, stride_ah, stride_ai, stride_aj,
                     H, N, R, qk_scale, scale, teacher_scale,
                     KIND: tl.constexpr, CLS: tl.constexpr, MASK: tl.constexpr,
                     HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_DL: tl.constexpr,
                     HEAD_DIM: tl.constexpr, TEACHER_DIM: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                     EVEN_D: tl.constexpr, TD_PAD: tl.constexpr, EVEN_TD: tl.constexpr):
    """One query block of one head: dQ = scale * dS K, summed over key blocks in order."""
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    z64 = z.to(tl.int64)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_td = tl.arange(0, TD_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
    lse2 = tl.load(Lse + (z64 * N + rows), mask=rows < N, other=0.0) * _LOG2E
    delta = tl.load(Delta + (z64 * N + rows), mask=rows < N, other=0.0)
    if HAS_DO:
        do = _load_tile(DOut + z64 * N * HEAD_DIM, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
    # The loss term reaches only blocks with matched rows (for CLS the first one).
    has_loss = pid_m * BLOCK_M < R
    if HAS_DL:
        tq = _load_tile(TQ + b * stride_tqb + h * stride_tqh, rows, stride_tqn, R, offs_td,
                        TEACHER_DIM, EVEN_TD)
        slse = tl.load(SRowLse + (z64 * R + rows), mask=rows < R, other=0.0)
        tlse = tl.load(TRowLse + (z64 * R + rows), mask=rows < R, other=0.0)
        g = tl.load(DRow + (z64 * R + rows), mask=rows < R, other=0.0)
        c = _row_c(C, z64 * R + rows, rows < R, KIND)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    tk_base = TK + b * stride_tkb + h * stride_tkh
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
        raw = _dot(q, tl.trans(k), UPCAST, PRECISION)
        s = _apply_mask(raw * qk_scale, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, True)
        p = _probs(s, lse2, rows, N)
        dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_DO:
            v = _load_tile(v_base, cols, stride_vn, N, offs_d, HEAD_DIM, EVEN_D)
            dp += _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_DL:
            if has_loss:
                tk = _load_tile(tk_base, cols, stride_tkn, N, offs_td, TEACHER_DIM, EVEN_TD)
                st = _apply_mask(_dot(tq, tl.trans(tk), UPCAST, PRECISION) * teacher_scale,
                                 rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, False)
                ss = _apply_mask(raw * scale, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK,
                                 False)
                lg = _loss_grad(ss, st, slse, tlse, g, c, KIND)
                ds += tl.where(_matched(rows, cols, N, R, CLS), lg, 0.0)
        dq += _dot(_operand(ds, k, UPCAST), k, UPCAST, PRECISION)
    _store_tile(DQ + z64 * N * HEAD_DIM, rows, N, offs_d, dq * scale, HEAD_DIM, EVEN_D, UPCAST)


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
    Dt = tq.shape[-1]
    R = matched_rows(rows, N)
    kind_id, cls = KINDS[kind], rows == "cls"
    dev = q.device
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    teacher_lse_all = not cls and kind_id != 2
    # The teacher's LSE over every key, needed only for rows="all" with kl / mse_probs.
    tlse = torch.empty((B, H, N) if teacher_lse_all else (1,), dtype=torch.float32, device=dev)
    srow_lse, trow_lse, row_loss = (torch.empty((B, H, R), dtype=torch.float32, device=dev)
                                    for _ in range(3))
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q, B, H, N)
    opts = _dot_options(q.dtype)
    strides = (*_strides(q), *_strides(k))
    teacher_strides = (*_strides(tq), *_strides(tk))
    wrap_triton(_match_fwd_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, tq, tk, mask, out, lse, tlse, *strides, *_strides(v), *teacher_strides,
        *mask_strides, H, N, scale * LOG2E, teacher_scale * LOG2E, TEACHER_LSE=teacher_lse_all,
        MASK=mask_kind, HEAD_DIM=D, TEACHER_DIM=Dt, **opts)
    wrap_triton(_match_loss_kernel)[lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), B * H)](
        q, k, tq, tk, mask, lse, tlse, srow_lse, trow_lse, row_loss, *strides, *teacher_strides,
        *mask_strides, H, N, R, scale, teacher_scale, KIND=kind_id, CLS=cls, MASK=mask_kind,
        HEAD_DIM=D, TEACHER_DIM=Dt, **opts)
    return out, lse, trow_lse, row_loss, srow_lse


def match_bwd(dout, dlse, drow_loss, q, k, v, out, lse, tq, tk, teacher_row_lse,
              student_row_lse, attn_mask, scale: float, teacher_scale: float, kind: str,
              rows: str):
    """dq, dk, dv (B,H,N,D) in q's dtype from the gradients of out, lse and the row losses
    (each optional). Gradients and saved tensors are contiguous; see match_fwd for the rest."""
    B, H, N, D = q.shape
    Dt = tq.shape[-1]
    R = matched_rows(rows, N)
    kind_id, cls = KINDS[kind], rows == "cls"
    dev = q.device
    delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    c = torch.empty((B, H, R) if kind_id == 1 else (1,), dtype=torch.float32, device=dev)
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=dev) for _ in range(3))
    has_do, has_dlse, has_dl = dout is not None, dlse is not None, drow_loss is not None
    # Absent gradients are never read (their HAS_* flag is off); any tensor holds their place.
    dout = dout if has_do else out
    dlse = dlse if has_dlse else lse
    drow_loss = drow_loss if has_dl else student_row_lse
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q, B, H, N)
    opts = _dot_options(q.dtype)
    flags = {"KIND": kind_id, "CLS": cls, "MASK": mask_kind, "HAS_DO": has_do,
             "HAS_DLSE": has_dlse, "HAS_DL": has_dl, "HEAD_DIM": D, "TEACHER_DIM": Dt, **opts}
    qk = (*_strides(q), *_strides(k))
    teacher = (*_strides(tq), *_strides(tk))
    wrap_triton(_match_delta_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, tq, tk, mask, out, dout, dlse, student_row_lse, teacher_row_lse, drow_loss, delta,
        c, *qk, *teacher, *mask_strides, H, N, R, scale, teacher_scale, **flags)
    common = (*qk, *_strides(v), *teacher, *mask_strides, H, N, R, scale * LOG2E, scale,
              teacher_scale)
    saved = (lse, delta, student_row_lse, teacher_row_lse, drow_loss, c)
    wrap_triton(_match_dkdv_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, tq, tk, mask, dout, *saved, dk, dv, *common, **flags)
    wrap_triton(_match_dq_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, tq, tk, mask, dout, *saved, dq, *common, **flags)
    return dq, dk, dv
