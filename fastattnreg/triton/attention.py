"""Triton attention kernels with exact map export (FlashAttention-2 structure), and launchers.

Shapes: q, k, v, out and their gradients (B, H, N, D); lse and delta (B, H, N) float32;
maps "full" (B, H, N, N), "head_mean" (B, N, N), "cls" (B, H, N) (row 0 of P).
A head of (b, h) is program axis "z" = b * H + h. Scores live in the log2 domain inside the
kernels (exp2 is the fast path); the LSE is stored in natural log.

Kernels (each launched by the function of the same stem below):
  _fwd_kernel    one query block of one head: online softmax over key blocks -> out, lse.
  _maps_kernel   one (query block, key block) tile of the maps, P recomputed from the LSE; for
                 "head_mean" one program loops over the heads, so the mean needs no atomics.
  _delta_kernel  backward pre-pass, one query block: delta = rowsum(dO * O) + rowsum(P * G) - dlse
                 (G: gradient arriving through the maps, scaled to one head).
  _dkdv_kernel   one key block, looping over query blocks: dK, dV.
  _dq_kernel     one query block, looping over key blocks: dQ.
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
Head dims that are not powers of two (48, 80) are padded to the next power of two (D_PAD) and
masked; every load is masked on rows, columns and head dim, so any N from 1 up works.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

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


_TUNING_KEY = ["N", "HEAD_DIM", "HAS_DO", "HAS_DLSE", "HAS_G", "HEAD_MEAN"]


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
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :]
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
    ptrs = base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    if UPCAST:
        value = _round_to_bf16(value)
    value = value.to(base.dtype.element_ty)
    if EVEN_D:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _probs(q, k, lse2, rows, cols, N, qk_scale, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """P tile (BLOCK_M, BLOCK_N) fp32 recomputed from the log2-domain LSE; 0 outside N x N."""
    s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    return tl.where((rows < N)[:, None] & (cols < N)[None, :], p, 0.0)


@triton.jit
def _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi, g_scale):
    """Tile of dL/dP for head (b, h) from the maps' gradient G, fp32; 0 on rows >= g_rows.

    full: G (B, H, N, N); head_mean: G (B, N, N) with stride_gh = 0 and g_scale = 1 / H;
    cls: G (B, H, N) with stride_gi = 0 and g_rows = 1 (only query 0 reaches the map).
    """
    base = G + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
    mask = (rows < g_rows)[:, None] & (cols < N)[None, :]
    g = tl.load(base + rows[:, None] * stride_gi + cols[None, :], mask=mask, other=0.0)
    return g.to(tl.float32) * g_scale


@triton.jit
def _online_softmax_step(q, k, v, cols, N, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr):
    """One key block of the forward's online softmax (log2 domain, fp32): the running row max
    m_i, row sum l_i and unnormalised output acc (BLOCK_M, D_PAD) updated with keys `cols`."""
    s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale
    s = tl.where((cols < N)[None, :], s, float("-inf"))
    # Key 0 is in the first block, so m_new is finite for every row from the first step on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # P goes into the second GEMM in the input dtype (FlashAttention-2); V stays as loaded.
    acc = acc * alpha[:, None] + _dot(_operand(p, v, UPCAST), v, UPCAST, PRECISION)
    return m_new, l_i, acc


# ----------------------------------------------------------------------------------- forward


@_tuned(_FWD_TILES)
@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                H, N, qk_scale,
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

    # Online softmax in fp32: running row max m_i (log2 units), row sum l_i, unnormalised out.
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
        v = _load_tile(v_base, cols, stride_vn, N, offs_d, HEAD_DIM, EVEN_D)
        m_i, l_i, acc = _online_softmax_step(q, k, v, cols, N, m_i, l_i, acc, qk_scale, UPCAST,
                                             PRECISION)

    z64 = z.to(tl.int64)
    _store_tile(Out + z64 * N * HEAD_DIM, rows, N, offs_d, acc / l_i[:, None], HEAD_DIM, EVEN_D,
                UPCAST)
    tl.store(Lse + z64 * N + rows, (m_i + tl.log2(l_i)) * _LN2, mask=rows < N)


@_tuned(_MAPS_TILES)
@triton.jit
def _maps_kernel(Q, K, Lse, Maps,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_mb, stride_mh, stride_mi,
                 H, N, n_rows, qk_scale, head_scale,
                 HEAD_MEAN: tl.constexpr,
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
        lse2 = tl.load(Lse + (b * H + h) * N + rows, mask=rows < n_rows, other=0.0) * _LOG2E
        acc += _probs(q, k, lse2, rows, cols, N, qk_scale, UPCAST, PRECISION)
    ptrs = Maps + b * stride_mb + h0 * stride_mh + rows[:, None] * stride_mi + cols[None, :]
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    acc *= head_scale
    if UPCAST:
        acc = _round_to_bf16(acc)
    tl.store(ptrs, acc.to(Maps.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- backward


@_tuned(_DELTA_TILES)
@triton.jit
def _delta_kernel(Q, K, Out, DOut, Lse, DLse, G, Delta,
                  stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                  stride_gb, stride_gh, stride_gi,
                  H, N, g_rows, qk_scale, g_scale,
                  HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_G: tl.constexpr,
                  HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                  EVEN_D: tl.constexpr):
    """delta_i = dO_i . O_i + sum_j P_ij G_ij - dlse_i, the row term of dS = P * (dP + G - delta)
    (the softmax backward of everything that reached P: out, maps and the LSE)."""
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
        delta -= tl.load(DLse + z64 * N + rows, mask=rows < N, other=0.0)
    if HAS_G:
        # Only query blocks holding rows < g_rows meet the map (for "cls" just the first one).
        if pid_m * BLOCK_M < g_rows:
            b = (z // H).to(tl.int64)
            h = (z % H).to(tl.int64)
            q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, N, offs_d,
                           HEAD_DIM, EVEN_D)
            k_base = K + b * stride_kb + h * stride_kh
            lse2 = tl.load(Lse + z64 * N + rows, mask=rows < N, other=0.0) * _LOG2E
            pg = tl.zeros((BLOCK_M,), tl.float32)
            for start_n in range(0, N, BLOCK_N):
                cols = start_n + tl.arange(0, BLOCK_N)
                k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
                p = _probs(q, k, lse2, rows, cols, N, qk_scale, UPCAST, PRECISION)
                g = _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi,
                              g_scale)
                pg += tl.sum(p * g, 1)
            delta += pg
    tl.store(Delta + z64 * N + rows, delta, mask=rows < N)


@_tuned(_DKDV_TILES)
@triton.jit
def _dkdv_kernel(Q, K, V, DOut, Lse, Delta, G, DK, DV,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gi,
                 H, N, g_rows, qk_scale, scale, g_scale,
                 HAS_DO: tl.constexpr, HAS_G: tl.constexpr,
                 HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                 EVEN_D: tl.constexpr):
    """One key block (BLOCK_N keys) of one head: dV = P^T dO, dK = scale * dS^T Q, summed over
    query blocks in order by this program alone."""
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
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_base, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
        lse2 = tl.load(Lse + z64 * N + rows, mask=rows < N, other=0.0) * _LOG2E
        delta = tl.load(Delta + z64 * N + rows, mask=rows < N, other=0.0)
        p = _probs(q, k, lse2, rows, cols, N, qk_scale, UPCAST, PRECISION)  # (BLOCK_M, BLOCK_N)
        dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_DO:
            do = _load_tile(do_base, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
            dv += _dot(tl.trans(_operand(p, do, UPCAST)), do, UPCAST, PRECISION)
            dp += _dot(do, tl.trans(v), UPCAST, PRECISION)
        if HAS_G:
            dp += _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi,
                            g_scale)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(_operand(ds, q, UPCAST)), q, UPCAST, PRECISION)
    _store_tile(DK + z64 * N * HEAD_DIM, cols, N, offs_d, dk * scale, HEAD_DIM, EVEN_D, UPCAST)
    _store_tile(DV + z64 * N * HEAD_DIM, cols, N, offs_d, dv, HEAD_DIM, EVEN_D, UPCAST)


@_tuned(_DQ_TILES)
@triton.jit
def _dq_kernel(Q, K, V, DOut, Lse, Delta, G, DQ,
               stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn, stride_gb, stride_gh, stride_gi,
               H, N, g_rows, qk_scale, scale, g_scale,
               HAS_DO: tl.constexpr, HAS_G: tl.constexpr,
               HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
               EVEN_D: tl.constexpr):
    """One query block of one head: dQ = scale * dS K, summed over key blocks in order."""
    pid_m = tl.program_id(0)
    z = tl.program_id(1)
    z64 = z.to(tl.int64)
    b = (z // H).to(tl.int64)
    h = (z % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, stride_qn, N, offs_d, HEAD_DIM, EVEN_D)
    lse2 = tl.load(Lse + z64 * N + rows, mask=rows < N, other=0.0) * _LOG2E
    delta = tl.load(Delta + z64 * N + rows, mask=rows < N, other=0.0)
    if HAS_DO:
        do = _load_tile(DOut + z64 * N * HEAD_DIM, rows, HEAD_DIM, N, offs_d, HEAD_DIM, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_kn, N, offs_d, HEAD_DIM, EVEN_D)
        p = _probs(q, k, lse2, rows, cols, N, qk_scale, UPCAST, PRECISION)  # (BLOCK_M, BLOCK_N)
        dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if HAS_DO:
            v = _load_tile(v_base, cols, stride_vn, N, offs_d, HEAD_DIM, EVEN_D)
            dp += _dot(do, tl.trans(v), UPCAST, PRECISION)
        if HAS_G:
            dp += _map_grad(G, b, h, rows, cols, N, g_rows, stride_gb, stride_gh, stride_gi,
                            g_scale)
        ds = p * (dp - delta[:, None])
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


def _map_layout(export: str, B: int, H: int, N: int):
    """(stride_b, stride_h, stride_i, rows, head_scale) of contiguous maps / map gradients."""
    if export == "full":
        return H * N * N, N * N, N, N, 1.0
    if export == "head_mean":
        return N * N, 0, N, N, 1.0 / H
    if export == "cls":
        return H * N, N, 0, 1, 1.0
    raise ValueError(f"export must be one of 'none', 'full', 'head_mean', 'cls'; got {export!r}")


def maps_shape(export: str, B: int, H: int, N: int) -> tuple[int, ...]:
    return {"full": (B, H, N, N), "head_mean": (B, N, N), "cls": (B, H, N), "none": (0,)}[export]


def attention_fwd(q, k, v, scale: float, export: str):
    """out (B,H,N,D) in q's dtype, lse (B,H,N) float32, maps in q's dtype (shape by export).

    q, k, v: (B, H, N, D) CUDA tensors (CPU under TRITON_INTERPRET=1) with stride 1 on D.
    Runs under torch.compile too: every launch goes through wrap_triton.
    """
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    maps = torch.empty(maps_shape(export, B, H, N), dtype=q.dtype, device=q.device)
    qk_scale = scale * LOG2E
    opts = _dot_options(q.dtype)
    wrap_triton(_fwd_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), H, N, qk_scale,
        HEAD_DIM=D, **opts)
    if export != "none":
        smb, smh, smi, rows, _ = _map_layout(export, B, H, N)
        head_mean = export == "head_mean"
        z = B if head_mean else B * H
        wrap_triton(_maps_kernel)[
            lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), z)
        ](q, k, lse, maps, *_strides(q), *_strides(k), smb, smh, smi, H, N, rows, qk_scale,
          1.0 / H if head_mean else 1.0, HEAD_MEAN=head_mean, HEAD_DIM=D, **opts)
    return out, lse, maps


def attention_bwd(dout, q, k, v, out, lse, dlse, dmaps, scale: float, export: str):
    """dq, dk, dv (B,H,N,D) in q's dtype from the gradients of out, lse and maps (each optional).

    dout, out: contiguous (B,H,N,D); lse, dlse: contiguous (B,H,N) float32; dmaps: contiguous in
    the export's shape. q, k, v as in attention_fwd.
    """
    B, H, N, D = q.shape
    dev = q.device
    delta = torch.empty((B, H, N), dtype=torch.float32, device=dev)
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    dv = torch.empty((B, H, N, D), dtype=q.dtype, device=dev)
    has_do, has_dlse, has_g = dout is not None, dlse is not None, dmaps is not None
    # Absent gradients are never read (their HAS_* flag is off); any tensor holds their place.
    dout = dout if has_do else out
    dlse = dlse if has_dlse else lse
    if has_g:
        sgb, sgh, sgi, g_rows, g_scale = _map_layout(export, B, H, N)
    else:
        dmaps, sgb, sgh, sgi, g_rows, g_scale = lse, 0, 0, 0, 0, 1.0
    qk_scale = scale * LOG2E
    opts = _dot_options(q.dtype)
    wrap_triton(_delta_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, out, dout, lse, dlse, dmaps, delta, *_strides(q), *_strides(k), sgb, sgh, sgi,
        H, N, g_rows, qk_scale, g_scale, HAS_DO=has_do, HAS_DLSE=has_dlse, HAS_G=has_g,
        HEAD_DIM=D, **opts)
    common = (*_strides(q), *_strides(k), *_strides(v), sgb, sgh, sgi, H, N, g_rows, qk_scale,
              scale, g_scale)
    wrap_triton(_dkdv_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, dout, lse, delta, dmaps, dk, dv, *common, HAS_DO=has_do, HAS_G=has_g,
        HEAD_DIM=D, **opts)
    wrap_triton(_dq_kernel)[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, dout, lse, delta, dmaps, dq, *common, HAS_DO=has_do, HAS_G=has_g,
        HEAD_DIM=D, **opts)
    return dq, dk, dv
