"""Triton attention kernels with exact map export (FlashAttention-2 structure), and launchers.

Shapes: q, k, v, out and their gradients (B, H, N, D); lse and delta (B, H, N) float32;
maps "full" (B, H, N, N), "head_mean" (B, N, N), "cls" (B, H, N) (row 0 of P), "key_mean"
(B, H, N) (column means of P: what each key receives, averaged over the queries).
A head of (b, h) is program axis "z" = b * H + h. Scores live in the log2 domain inside the
kernels (exp2 is the fast path); the LSE is stored in natural log.

Masks (MASK constexpr: 0 none, 1 bool, 2 additive float bias) are read through the strides of a
(B, H, N, N) broadcast view (0 on broadcast axes), never materialised; every kernel that
recomputes logits applies them (_logits). A masked entry has logit -inf and P exactly 0; a row
whose every key is masked has m_i = lse = -inf, out 0, P 0 and zero gradients (0 stands in for
the -inf row max / LSE inside exp2, so no -inf - -inf NaN arises).
Dropout (DROPOUT constexpr) regenerates the keep-mask of triton/dropout.py per tile: the forward
multiplies P V's P by it, the backward dV's P and dP; maps and LSE are those before dropout.

Kernels (the launchers below run them; match.py runs _fwd_kernel and _bwd_kernel with the
teacher plug-in of teacher.py switched on, as the C++ kernels take their Teacher):
  _fwd_kernel       one query block of one head: online softmax over key blocks -> out, lse
                    (TEACHER_LSE: also the teacher's LSE of every row).
  _maps_kernel      one (query block, key block) tile of the maps, P recomputed from the LSE; for
                    "head_mean" one program loops over the heads, so the mean needs no atomics.
  _key_mean_kernel  one key block of one head, looping over the query blocks: column means.
  _delta_kernel     backward pre-pass, one query block:
                    delta = rowsum(dO * O) + rowsum(P * G) - dlse
                    (G: gradient arriving through the maps, scaled to one head / one query).
  _bwd_kernel       the backward's two passes, autotuned apart as _dkdv_kernel (one key block,
                    looping over query blocks: dK, dV) and _dq_kernel (DQ_PASS: one query
                    block, looping over key blocks: dQ, and the mask's gradient dS tile by tile,
                    each tile written by the one program that owns it).
dK/dV and dQ are separate programs, each the only writer of its block: no atomics, so every run
sums in the same order and reruns are bitwise equal. P is recomputed from the LSE, never stored.

Tiles: the autotuned lists of triton/tiles.py. Head dims that are not powers of two (48, 80) are
padded to the next power of two (D_PAD) and masked; every load is masked on rows, columns and
head dim, so any N from 1 up works.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..exports import maps_shape
from .dropout import Dropout, dropout_keep
from .teacher import KIND_KL, Teacher, _loss_grad_tile, _teacher_rows
from .tiles import (
    _LOG2E, DELTA_TILES, DKDV_TILES, DQ_TILES, FWD_TILES, INTERPRET, KEY_MEAN_TILES, LOG2E,
    MAPS_TILES, MAX_GRID_Z, _apply_mask, _dot, _load_tile, _logits, _lse_end, _lse_step,
    _operand, _probs, _program_head, _query_program, _round_to_bf16, _row_stats, _store_tile,
    dot_options, mask_args, strides, traceable, tuned,
)

__all__ = ["INTERPRET", "MAX_GRID_Z", "attention_bwd", "attention_fwd", "write_maps"]


# ----------------------------------------------------------------------------------- helpers


@triton.jit
def _dropout_seed(Rng, DROPOUT: tl.constexpr):
    """(seed, offset) int64 of the dropout stream from Rng (2,); (0, 0), unread, without."""
    if DROPOUT:
        return tl.load(Rng), tl.load(Rng + 1)
    else:
        return 0, 0


@triton.jit
def _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi, g_scale):
    """Tile of dL/dP for head (b, h) from the maps' gradient G, fp32; 0 on rows >= g_rows.

    full: G (B, H, N, N); head_mean: G (B, N, N) with stride_gh = 0 and g_scale = 1 / H;
    cls: G (B, H, N) with stride_gi = 0 and g_rows = 1 (only query 0 reaches the map);
    key_mean: G (B, H, N) with stride_gi = 0, g_rows = N and g_scale = 1 / N (every query).
    """
    base = G + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    mask = (rows < g_rows)[:, None] & (cols < N)[None, :]
    g = tl.load(base + (rows.to(tl.int64)[:, None] * stride_gi + cols[None, :]), mask=mask,
                other=0.0)
    return g.to(tl.float32) * g_scale


@triton.jit
def _query_block(q_base, do_base, tq_base, Lse, Delta, SRowLse, TRowLse, DRow, C, z64, rows, N,
                 R, stride_qn, stride_tqn, offs_d, offs_td, HAS_DO: tl.constexpr,
                 TEACHER: tl.constexpr, KIND: tl.constexpr, HEAD_DIM: tl.constexpr,
                 EVEN_D: tl.constexpr, TEACHER_DIM: tl.constexpr, EVEN_TD: tl.constexpr):
    """What the backward reads of a query block: (q, lse2, delta, do, tq, slse, tlse, g, c);
    do is q (unread) without HAS_DO, and the teacher's tq and row terms (teacher.py, 0 past R)
    are placeholders without TEACHER."""
    q = _load_tile(q_base, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
    lse2, delta = _row_stats(Lse, Delta, z64, N, rows)
    do = q
    if HAS_DO:
        do = _load_tile(do_base, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
    tq = q
    slse = lse2
    tlse = lse2
    g = lse2
    c = lse2
    if TEACHER:
        tq = _load_tile(tq_base, rows, stride_tqn, R, offs_td, TEACHER_DIM, EVEN_TD)
        slse, tlse, g, c = _teacher_rows(SRowLse, TRowLse, DRow, C, z64, R, rows, KIND)
    return q, lse2, delta, do, tq, slse, tlse, g, c


@triton.jit
def _key_block(k_base, v_base, tk_base, cols, N, teacher_n, stride_kn, stride_vn, stride_tkn,
               offs_d, offs_td, TEACHER: tl.constexpr, HEAD_DIM: tl.constexpr,
               EVEN_D: tl.constexpr, TEACHER_DIM: tl.constexpr, EVEN_TD: tl.constexpr):
    """What the backward reads of a key block: (k, v, tk); the teacher's tk (rows < teacher_n
    read, the rest 0) is k, unread, without TEACHER."""
    k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
    v = _load_tile(v_base, cols, stride_vn, N, offs_d, HEAD_DIM, EVEN_D)
    tk = k
    if TEACHER:
        tk = _load_tile(tk_base, cols, stride_tkn, teacher_n, offs_td, TEACHER_DIM, EVEN_TD)
    return k, v, tk


@triton.jit
def _ds_tile(q, k, v, do, tq, tk, G, b, h, z, rows, cols, row0, N, R, lse2, delta, slse, tlse, g,
             c, qk_scale, scale, teacher_scale, mask_ptr, stride_ai, stride_aj, g_rows, stride_gb,
             stride_gh, stride_gi, g_scale, seed, offset, threshold, drop_scale,
             HAS_DO: tl.constexpr, HAS_G: tl.constexpr, MASK: tl.constexpr,
             DROPOUT: tl.constexpr, TEACHER: tl.constexpr, KIND: tl.constexpr, CLS: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(p_out, ds) of one (rows, cols) tile of head z = b * H + h, each (BLOCK_M, BLOCK_N) fp32:
    p_out the P that entered P V (times the dropout keep-mask and scale) and
    dS = P * (dP - delta) (+ the match loss's gradient with TEACHER, on query blocks starting at
    row0 < R), dP = out's share (dO V^T, through the same keep-mask) plus the maps' gradient.
    q, do (BLOCK_M, D_PAD), k, v (BLOCK_N, D_PAD), tq, tk the teacher's tiles and slse, tlse, g,
    c its row terms (teacher.py); do and v unread without HAS_DO, the teacher's without TEACHER."""
    raw = _dot(q, tl.trans(k), UPCAST, PRECISION)
    s = _apply_mask(raw * qk_scale, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, True)
    p = _probs(s, lse2, rows, N)  # before dropout
    dp = tl.zeros(p.shape, tl.float32)
    p_out = p
    if HAS_DO:
        dp_out = _dot(do, tl.trans(v), UPCAST, PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, offset, z, rows, cols, N, threshold)
            p_out = tl.where(keep, p * drop_scale, 0.0)
            dp_out = tl.where(keep, dp_out * drop_scale, 0.0)
        dp += dp_out
    if HAS_G:
        dp += _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi, g_scale)
    ds = p * (dp - delta[:, None])
    if TEACHER:
        if row0 < R:
            ds += _loss_grad_tile(raw, tq, tk, rows, cols, N, R, scale, teacher_scale, slse, tlse,
                                  g, c, mask_ptr, stride_ai, stride_aj, MASK, KIND, CLS, UPCAST,
                                  PRECISION)
    return p_out, ds


