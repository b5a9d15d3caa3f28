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

Kernels (each launched by the function of the same stem below):
  _fwd_kernel       one query block of one head: online softmax over key blocks -> out, lse.
  _maps_kernel      one (query block, key block) tile of the maps, P recomputed from the LSE; for
                    "head_mean" one program loops over the heads, so the mean needs no atomics.
  _key_mean_kernel  one key block of one head, looping over the query blocks: column means.
  _delta_kernel     backward pre-pass, one query block:
                    delta = rowsum(dO * O) + rowsum(P * G) - dlse
                    (G: gradient arriving through the maps, scaled to one head / one query).
  _dkdv_kernel      one key block, looping over query blocks: dK, dV.
  _dq_kernel        one query block, looping over key blocks: dQ, and the mask's gradient dS
                    tile by tile (each tile written by the one program that owns it).
dK/dV and dQ are separate programs, each the only writer of its block: no atomics, so every run
sums in the same order and reruns are bitwise equal. P is recomputed from the LSE, never stored.

Tile sizes (autotuned on the GPU over the short lists below; the interpreter uses one 64 x 64
tile, as autotuning there is pointless and bigger tiles run faster):
  * Rows and columns of 32, 64 or 128: tl.dot needs >= 16 on every side for 16-bit inputs, and
    Hopper's wgmma works on 64-row warpgroup tiles, so 64/128-row tiles are the main candidates;
    32 (and 16 in the backward) serve short sequences (N = 17, 65) and fp32 at large D.
  * Forward: 128 x 64, 4 warps, 3 stages is FlashAttention-2's choice for D <= 64 on Ampere and
    Hopper (three stages of 64 x D K and V tiles in 16 bits fit Ampere's 164 KiB of shared
    memory); at D = 80 and 128 that config spills on sm_90, so 8-warp variants are offered.
  * dK/dV: a program owns 32..128 keys (two fp32 accumulators of BLOCK_N x D in registers) and
    steps through 16..64 queries; dQ is the transpose. At D = 128 only 8-warp or 32-key tiles
    stay clear of spills.
  * fp32 inputs use 3xTF32 dots: 4-byte tiles double the shared memory and the split operands
    the registers, so at D >= 80 only the smallest tiles fit without spilling (32 x 32 with 8
    warps forward, 16 x 32 backward); fp32 at D = 128 on Ampere still spills a little.
  * Tiles larger than the sequence are pruned (N = 17 needs no 128-row tile); configs that do
    not fit a GPU's shared memory fail to compile and the autotuner drops them.
  Evidence: each config was compiled for sm_90a and sm_80 (Triton 3.8, ptxas -v) on a machine
  without a GPU; the lists keep those that fit shared memory without spilling for some dtype
  and D. Their speed has not been measured yet.
  Masks and dropout add registers: a mask tile is read through a (BLOCK_M, BLOCK_N) tile of
  pointers, and dropout runs one Philox4x32-10 per entry. Compiled for sm_90a (ptxas -v, fp16
  and fp32, D 64 and 128), the 64- and 128-row tiles then spill (up to ~9 KB per thread in the
  forward with dropout) while 64 x 32, 32 x 32 and 16 x 32 stay spill-free for fp16/bf16 (fp32
  at D = 128 spills a little in every config, as it does without masks); the autotuner picks
  among them. The unmasked kernels compile to the same register use as before.
Head dims that are not powers of two (48, 80) are padded to the next power of two (D_PAD) and
masked; every load is masked on rows, columns and head dim, so any N from 1 up works.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .dropout import Dropout, dropout_keep

# Set before this module is imported (see BUILD-NOTES.md): @triton.jit reads it at decoration.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634  # the launchers fold it into the scale: exp(x) = exp2(x * LOG2E)
# The same constants for the kernels: a @triton.jit function reads globals only as constexprs.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
MAX_GRID_Z = 65535  # CUDA limit of grid axes 1 and 2, where the heads (or query blocks) go

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel; see the module docstring.
_FWD_TILES = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3),
              (32, 32, 4, 2), (32, 32, 8, 2))
_MAPS_TILES = ((64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 32, 8, 2), (32, 32, 4, 2))
_DELTA_TILES = ((64, 64, 4, 3), (128, 64, 8, 3), (32, 32, 4, 2))
_DKDV_TILES = ((32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (32, 64, 8, 2), (32, 32, 8, 2),
               (16, 32, 4, 2))
_DQ_TILES = ((128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (32, 32, 8, 2),
             (16, 32, 4, 2))
# The interpreter runs each program as numpy on the CPU: fewer, bigger tiles are much faster
# (BUILD-NOTES: 16 x 16 tiles take 5-10x the time of 64 x 64), and autotuning there is pointless.
_INTERPRET_TILE = (64, 64, 4, 1)


def _configs(tiles):
    if INTERPRET:
        tiles = (_INTERPRET_TILE,)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


def _prune_to_sequence(configs, named_args, **kwargs):
    """Drops tiles much larger than the sequence (N = 17 needs no 128-row tile); keeps >= 1."""
    cap = max(32, triton.next_power_of_2(named_args["N"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
    if kept:
        return kept
    return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_TUNING_KEY = ["N", "HEAD_DIM", "HAS_DO", "HAS_DLSE", "HAS_G", "HEAD_MEAN", "MASK", "DROPOUT",
               "MASK_GRAD"]


def _head_dim_pad(args):
    return max(16, triton.next_power_of_2(args["HEAD_DIM"]))


def _tuned(tiles, key=tuple(_TUNING_KEY), extra_heuristics=None):
    """autotune (block sizes) over heuristics (padded head dim, plus `extra_heuristics` such as
    the match kernels' teacher head dim): the heuristics run after a config is picked, the
    order torch.compile's kernel wrapper understands."""

    def wrap(kernel):
        heur = triton.heuristics({
            "D_PAD": _head_dim_pad,
            "EVEN_D": lambda args: args["HEAD_DIM"] == _head_dim_pad(args),
            **(extra_heuristics or {}),
        })(kernel)
        # Keys a kernel does not have are ignored; the tensors' dtypes are added by Triton.
        return triton.autotune(configs=_configs(tiles), key=list(key),
                               prune_configs_by={"early_config_prune": _prune_to_sequence})(heur)

    return wrap


# ----------------------------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with an fp32 result. UPCAST (interpreter + bf16 only): the interpreter multiplies
    bf16 bit patterns as integers, so the operands go to fp32 first."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _round_to_bf16(x):
    """fp32 x rounded to the nearest bf16 (ties to even), kept in fp32. For the interpreter only:
    its fp32 -> bf16 cast truncates, which doubles the rounding error of every bf16 result."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # -65536 = 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, like, UPCAST: tl.constexpr):
    """fp32 tile x (P or dS) as an operand of a GEMM with `like`: in like's dtype, so 16-bit
    inputs keep the tensor-core GEMM in 16 bits (FlashAttention-2); rounded but fp32 under
    UPCAST (see _round_to_bf16)."""
    if UPCAST:
        return _round_to_bf16(x)
    else:
        return x.to(like.dtype)


@triton.jit
def _load_tile(base, rows, stride_n, n_rows, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """(len(rows), D_PAD) tile of a (n_rows, HEAD_DIM) matrix; rows and padding read as 0."""
    ptrs = (base + rows.to(tl.int64)[:, None] * stride_n) + offs_d[None, :]
    if EVEN_D:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :],
                       other=0.0)
    return tile


@triton.jit
def _store_tile(base, rows, n_rows, offs_d, value, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                UPCAST: tl.constexpr):
    """Stores an fp32 (len(rows), D_PAD) tile into a contiguous (n_rows, HEAD_DIM) matrix."""
    ptrs = (base + rows.to(tl.int64)[:, None] * HEAD_DIM) + offs_d[None, :]
    if UPCAST:
        value = _round_to_bf16(value)
    value = value.to(base.dtype.element_ty)
    if EVEN_D:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _apply_mask(s, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK: tl.constexpr,
                LOG2_UNITS: tl.constexpr):
    """Logit tile s (BLOCK_M, BLOCK_N), fp32, with the mask applied: plus the float bias
    (MASK = 2; times log2(e) when LOG2_UNITS, for logits in log2 units), -inf where the bool
    mask is False (MASK = 1); -inf on keys >= N.

    mask_ptr: the mask at (b, h, 0, 0) of a (B, H, N, N) broadcast view (bool read as uint8);
    stride_ai, stride_aj: its query and key strides (0 where broadcast)."""
    valid = (cols < N)[None, :]
    if MASK != 0:
        inside = (rows < N)[:, None] & valid
        ptrs = mask_ptr + (rows.to(tl.int64)[:, None] * stride_ai
                           + cols.to(tl.int64)[None, :] * stride_aj)
        if MASK == 1:
            valid = valid & (tl.load(ptrs, mask=inside, other=0) != 0)
        elif LOG2_UNITS:
            s += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32) * _LOG2E
        else:
            s += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _logits(q, k, rows, cols, N, qk_scale, mask_ptr, stride_ai, stride_aj, MASK: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Logit tile S (BLOCK_M, BLOCK_N), fp32, log2 units: qk_scale * q k^T with the mask applied
    by _apply_mask (mask_ptr and strides as there)."""
    s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
    return _apply_mask(s, rows, cols, N, mask_ptr, stride_ai, stride_aj, MASK, True)


@triton.jit
def _probs(s, lse2, rows, N):
    """P tile (BLOCK_M, BLOCK_N) fp32 from a logit tile of _logits and the log2-domain LSE;
    0 on rows >= N and wherever s = -inf (masked, keys >= N). A row whose every key is masked
    has lse2 = -inf: 0 stands in, so its P is exp2(-inf) = 0 rather than NaN."""
    lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
    p = tl.exp2(s - lse2[:, None])
    return tl.where((rows < N)[:, None], p, 0.0)


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


# ----------------------------------------------------------------------------------- forward


@_tuned(_FWD_TILES)
@triton.jit
def _fwd_kernel(Q, K, V, Mask, Rng, Out, Lse,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ab, stride_ah, stride_ai, stride_aj,
                H, N, qk_scale, threshold, drop_scale,
                MASK: tl.constexpr, DROPOUT: tl.constexpr,
                HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                EVEN_D: tl.constexpr):
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    if DROPOUT:
        seed = tl.load(Rng)
        offset = tl.load(Rng + 1)

    # Online softmax in fp32: running row max m_i (log2 units), row sum l_i (of P before
    # dropout), unnormalised out acc (of the dropped P).
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
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

    # A row whose every key is masked ends with l_i = 0 and acc = 0: out 0 and LSE -inf.
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    z64 = z.to(tl.int64)
    _store_tile(Out + z64 * N * HEAD_DIM, rows, N, offs_d, acc / l_safe[:, None], HEAD_DIM, EVEN_D,
                UPCAST)
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    tl.store(Lse + (z64 * N + rows), lse, mask=rows < N)


@_tuned(_MAPS_TILES)
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


@_tuned(_MAPS_TILES)
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
    z = tl.program_id(1)
    z64 = z.to(tl.int64)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
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


@_tuned(_DELTA_TILES)
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
    if HAS_G:
        # Only query blocks holding rows < g_rows meet the map (for "cls" just the first one).
        if pid_m * BLOCK_M < g_rows:
            b = (z // H).to(tl.int64)
            h = (z % H).to(tl.int64)
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


@_tuned(_DKDV_TILES)
@triton.jit
def _dkdv_kernel(Q, K, V, DOut, Lse, Delta, G, Mask, Rng, DK, DV,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gi,
                 stride_ab, stride_ah, stride_ai, stride_aj,
                 H, N, g_rows, qk_scale, scale, g_scale, threshold, drop_scale,
                 HAS_DO: tl.constexpr, HAS_G: tl.constexpr, MASK: tl.constexpr,
                 DROPOUT: tl.constexpr,
                 HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                 EVEN_D: tl.constexpr):
    """One key block (BLOCK_N keys) of one head: dV = (P * keep / (1 - p))^T dO and
    dK = scale * dS^T Q, summed over query blocks in order by this program alone."""
    pid_n = tl.program_id(0)
    z = tl.program_id(1)
    z64 = z.to(tl.int64)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    k = _load_tile(K + b * stride_kb + h * stride_kh, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
    v = _load_tile(V + b * stride_vb + h * stride_vh, cols, stride_vn, N, offs_d, HEAD_DIM, EVEN_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOut + z64 * N * HEAD_DIM
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    if DROPOUT:
        seed = tl.load(Rng)
        offset = tl.load(Rng + 1)
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_base, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
        lse2 = tl.load(Lse + (z64 * N + rows), mask=rows < N, other=0.0) * _LOG2E
        delta = tl.load(Delta + (z64 * N + rows), mask=rows < N, other=0.0)
        s = _logits(q, k, rows, cols, N, qk_scale, mask_ptr, stride_ai, stride_aj, MASK, UPCAST,
                    PRECISION)
        p = _probs(s, lse2, rows, N)  # (BLOCK_M, BLOCK_N), before dropout
        dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_DO:
            do = _load_tile(do_base, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
            dp_out = _dot(do, tl.trans(v), UPCAST, PRECISION)
            if DROPOUT:
                # P as it entered P V, and out's share of dL/dP through the same keep-mask.
                keep = dropout_keep(seed, offset, z, rows, cols, N, threshold)
                p_out = tl.where(keep, p * drop_scale, 0.0)
                dp_out = tl.where(keep, dp_out * drop_scale, 0.0)
            else:
                p_out = p
            dv += _dot(tl.trans(_operand(p_out, do, UPCAST)), do, UPCAST, PRECISION)
            dp += dp_out
        if HAS_G:
            dp += _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi,
                            g_scale)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(_operand(ds, q, UPCAST)), q, UPCAST, PRECISION)
    _store_tile(DK + z64 * N * HEAD_DIM, cols, N, offs_d, dk * scale, HEAD_DIM, EVEN_D, UPCAST)
    _store_tile(DV + z64 * N * HEAD_DIM, cols, N, offs_d, dv, HEAD_DIM, EVEN_D, UPCAST)


@_tuned(_DQ_TILES)
@triton.jit
def _dq_kernel(Q, K, V, DOut, Lse, Delta, G, Mask, Rng, DQ, DMask,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gi,
               stride_ab, stride_ah, stride_ai, stride_aj,
               H, N, g_rows, qk_scale, scale, g_scale, threshold, drop_scale,
               HAS_DO: tl.constexpr, HAS_G: tl.constexpr, MASK: tl.constexpr,
               DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
               HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
               EVEN_D: tl.constexpr):
    """One query block of one head: dQ = scale * dS K, summed over key blocks in order; with
    MASK_GRAD also dS itself (dL/d(logits), the float mask's gradient) into DMask (B, H, N, N),
    each tile written once, by this program."""
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    z64 = z.to(tl.int64)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
    lse2 = tl.load(Lse + (z64 * N + rows), mask=rows < N, other=0.0) * _LOG2E
    delta = tl.load(Delta + (z64 * N + rows), mask=rows < N, other=0.0)
    if HAS_DO:
        do = _load_tile(DOut + z64 * N * HEAD_DIM, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_ptr = Mask + b * stride_ab + h * stride_ah
    if DROPOUT:
        seed = tl.load(Rng)
        offset = tl.load(Rng + 1)
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
        s = _logits(q, k, rows, cols, N, qk_scale, mask_ptr, stride_ai, stride_aj, MASK, UPCAST,
                    PRECISION)
        p = _probs(s, lse2, rows, N)  # (BLOCK_M, BLOCK_N), before dropout
        dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_DO:
            v = _load_tile(v_base, cols, stride_vn, N, offs_d, HEAD_DIM, EVEN_D)
            dp_out = _dot(do, tl.trans(v), UPCAST, PRECISION)
            if DROPOUT:
                keep = dropout_keep(seed, offset, z, rows, cols, N, threshold)
                dp_out = tl.where(keep, dp_out * drop_scale, 0.0)
            dp += dp_out
        if HAS_G:
            dp += _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi,
                            g_scale)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:
            ds_out = ds
            if UPCAST:
                ds_out = _round_to_bf16(ds_out)
            inside = (rows < N)[:, None] & (cols < N)[None, :]
            tl.store(DMask + (z64 * N * N + rows.to(tl.int64)[:, None] * N + cols[None, :]),
                     ds_out.to(DMask.dtype.element_ty), mask=inside)
        dq += _dot(_operand(ds, k, UPCAST), k, UPCAST, PRECISION)
    _store_tile(DQ + z64 * N * HEAD_DIM, rows, N, offs_d, dq * scale, HEAD_DIM, EVEN_D, UPCAST)


# --------------------------------------------------------------------------------- launchers


def _dot_options(dtype: torch.dtype) -> dict:
    # fp32 inputs: "tf32x3" (three TF32 tensor-core products, error near fp32's) keeps the maps
    # fp32-exact; plain TF32 would cost ~1e-3, and "ieee" (FMA dots) spills kilobytes of
    # registers per thread at these tile sizes (ptxas, sm_90). fp16/bf16 ignore the argument.
    upcast = INTERPRET and dtype == torch.bfloat16
    return {"UPCAST": upcast, "PRECISION": "tf32x3" if dtype == torch.float32 else "tf32"}


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    # (batch, head, token) strides of a (B, H, N, D) tensor whose last dim has stride 1.
    return t.stride(0), t.stride(1), t.stride(2)


def _mask_args(attn_mask, placeholder: torch.Tensor, B: int, H: int, N: int):
    """(tensor, (stride_b, stride_h, stride_i, stride_j), MASK) of a mask for the kernels.

    The mask is expanded to a (B, H, N, N) view (stride 0 on every broadcast axis; no copy) and
    a bool mask is viewed as uint8 (the same bytes). Without a mask `placeholder` holds the
    pointer's place and is never read (MASK = 0)."""
    if attn_mask is None:
        return placeholder, (0, 0, 0, 0), 0
    view = attn_mask.expand(B, H, N, N)
    if view.dtype == torch.bool:
        return view.view(torch.uint8), tuple(view.stride()), 1
    return view, tuple(view.stride()), 2


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


def maps_shape(export: str, B: int, H: int, N: int) -> tuple[int, ...]:
    return {"full": (B, H, N, N), "head_mean": (B, N, N), "cls": (B, H, N),
            "key_mean": (B, H, N), "none": (0,)}[export]


def write_maps(q, k, lse, maps, export: str, scale: float, attn_mask=None) -> None:
    """Writes the maps of `export` ("full", "head_mean", "cls", "key_mean") into `maps`
    (contiguous, that export's shape, any float dtype), P recomputed from q, k, the mask and the
    forward's lse (B, H, N) float32."""
    B, H, N, D = q.shape
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q, B, H, N)
    qk_scale = scale * LOG2E
    opts = _dot_options(q.dtype)
    if export == "key_mean":
        wrap_triton(_key_mean_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
            q, k, lse, mask, maps, *_strides(q), *_strides(k), *mask_strides, H, N, qk_scale,
            1.0 / N, MASK=mask_kind, HEAD_DIM=D, **opts)
        return
    smb, smh, smi, rows, _ = _map_layout(export, B, H, N)
    head_mean = export == "head_mean"
    z = B if head_mean else B * H
    wrap_triton(_maps_kernel)[
        lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), z)
    ](q, k, lse, mask, maps, *_strides(q), *_strides(k), *mask_strides, smb, smh, smi, H, N,
      rows, qk_scale, 1.0 / H if head_mean else 1.0, HEAD_MEAN=head_mean, MASK=mask_kind,
      HEAD_DIM=D, **opts)


def attention_fwd(q, k, v, scale: float, export: str, attn_mask=None,
                  dropout: Dropout | None = None):
    """out (B,H,N,D) in q's dtype, lse (B,H,N) float32, maps in q's dtype (shape by export).

    q, k, v: (B, H, N, D) CUDA tensors (CPU under TRITON_INTERPRET=1) with stride 1 on D.
    attn_mask: None, bool or a float bias of q's dtype, broadcastable to (B, H, N, N), any
    strides. dropout: the stream of triton/dropout.py, or None.
    Runs under torch.compile too: every launch goes through wrap_triton.
    """
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    maps = torch.empty(maps_shape(export, B, H, N), dtype=q.dtype, device=q.device)
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q, B, H, N)
    rng, threshold, drop_scale, has_dropout = _dropout_args(dropout, q)
    wrap_triton(_fwd_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, mask, rng, out, lse, *_strides(q), *_strides(k), *_strides(v), *mask_strides,
        H, N, scale * LOG2E, threshold, drop_scale, MASK=mask_kind, DROPOUT=has_dropout,
        HEAD_DIM=D, **_dot_options(q.dtype))
    if export != "none":
        write_maps(q, k, lse, maps, export, scale, attn_mask)
    return out, lse, maps


def attention_bwd(dout, q, k, v, out, lse, dlse, dmaps, scale: float, export: str,
                  attn_mask=None, dropout: Dropout | None = None, mask_grad: bool = False):
    """dq, dk, dv (B,H,N,D) in q's dtype from the gradients of out, lse and maps (each optional),
    and dmask: dL/d(logits) (B,H,N,N) in the mask's dtype when mask_grad (a float mask), else
    an empty (0,) tensor.

    dout, out: contiguous (B,H,N,D); lse, dlse: contiguous (B,H,N) float32; dmaps: contiguous in
    the export's shape. q, k, v, attn_mask and dropout as in attention_fwd.
    """
    B, H, N, D = q.shape
    dev = q.device
    delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    dv = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    mask_grad = mask_grad and attn_mask is not None
    dmask_dtype = q.dtype if attn_mask is None else attn_mask.dtype
    dmask = torch.empty((B, H, N, N) if mask_grad else (0,), dtype=dmask_dtype, device=dev)
    has_do, has_dlse, has_g = dout is not None, dlse is not None, dmaps is not None
    # Absent gradients and outputs are never read or written (their flag is off); any tensor
    # holds their place.
    dout = dout if has_do else out
    dlse = dlse if has_dlse else lse
    dmask_arg = dmask if mask_grad else lse
    if has_g:
        sgb, sgh, sgi, g_rows, g_scale = _map_layout(export, B, H, N)
    else:
        dmaps, sgb, sgh, sgi, g_rows, g_scale = lse, 0, 0, 0, 0, 1.0
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q, B, H, N)
    rng, threshold, drop_scale, has_dropout = _dropout_args(dropout, lse)
    qk_scale = scale * LOG2E
    opts = _dot_options(q.dtype)
    wrap_triton(_delta_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, out, dout, lse, dlse, dmaps, mask, delta, *_strides(q), *_strides(k), sgb, sgh, sgi,
        *mask_strides, H, N, g_rows, qk_scale, g_scale, HAS_DO=has_do, HAS_DLSE=has_dlse,
        HAS_G=has_g, MASK=mask_kind, HEAD_DIM=D, **opts)
    common = (*_strides(q), *_strides(k), *_strides(v), sgb, sgh, sgi, *mask_strides, H, N,
              g_rows, qk_scale, scale, g_scale, threshold, drop_scale)
    flags = dict(HAS_DO=has_do, HAS_G=has_g, MASK=mask_kind, DROPOUT=has_dropout, HEAD_DIM=D,
                 **opts)
    wrap_triton(_dkdv_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dmaps, mask, rng, dk, dv, *common, **flags)
    wrap_triton(_dq_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dmaps, mask, rng, dq, dmask_arg, *common, MASK_GRAD=mask_grad,
        **flags)
    return dq, dk, dv, dmask