# ----------------------------------------------------------------------------------- forward


@tuned(FWD_TILES, teacher=True)
@triton.jit
def _fwd_kernel(Q, K, V, TQ, TK, Mask, Rng, Out, Lse, TLse,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
                stride_ab, stride_ah, stride_ai, stride_aj,
                H, N, qk_scale, tqk_scale, threshold, drop_scale,
                MASK: tl.constexpr, DROPOUT: tl.constexpr, TEACHER_LSE: tl.constexpr,
                HEAD_DIM: tl.constexpr, TEACHER_DIM: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                EVEN_D: tl.constexpr, TD_PAD: tl.constexpr, EVEN_TD: tl.constexpr):
    """One query block of one head: online softmax over the key blocks -> out, lse. With
    TEACHER_LSE (the match loss, rows "all") also the teacher's LSE of every row into TLse, by
    the same log2-domain pass and masked alike (bitwise the student's for a copy)."""
    z, z64, b, h, rows = _query_program(H, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_td = tl.arange(0, TD_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    tk_base = TK + b * stride_tkb + h * stride_tkh
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    seed, offset = _dropout_seed(Rng, DROPOUT)
    if TEACHER_LSE:
        tq = _load_tile(TQ + b * stride_tqb + h * stride_tqh, rows, stride_tqn, N, offs_td,
                        TEACHER_DIM, EVEN_TD)

    # Online softmax in fp32: running row max m_i (log2 units), row sum l_i (of P before
    # dropout), unnormalised out acc (of the dropped P); the teacher's tm_i, tl_i alike.
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
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # m_new is -inf while every key so far is masked (l_i and acc are still 0 then): 0 stands
        # in, so that exp2 gives 0 rather than exp2(-inf - -inf) = NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed, offset, z, rows, cols, N, threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        # P goes into the second GEMM in the input dtype (FlashAttention-2); V stays as loaded.
        acc = acc * alpha[:, None] + _dot(_operand(p, v, UPCAST), v, UPCAST, PRECISION)
        m_i = m_new
        if TEACHER_LSE:
            tk = _load_tile(tk_base, cols, stride_tkn, N, offs_td, TEACHER_DIM, EVEN_TD)
            t = _logits(tq, tk, rows, cols, N, tqk_scale, mask_ptr, stride_ai, stride_aj, MASK,
                        UPCAST, PRECISION)
            tm_i, tl_i = _lse_step(tm_i, tl_i, t, True)

    # A row whose every key is masked ends with l_i = 0 and acc = 0: out 0 and LSE -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_tile(Out + z64 * N * HEAD_DIM, rows, N, offs_d, acc / l_safe[:, None], HEAD_DIM, EVEN_D,
                UPCAST)
    tl.store(Lse + (z64 * N + rows), _lse_end(m_i, l_i, True), mask=rows < N)
    if TEACHER_LSE:
        tl.store(TLse + (z64 * N + rows), _lse_end(tm_i, tl_i, True), mask=rows < N)


@tuned(MAPS_TILES)
@triton.jit
def _maps_kernel(Q, K, Lse, Mask, Maps,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_ab, stride_ah, stride_ai, stride_aj, stride_mb, stride_mh, stride_mi,
                 H, N, n_rows, qk_scale, head_scale,
                 HEAD_MEAN: tl.constexpr, MASK: tl.constexpr,
                 HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                 EVEN_D: tl.constexpr):
    """Writes maps[b, h, rows, cols] (full, cls: program z = b * H + h, one head) or the head
    mean maps[b, rows, cols] (HEAD_MEAN: z = b, the heads summed in order, then * head_scale).
    n_rows: N for full/head_mean, 1 for cls (only query 0 is stored)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    z = tl.program_id(2).to(tl.int64)
    if HEAD_MEAN:
        b = z
        h0 = z * 0
        n_heads = H
    else:
        b = z // H
        h0 = z % H
        n_heads = 1
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for i in range(0, n_heads):
        h = h0 + i
        q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, n_rows, offs_d,
                       HEAD_DIM, EVEN_D)
        k = _load_tile(K + b * stride_kb + h * stride_kh, cols, stride_kn, N, offs_d,
                       HEAD_DIM, EVEN_D)
        lse2 = tl.load(Lse + ((b * H + h) * N + rows), mask=rows < n_rows, other=0.0) * _LOG2E
        s = _logits(q, k, rows, cols, N, qk_scale, Mask + b * stride_ab + h * stride_ah,
                    stride_ai, stride_aj, MASK, UPCAST, PRECISION)
        acc += _probs(s, lse2, rows, N)
    ptrs = Maps + (b * stride_mb + h0 * stride_mh + rows.to(tl.int64)[:, None] * stride_mi
                   + cols[None, :])
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    acc *= head_scale
    if UPCAST:
        acc = _round_to_bf16(acc)
    tl.store(ptrs, acc.to(Maps.dtype.element_ty), mask=mask)


@tuned(KEY_MEAN_TILES)
@triton.jit
def _key_mean_kernel(Q, K, Lse, Mask, Maps,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_ab, stride_ah, stride_ai, stride_aj,
                     H, N, qk_scale, row_scale,
                     MASK: tl.constexpr,
                     HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                     EVEN_D: tl.constexpr):
    """maps[b, h, cols] = row_scale * sum_i P[b, h, i, cols] (row_scale = 1 / N) for one key
    block of head z = b * H + h: the query blocks are summed in order by this program alone, so
    the mean needs no atomics and reruns are bitwise equal."""
    pid_n = tl.program_id(0)
    z, z64, b, h = _program_head(H)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    k = _load_tile(K + b * stride_kb + h * stride_kh, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
    q_base = Q + b * stride_qb + h * stride_qh
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_base, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
        lse2 = tl.load(Lse + (z64 * N + rows), mask=rows < N, other=0.0) * _LOG2E
        s = _logits(q, k, rows, cols, N, qk_scale, mask_ptr, stride_ai, stride_aj, MASK, UPCAST,
                    PRECISION)
        acc += tl.sum(_probs(s, lse2, rows, N), 0)
    acc *= row_scale
    if UPCAST:
        acc = _round_to_bf16(acc)
    tl.store(Maps + (z64 * N + cols), acc.to(Maps.dtype.element_ty), mask=cols < N)


# ---------------------------------------------------------------------------------- backward


@tuned(DELTA_TILES)
@triton.jit
def _delta_kernel(Q, K, Out, DOut, Lse, DLse, G, Mask, Delta,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                  stride_gb, stride_gh, stride_gi, stride_ab, stride_ah, stride_ai, stride_aj,
                  H, N, g_rows, qk_scale, g_scale,
                  HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_G: tl.constexpr,
                  MASK: tl.constexpr,
                  HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                  EVEN_D: tl.constexpr):
    """delta_i = dO_i . O_i + sum_j P_ij G_ij - dlse_i, the row term of dS = P * (dP + G - delta)
    (the softmax backward of everything that reached P: out, maps and the LSE). With dropout
    dO_i . O_i is still the row term of out's share: O is made of the dropped P and dP of out is
    (dO V^T) times the same keep-mask and scale."""
    z, z64, b, h, rows = _query_program(H, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    delta = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_DO:
        o = _load_tile(Out + z64 * N * HEAD_DIM, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
        do = _load_tile(DOut + z64 * N * HEAD_DIM, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + (z64 * N + rows), mask=rows < N, other=0.0)
    if HAS_G:
        # Only query blocks holding rows < g_rows meet the map (for "cls" just the first one).
        if tl.program_id(0) * BLOCK_M < g_rows:
            q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, N, offs_d,
                           HEAD_DIM, EVEN_D)
            k_base = K + b * stride_kb + h * stride_kh
            mask_ptr = Mask + b * stride_ab + h * stride_ah
            lse2 = tl.load(Lse + (z64 * N + rows), mask=rows < N, other=0.0) * _LOG2E
            pg = tl.zeros((BLOCK_M,), tl.float32)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + tl.arange(0, BLOCK_N)
                k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
                s = _logits(q, k, rows, cols, N, qk_scale, mask_ptr, stride_ai, stride_aj, MASK,
                            UPCAST, PRECISION)
                p = _probs(s, lse2, rows, N)
                g = _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi,
                              g_scale)
                pg += tl.sum(p * g, 1)
            delta += pg
    tl.store(Delta + (z64 * N + rows), delta, mask=rows < N)


@triton.jit
def _bwd_kernel(Q, K, V, TQ, TK, DOut, Lse, Delta, G, SRowLse, TRowLse, DRow, C, Mask, Rng,
                DQ, DK, DV, DMask,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_tqb, stride_tqh, stride_tqn, stride_tkb, stride_tkh, stride_tkn,
                stride_gb, stride_gh, stride_gi, stride_ab, stride_ah, stride_ai, stride_aj,
                H, N, R, g_rows, qk_scale, scale, teacher_scale, g_scale, threshold, drop_scale,
                DQ_PASS: tl.constexpr, HAS_DO: tl.constexpr, HAS_G: tl.constexpr,
                MASK: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
                TEACHER: tl.constexpr, KIND: tl.constexpr, CLS: tl.constexpr,
                HEAD_DIM: tl.constexpr, TEACHER_DIM: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                EVEN_D: tl.constexpr, TD_PAD: tl.constexpr, EVEN_TD: tl.constexpr):
    """The backward's two passes over one head z = b * H + h, each the only writer of its block:

    DQ_PASS  one query block: dQ = scale * dS K, summed over the key blocks in order; with
             MASK_GRAD also dS itself (dL/d(logits), the float mask's gradient) into DMask
             (B, H, N, N), each tile written once, by this program.
    else     one key block: dV = (P * keep / (1 - p))^T dO and dK = scale * dS^T Q, summed over
             the query blocks in order.
    TEACHER (the match loss) adds its gradient L (teacher.py) to dS on the query blocks that
    hold matched rows (rows < R; for rows "cls" the first one)."""
    z, z64, b, h = _program_head(H)
    offs_d = tl.arange(0, D_PAD)
    offs_td = tl.arange(0, TD_PAD)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    tq_base = TQ + b * stride_tqb + h * stride_tqh
    tk_base = TK + b * stride_tkb + h * stride_tkh
    do_base = DOut + z64 * N * HEAD_DIM
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    seed, offset = _dropout_seed(Rng, DROPOUT)
    # This program's own block (loaded once) and the step of the loop over the other axis.
    if DQ_PASS:
        row0 = tl.program_id(0) * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        q, lse2, delta, do, tq, slse, tlse, g, c = _query_block(
            q_base, do_base, tq_base, Lse, Delta, SRowLse, TRowLse, DRow, C, z64, rows, N, R,
            stride_qn, stride_tqn, offs_d, offs_td, HAS_DO, TEACHER, KIND, HEAD_DIM, EVEN_D,
            TEACHER_DIM, EVEN_TD)
        dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        step = BLOCK_N
    else:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k, v, tk = _key_block(k_base, v_base, tk_base, cols, N, N, stride_kn, stride_vn,
                              stride_tkn, offs_d, offs_td, TEACHER, HEAD_DIM, EVEN_D, TEACHER_DIM,
                              EVEN_TD)
        dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
        dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
        step = BLOCK_M
    for start in range(0, N, step):
        if DQ_PASS:
            cols = start + tl.arange(0, BLOCK_N)
            # The teacher's keys are read only where the block holds matched rows.
            k, v, tk = _key_block(k_base, v_base, tk_base, cols, N, tl.where(row0 < R, N, 0),
                                  stride_kn, stride_vn, stride_tkn, offs_d, offs_td, TEACHER,
                                  HEAD_DIM, EVEN_D, TEACHER_DIM, EVEN_TD)
        else:
            row0 = start
            rows = start + tl.arange(0, BLOCK_M)
            q, lse2, delta, do, tq, slse, tlse, g, c = _query_block(
                q_base, do_base, tq_base, Lse, Delta, SRowLse, TRowLse, DRow, C, z64, rows, N, R,
                stride_qn, stride_tqn, offs_d, offs_td, HAS_DO, TEACHER, KIND, HEAD_DIM, EVEN_D,
                TEACHER_DIM, EVEN_TD)
        p_out, ds = _ds_tile(q, k, v, do, tq, tk, G, b, h, z, rows, cols, row0, N, R, lse2, delta,
                             slse, tlse, g, c, qk_scale, scale, teacher_scale, mask_ptr,
                             stride_ai, stride_aj, g_rows, stride_gb, stride_gh, stride_gi,
                             g_scale, seed, offset, threshold, drop_scale, HAS_DO, HAS_G, MASK,
                             DROPOUT, TEACHER, KIND, CLS, UPCAST, PRECISION)
        if DQ_PASS:
            if MASK_GRAD:
                ds_out = ds
                if UPCAST:
                    ds_out = _round_to_bf16(ds_out)
                inside = (rows < N)[:, None] & (cols < N)[None, :]
                tl.store(DMask + (z64 * N * N + rows.to(tl.int64)[:, None] * N + cols[None, :]),
                         ds_out.to(DMask.dtype.element_ty), mask=inside)
            dq += _dot(_operand(ds, k, UPCAST), k, UPCAST, PRECISION)
        else:
            if HAS_DO:
                dv += _dot(tl.trans(_operand(p_out, do, UPCAST)), do, UPCAST, PRECISION)
            dk += _dot(tl.trans(_operand(ds, q, UPCAST)), q, UPCAST, PRECISION)
    if DQ_PASS:
        _store_tile(DQ + z64 * N * HEAD_DIM, rows, N, offs_d, dq * scale, HEAD_DIM, EVEN_D, UPCAST)
    else:
        _store_tile(DK + z64 * N * HEAD_DIM, cols, N, offs_d, dk * scale, HEAD_DIM, EVEN_D, UPCAST)
        _store_tile(DV + z64 * N * HEAD_DIM, cols, N, offs_d, dv, HEAD_DIM, EVEN_D, UPCAST)


# One kernel, two autotuned launchers: each pass has its own tile list (DQ_PASS is in the key).
_dkdv_kernel = tuned(DKDV_TILES, teacher=True)(_bwd_kernel)
_dq_kernel = tuned(DQ_TILES, teacher=True)(_bwd_kernel)


# --------------------------------------------------------------------------------- launchers


def _dropout_args(dropout: Dropout | None, placeholder: torch.Tensor):
    """(rng, threshold, keep scale, DROPOUT); without dropout `placeholder` is never read."""
    if dropout is None:
        return placeholder, 0, 1.0, False
    return dropout.rng, dropout.threshold, dropout.scale, True


def _map_layout(export: str, B: int, H: int, N: int):
    """(stride_b, stride_h, stride_i, rows, scale) of contiguous maps / map gradients; scale is
    the map's factor on one head's P (1 / H for head_mean, 1 / N for key_mean)."""
    if export == "full":
        return H * N * N, N * N, N, N, 1.0
    if export == "head_mean":
        return N * N, 0, N, N, 1.0 / H
    if export == "cls":
        return H * N, N, 0, 1, 1.0
    if export == "key_mean":
        return H * N, N, 0, N, 1.0 / N
    raise ValueError(
        f"export must be one of 'none', 'full', 'head_mean', 'cls', 'key_mean'; got {export!r}")


def write_maps(q, k, lse, maps, export: str, scale: float, attn_mask=None) -> None:
    """Writes the maps of `export` ("full", "head_mean", "cls", "key_mean") into `maps`
    (contiguous, that export's shape, any float dtype), P recomputed from q, k, the mask and the
    forward's lse (B, H, N) float32."""
    B, H, N, D = q.shape
    mask, mask_strides, mask_kind = mask_args(attn_mask, q, B, H, N)
    qk_scale = scale * LOG2E
    opts = dot_options(q.dtype)
    if export == "key_mean":
        traceable(_key_mean_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
            q, k, lse, mask, maps, *strides(q), *strides(k), *mask_strides, H, N, qk_scale,
            1.0 / N, MASK=mask_kind, HEAD_DIM=D, **opts)
        return
    smb, smh, smi, rows, _ = _map_layout(export, B, H, N)
    head_mean = export == "head_mean"
    z = B if head_mean else B * H
    traceable(_maps_kernel)[
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), z)
    ](q, k, lse, mask, maps, *strides(q), *strides(k), *mask_strides, smb, smh, smi, H, N,
      rows, qk_scale, 1.0 / H if head_mean else 1.0, HEAD_MEAN=head_mean, MASK=mask_kind,
      HEAD_DIM=D, **opts)


def _teacher_args(teacher: Teacher | None, q, k, lse, backward: bool):
    """(tensors, strides, R, scale, flags) of the teacher's kernel arguments; without a teacher
    (or, in the backward, without a loss gradient) placeholders that are never read.

    tensors: (TQ, TK) and in the backward (SRowLse, TRowLse, DRow, C) too; flags: TEACHER (the
    backward's) with KIND, CLS and TEACHER_DIM."""
    if teacher is None or (backward and teacher.drow is None):
        tensors = (q, k, lse, lse, lse, lse) if backward else (q, k)
        # KIND and CLS are compiled out without a teacher; fixed values keep one variant.
        return tensors, (0,) * 6, 1, 1.0, dict(TEACHER=False, KIND=KIND_KL.value, CLS=False,
                                                TEACHER_DIM=q.shape[-1])
    tensors = (teacher.q, teacher.k)
    if backward:
        tensors += (teacher.student_lse, teacher.teacher_lse, teacher.drow, teacher.c)
    return (tensors, (*strides(teacher.q), *strides(teacher.k)), teacher.rows, teacher.scale,
            dict(TEACHER=True, KIND=teacher.kind, CLS=teacher.cls,
                 TEACHER_DIM=teacher.q.shape[-1]))


def launch_fwd(q, k, v, scale: float, attn_mask, dropout: Dropout | None, out, lse,
               teacher: Teacher | None = None, teacher_lse=None) -> None:
    """Writes out (B,H,N,D) and lse (B,H,N) float32; with a teacher and `teacher_lse` (B,H,N)
    float32 also the teacher's LSE of every row (the match loss, rows "all")."""
    B, H, N, D = q.shape
    mask, mask_strides, mask_kind = mask_args(attn_mask, q, B, H, N)
    rng, threshold, drop_scale, has_dropout = _dropout_args(dropout, q)
    (tq, tk), t_strides, _, t_scale, t_flags = _teacher_args(teacher, q, k, lse, False)
    traceable(_fwd_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, tq, tk, mask, rng, out, lse, lse if teacher_lse is None else teacher_lse,
        *strides(q), *strides(k), *strides(v), *t_strides, *mask_strides,
        H, N, scale * LOG2E, t_scale * LOG2E, threshold, drop_scale, MASK=mask_kind,
        DROPOUT=has_dropout, TEACHER_LSE=teacher_lse is not None, HEAD_DIM=D,
        TEACHER_DIM=t_flags["TEACHER_DIM"], **dot_options(q.dtype))


def attention_fwd(q, k, v, scale: float, export: str, attn_mask=None,
                  dropout: Dropout | None = None):
    """out (B,H,N,D) in q's dtype, lse (B,H,N) float32, maps in q's dtype (shape by export).

    q, k, v: (B, H, N, D) CUDA tensors (CPU under TRITON_INTERPRET=1) with stride 1 on D.
    attn_mask: None, bool or a float bias of q's dtype, broadcastable to (B, H, N, N), any
    strides. dropout: the stream of triton/dropout.py, or None.
    Runs under torch.compile too: every launch goes through wrap_triton (tiles.traceable).
    """
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    maps = torch.empty(maps_shape(export, B, H, N), dtype=q.dtype, device=q.device)
    launch_fwd(q, k, v, scale, attn_mask, dropout, out, lse)
    if export != "none":
        write_maps(q, k, lse, maps, export, scale, attn_mask)
    return out, lse, maps


def launch_bwd(dout, q, k, v, out, lse, dlse, scale: float, attn_mask=None,
               dropout: Dropout | None = None, dmaps=None, export: str = "none", dmask=None,
               teacher: Teacher | None = None):
    """dq, dk, dv (B,H,N,D) in q's dtype from the gradients of out, lse and maps (each
    optional, None when absent), and with `dmask` (B,H,N,N) dL/d(logits) written into it.
    With a teacher whose drow is given, the match loss's gradient joins dS (teacher.py).
    Arguments as attention_bwd's."""
    B, H, N, D = q.shape
    dev = q.device
    delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    dq, dk, dv = (torch.empty((B, H, N, D), dtype=q.dtype, device=dev) for _ in range(3))
    has_do, has_dlse, has_g = dout is not None, dlse is not None, dmaps is not None
    # Absent gradients and outputs are never read or written (their flag is off); any tensor
    # holds their place.
    dout = dout if has_do else out
    dlse = dlse if has_dlse else lse
    if has_g:
        sgb, sgh, sgi, g_rows, g_scale = _map_layout(export, B, H, N)
    else:
        dmaps, sgb, sgh, sgi, g_rows, g_scale = lse, 0, 0, 0, 0, 1.0
    mask, mask_strides, mask_kind = mask_args(attn_mask, q, B, H, N)
    rng, threshold, drop_scale, has_dropout = _dropout_args(dropout, lse)
    t_tensors, t_strides, R, t_scale, t_flags = _teacher_args(teacher, q, k, lse, True)
    qk_scale = scale * LOG2E
    opts = dot_options(q.dtype)
    traceable(_delta_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, out, dout, lse, dlse, dmaps, mask, delta, *strides(q), *strides(k), sgb, sgh, sgi,
        *mask_strides, H, N, g_rows, qk_scale, g_scale, HAS_DO=has_do, HAS_DLSE=has_dlse,
        HAS_G=has_g, MASK=mask_kind, HEAD_DIM=D, **opts)
    tq, tk, srow_lse, trow_lse, drow, c = t_tensors
    args = (q, k, v, tq, tk, dout, lse, delta, dmaps, srow_lse, trow_lse, drow, c, mask, rng,
            dq, dk, dv, lse if dmask is None else dmask,
            *strides(q), *strides(k), *strides(v), *t_strides, sgb, sgh, sgi, *mask_strides,
            H, N, R, g_rows, qk_scale, scale, t_scale, g_scale, threshold, drop_scale)
    flags = dict(HAS_DO=has_do, HAS_G=has_g, MASK=mask_kind, DROPOUT=has_dropout,
                 MASK_GRAD=dmask is not None, HEAD_DIM=D, **t_flags, **opts)
    traceable(_dkdv_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        *args, DQ_PASS=False, **flags)
    traceable(_dq_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        *args, DQ_PASS=True, **flags)
    return dq, dk, dv


def attention_bwd(dout, q, k, v, out, lse, dlse, dmaps, scale: float, export: str,
                  attn_mask=None, dropout: Dropout | None = None, mask_grad: bool = False):
    """dq, dk, dv (B,H,N,D) in q's dtype from the gradients of out, lse and maps (each optional),
    and dmask: dL/d(logits) (B,H,N,N) in the mask's dtype when mask_grad (a float mask), else
    an empty (0,) tensor.

    dout, out: contiguous (B,H,N,D); lse, dlse: contiguous (B,H,N) float32; dmaps: contiguous in
    the export's shape. q, k, v, attn_mask and dropout as in attention_fwd.
    """
    B, H, N, _ = q.shape
    mask_grad = mask_grad and attn_mask is not None
    dmask_dtype = q.dtype if attn_mask is None else attn_mask.dtype
    dmask = torch.empty((B, H, N, N) if mask_grad else (0,), dtype=dmask_dtype, device=q.device)
    dq, dk, dv = launch_bwd(dout, q, k, v, out, lse, dlse, scale, attn_mask, dropout, dmaps,
                            export, dmask if mask_grad else None)
    return dq, dk, dv, dmask
