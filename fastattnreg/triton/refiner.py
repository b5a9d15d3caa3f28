"""Triton kernels of Refiner's attention (refined_attention), and their launchers.

With C = expansion * H expanded channels, per pixel (b, i, j) of the (B, N, N) map image:
    A  = P * keep * drop_scale            (H)   P = softmax(scale q k^T), stored fp32
    X1 = W_e A,          E = ReLU6(a1 X1 + b1)          (C)
    X2 = dw_K(E),        F = ReLU6(a2 X2 + b2)          (C)  E is 0 outside the N x N image
    X3 = W_r F,          G = a3 X3 + b3                 (H)
    X4 = G + A,          A* = a4 X4 + b4                (H)
    out = A* V
Each BatchNorm is a per-channel affine y = a x + b, a = gamma * rstd, b = beta - a * mean, with
the batch statistics (training) or the running ones (eval).

What is stored, and why: P (B, H, N, N) fp32 (the op's `probs` output in training and for an
eval-mode backward, a temporary otherwise), like the C++ kernels. Every pass below needs A at
K^2 shifted pixels (K^4 in the backward's depthwise-transposed pass); reading H floats of P there
is far cheaper than recomputing H dot products of length D from q, k and the LSE each time. No
C-channel (B, C, N, N) tensor is ever written: every C-channel value is recomputed from P in
registers. The backward keeps a few H-channel fp32 maps (dA*, A*, dX4, dX3, Z below), all
O(B * H * N^2), the size of the maps themselves.

Layout of the refinement kernels: a program owns a BLOCK_M x BLOCK_N rectangle of pixels (query
rows x key columns) of one image b, flattened to BLOCK_P = BLOCK_M * BLOCK_N rows of a tile whose
other axis is the channels, padded to powers of two HP = max(16, H), CP = max(16, C) (tl.dot's
minimum). The 1x1 convolutions are then tl.dots, (BLOCK_P x HP) @ (HP x CP) and back; the
depthwise convolution loops over its K^2 offsets, loads A at the shifted pixels (masked: outside
the image E is 0, not ReLU6(b1)), recomputes E there and accumulates w_dw[:, o] * E.

Kernels (each launched by the function of the same stem below):
  P              attention.py's kernels: _fwd_kernel for the LSE, _maps_kernel writes P (fp32).
  _stats_kernel  (training forward) one pixel tile: the chain up to BatchNorm STAGE's input
                 (1: X1, 2: X2, 3: X3, 4: X4) and its per-channel count, sum and sum of squared
                 deviations from the tile mean; the launcher merges the tiles (Chan et al.) in
                 float64 with torch.sum in a fixed order. Four launches, one per BatchNorm.
  _out_kernel    one query block of one image: for each key block the whole chain to A* and
                 out += A* V (a batched (HP, BLOCK_M, BLOCK_N) @ (HP, BLOCK_N, D) tl.dot): eval
                 and training run refinement and A* V in one pass over query tiles; the
                 (K-1)/2 halo rows are the shifted loads of P. With an export it also writes
                 the maps of A* from the same registers: "full" each pixel of each head,
                 "head_mean" the mean over heads, "cls" the pixels of query row 0 (each pixel
                 belongs to one program: no atomics).
  _grad_kernel   (backward) one pixel tile, in reverse BatchNorm order:
                 STAGE 4: sums of dA* and dA* x^4 -> dgamma/dbeta of adapt_bn; writes A*.
                 STAGE 3: dX4 = BN_a backward (written: it is also dA's residual part); sums of
                          dX4 and dX4 x^3 (bn3).
                 STAGE 2: dX3 = bn3 backward (written), dF = W_r^T dX3, dY2 = dF [0 < Y2 < 6];
                          sums for bn2 and the partial dW_r = sum dX3 F^T.
                 STAGE 1: dE = dw_K^T(dX2) with dX2 = bn2 backward at the K^2 shifted pixels
                          (each recomputes X2 there: K^4 expansions per pixel), dY1 = dE [0 < Y1
                          < 6]; sums for bn1, partial dW_dw[c, o] = sum dX2(p - o) E(p), and
                          Z = W_e^T (a1 dY1) (written), sum A dY1^T, sum A x^1^T, sum A.
                 bn1's batch-statistics terms (c0 + c1 x^1, known only after the STAGE-1 sums)
                 are affine in A, so dA = dX4 + Z + W_e^T c0' + (W_e^T diag(c1 rstd1) W_e) A
                 and dW_e follow on the host without another pass. x^ = (x - mean) * rstd.
The BatchNorm backward is dx = a dy + c0 + c1 x^ with c0 = -a sum(dy) / M, c1 = -a sum(dy x^) / M
in training (M = B N^2) and c0 = c1 = 0 in eval; dgamma = sum(dy x^), dbeta = sum(dy).

Left to torch on the stored H-channel maps (fp32): dA* = dout V^T plus the gradient of the
exported maps (added where each map came from: every head, 1/H of it per head, or row 0), so
the stages below carry it to every input; dV = A*^T dout, and
dq, dk from dS = P (dP - rowsum(P dP)), dP = dA keep drop_scale. Every reduction goes through a
(tiles, ...) partial buffer summed by torch in a fixed order: no atomics, reruns are bitwise equal.

Tiles (not autotuned: the partial buffers' sizes must be known before the launch): the forward's
stats and out kernels take 16 x 16 pixels with 8 warps on the GPU (the out kernel's batched
tl.dot needs >= 16 on each side), the backward's grad kernel 8 x 8 pixels with 4 warps (its
STAGE 1 keeps the most (BLOCK_P, CP) fp32 tiles live: at 16 x 16 it spilled 2.3 KB per thread
at CP = 32 and 4.6 KB at CP = 64, with 16 warps more); the interpreter takes 32 x 32 (fewer,
bigger programs run much faster there). The out kernel splits the head dim over grid axis 2 in
blocks of OUT_BLOCK_ELEMS / CP columns, each program recomputing A* for its block: its
(HP, BLOCK_M, D) fp32 accumulator spilled 1.1-2.2 KB per thread at D = 64..128. Evidence:
tests/test_triton_aot.py compiles every kernel and stage for sm_80 and sm_90a without a GPU
(Triton's ptxas) at CP = 32 and 64 (HP = 16, K = 3) and each padded head dim, and fails on more
than 1 KiB of spills per thread (benchmarks/results/triton_aot.csv). Nothing has run on a GPU
yet: neither speed nor the GPU numerics are measured.
The backward's STAGE 1 costs K^2 (K^2 + 1) expansions per pixel (90 at K = 3, 650 at K = 5);
keeping the ReLU6 masks of Y2 as bits and using the kernel's autocorrelation for the x^2 term
would bring it to (2K - 1)^2, not done yet.
dtypes: q, k, v float32, float16 or bfloat16; every refinement value is fp32 (the weights are
converted), out is cast back to q's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..exports import maps_shape
from . import attention as _attention
from .tiles import INTERPRET, MAX_GRID_Z, _round_to_bf16, dot_options, traceable

_N_AFF_ROWS = 6  # rows of the affine table per BatchNorm: a, b, mean, rstd, c0, c1
# Channel dots: 3xTF32 keeps fp32 accuracy on tensor cores (the interpreter computes exactly).
_CHANNEL_PRECISION = tl.constexpr("tf32x3")
# The output kernel's compile-time EXPORT argument: which maps of A* it writes.
EXPORT_NONE = tl.constexpr(0)
EXPORT_FULL = tl.constexpr(1)
EXPORT_HEAD_MEAN = tl.constexpr(2)
EXPORT_CLS = tl.constexpr(3)
# Head-dim columns times padded channels of one _out_kernel program: its (HP, BLOCK_M, D_BLOCK)
# fp32 accumulator sits beside the refinement's (BLOCK_P, CP) tiles; at CP = 64 32 columns spill
# 1.1 KB per thread (fp32, full maps, sm_80), 16 columns 0.9 KB (ptxas).
OUT_BLOCK_ELEMS = 1024


def padded(n: int) -> int:
    """Channel padding: a power of two (tl.arange) and >= 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(n))


def pixel_tile(N: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the refinement kernels: the forward's (stats and out
    kernels) or the backward's (grad kernel); see the module docstring."""
    if INTERPRET:
        side = max(16, min(32, triton.next_power_of_2(N)))
        return side, side, 4
    return (8, 8, 4) if backward else (16, 16, 8)


def out_d_block(D: int, CP: int) -> int:
    """Head-dim columns per _out_kernel program at CP padded channels: the padded head dim up to
    OUT_BLOCK_ELEMS / CP (>= 16, tl.dot's minimum); a larger head dim is split over grid axis 2
    (each program recomputes A* for its columns)."""
    return min(max(16, triton.next_power_of_2(D)), max(16, OUT_BLOCK_ELEMS // CP))


# ----------------------------------------------------------------------------------- helpers


@triton.jit
def _relu6(x):
    return tl.minimum(tl.maximum(x, 0.0), 6.0)


@triton.jit
def _aff(Aff, bn: tl.constexpr, row: tl.constexpr, offs, CP: tl.constexpr):
    """Row `row` (a, b, mean, rstd, c0, c1) of BatchNorm `bn`'s affine table, at channels offs."""
    return tl.load(Aff + (bn * 6 + row) * CP + offs)[None, :]


@triton.jit
def _pixels(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's pixels (rows i, columns j, image b) and its tile index; grid
    (cdiv(N, BLOCK_M), cdiv(N, BLOCK_N), B)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    # int64 before the products: B * (N / BLOCK)^2 tiles can pass 2**31 at large N.
    tile = (b.to(tl.int64) * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
    offs_p = tl.arange(0, BLOCK_M * BLOCK_N)
    i = pid_m * BLOCK_M + offs_p // BLOCK_N
    j = pid_n * BLOCK_N + offs_p % BLOCK_N
    return i, j, b, tile


@triton.jit
def _inside(i, j, N):
    return (i >= 0) & (i < N) & (j >= 0) & (j < N)


@triton.jit
def _hmap(b, H, N, i, j, offs_h):
    """Offsets (BLOCK_P, HP) of pixels (i, j) of image b in a contiguous (B, H, N, N) map, and
    the mask of those inside the image and on a real head. int64: i * N + j passes 2**31 from
    N = 46,341 on."""
    offs = ((b.to(tl.int64) * H + offs_h[None, :]) * N * N
            + (i.to(tl.int64) * N + j)[:, None])
    return offs, _inside(i, j, N)[:, None] & (offs_h < H)[None, :]


@triton.jit
def _expand(P, Keep, WeT, Aff, b, H, N, i, j, offs_h, offs_c, drop_scale,
            CP: tl.constexpr, HAS_KEEP: tl.constexpr):
    """A (BLOCK_P, HP), X1 and E (BLOCK_P, CP) at pixels (i, j); all 0 outside the image."""
    offs, mask = _hmap(b, H, N, i, j, offs_h)
    a = tl.load(P + offs, mask=mask, other=0.0)
    if HAS_KEEP:
        kept = tl.load(Keep + offs, mask=mask, other=0)
        a = tl.where(kept != 0, a * drop_scale, 0.0)
    we = tl.load(WeT + offs_h[:, None] * CP + offs_c[None, :])  # (HP, CP) = W_e^T, zero-padded
    x1 = tl.dot(a, we, input_precision=_CHANNEL_PRECISION)
    e = _relu6(x1 * _aff(Aff, 0, 0, offs_c, CP) + _aff(Aff, 0, 1, offs_c, CP))
    e = tl.where(_inside(i, j, N)[:, None], e, 0.0)
    return a, x1, e


@triton.jit
def _depthwise(P, Keep, WeT, Wd, Aff, b, H, N, i, j, offs_h, offs_c, drop_scale,
               CP: tl.constexpr, KS: tl.constexpr, HAS_KEEP: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """X2 (BLOCK_P, CP) = sum_o w_dw[:, o] E(i + di, j + dj), E recomputed at each offset."""
    x2 = tl.zeros((BLOCK_P, CP), tl.float32)
    for o in range(0, KS * KS):
        di = o // KS - KS // 2
        dj = o % KS - KS // 2
        _, _, e = _expand(P, Keep, WeT, Aff, b, H, N, i + di, j + dj, offs_h, offs_c, drop_scale,
                          CP, HAS_KEEP)
        x2 += e * tl.load(Wd + o * CP + offs_c)[None, :]
    return x2


@triton.jit
def _project(x2, WrT, Aff, offs_h, offs_c, HP: tl.constexpr, CP: tl.constexpr):
    """F = ReLU6(BN2(X2)) (BLOCK_P, CP) and X3 = W_r F (BLOCK_P, HP)."""
    f = _relu6(x2 * _aff(Aff, 1, 0, offs_c, CP) + _aff(Aff, 1, 1, offs_c, CP))
    wr = tl.load(WrT + offs_c[:, None] * HP + offs_h[None, :])  # (CP, HP) = W_r^T, zero-padded
    return f, tl.dot(f, wr, input_precision=_CHANNEL_PRECISION)


@triton.jit
def _residual(x3, a, Aff, offs_h, CP: tl.constexpr):
    """X4 = BN3(X3) + A (BLOCK_P, HP)."""
    return x3 * _aff(Aff, 2, 0, offs_h, CP) + _aff(Aff, 2, 1, offs_h, CP) + a


@triton.jit
def _normalised(x, Aff, bn: tl.constexpr, offs, CP: tl.constexpr):
    """x^ = (x - mean) * rstd of BatchNorm bn."""
    return (x - _aff(Aff, bn, 2, offs, CP)) * _aff(Aff, bn, 3, offs, CP)


@triton.jit
def _bn_backward(dy, xh, Aff, bn: tl.constexpr, offs, CP: tl.constexpr):
    """dx = a dy + c0 + c1 x^ (c0 = c1 = 0 in eval)."""
    return (dy * _aff(Aff, bn, 0, offs, CP) + _aff(Aff, bn, 4, offs, CP)
            + _aff(Aff, bn, 5, offs, CP) * xh)


@triton.jit
def _store_moments(Part, tile, x, inside, offs, CP: tl.constexpr):
    """Part[tile] = (sum, sum of squared deviations from the tile mean, count) per channel over
    the pixels inside the image; (tiles, 3, CP) fp32."""
    n = tl.sum(inside.to(tl.float32), 0)
    s = tl.sum(tl.where(inside[:, None], x, 0.0), 0)
    d = tl.where(inside[:, None], x - (s / n)[None, :], 0.0)
    base = Part + tile * 3 * CP
    tl.store(base + offs, s)
    tl.store(base + CP + offs, tl.sum(d * d, 0))
    tl.store(base + 2 * CP + offs, s * 0.0 + n)


@triton.jit
def _store_grad_sums(Part, tile, dy, xh, offs, CP: tl.constexpr):
    """Part[tile] = (sum dy, sum dy x^) per channel; dy is 0 outside the image. (tiles, 2, CP)."""
    base = Part + tile * 2 * CP
    tl.store(base + offs, tl.sum(dy, 0))
    tl.store(base + CP + offs, tl.sum(dy * xh, 0))


# ---------------------------------------------------------------------------------- kernels


@triton.jit
def _stats_kernel(P, Keep, WeT, Wd, WrT, Aff, Part, H, N, drop_scale,
                  STAGE: tl.constexpr, KS: tl.constexpr, HAS_KEEP: tl.constexpr,
                  HP: tl.constexpr, CP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Moments of BatchNorm STAGE's input over this tile (Aff holds BatchNorms < STAGE)."""
    i, j, b, tile = _pixels(BLOCK_M, BLOCK_N)
    inside = _inside(i, j, N)
    offs_h = tl.arange(0, HP)
    offs_c = tl.arange(0, CP)
    a, x1, _ = _expand(P, Keep, WeT, Aff, b, H, N, i, j, offs_h, offs_c, drop_scale, CP, HAS_KEEP)
    if STAGE == 1:
        _store_moments(Part, tile, x1, inside, offs_c, CP)
    else:
        x2 = _depthwise(P, Keep, WeT, Wd, Aff, b, H, N, i, j, offs_h, offs_c, drop_scale, CP, KS,
                        HAS_KEEP, BLOCK_M * BLOCK_N)
        if STAGE == 2:
            _store_moments(Part, tile, x2, inside, offs_c, CP)
        else:
            _, x3 = _project(x2, WrT, Aff, offs_h, offs_c, HP, CP)
            if STAGE == 3:
                _store_moments(Part, tile, x3, inside, offs_h, CP)
            else:
                _store_moments(Part, tile, _residual(x3, a, Aff, offs_h, CP), inside, offs_h, CP)


@triton.jit
def _store_maps(Maps, refined, b, H, N, i, j, offs_h, EXPORT: tl.constexpr,
                UPCAST: tl.constexpr):
    """The exported maps of A* (BLOCK_P, HP) at pixels (i, j) of image b, in Maps' dtype.
    EXPORT_FULL: (B, H, N, N); EXPORT_HEAD_MEAN: (B, N, N); EXPORT_CLS: (B, H, N), row i = 0
    only."""
    inside = _inside(i, j, N)
    if EXPORT == EXPORT_HEAD_MEAN:
        vals = tl.sum(tl.where((offs_h < H)[None, :], refined, 0.0), 1) / H
        offs = b.to(tl.int64) * N * N + i.to(tl.int64) * N + j
        mask = inside
    else:
        vals = refined
        if EXPORT == EXPORT_FULL:
            offs, mask = _hmap(b, H, N, i, j, offs_h)
        else:
            offs = (b.to(tl.int64) * H + offs_h[None, :]) * N + j[:, None]
            mask = (inside & (i == 0))[:, None] & (offs_h < H)[None, :]
    if UPCAST:
        vals = _round_to_bf16(vals)
    tl.store(Maps + offs, vals.to(Maps.dtype.element_ty), mask=mask)


@triton.jit
def _out_kernel(P, Keep, WeT, Wd, WrT, Aff, V, Out, Maps, stride_vb, stride_vh, stride_vn,
                H, N, drop_scale,
                HEAD_DIM: tl.constexpr, D_BLOCK: tl.constexpr, KS: tl.constexpr,
                HAS_KEEP: tl.constexpr, HP: tl.constexpr, CP: tl.constexpr, UPCAST: tl.constexpr,
                EXPORT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[b, :, rows, cols_d] = A*[b, :, rows, :] V[b, :, :, cols_d] for the D_BLOCK head-dim
    columns cols_d of program_id(2), and (programs of column block 0 only, so each map pixel
    has one writer) the maps of A* by EXPORT (EXPORT_NONE: none; see _store_maps); grid
    (cdiv(N, BLOCK_M), B, cdiv(HEAD_DIM, D_BLOCK))."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    pid_d = tl.program_id(2)
    offs_p = tl.arange(0, BLOCK_M * BLOCK_N)
    offs_h = tl.arange(0, HP)
    offs_c = tl.arange(0, CP)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = pid_d * D_BLOCK + tl.arange(0, D_BLOCK)
    i = pid_m * BLOCK_M + offs_p // BLOCK_N
    v_base = V + b.to(tl.int64) * stride_vb + offs_h[:, None, None].to(tl.int64) * stride_vh
    acc = tl.zeros((HP, BLOCK_M, D_BLOCK), tl.float32)
    for start_n in range(0, N, BLOCK_N):
        j = start_n + offs_p % BLOCK_N
        a, _, _ = _expand(P, Keep, WeT, Aff, b, H, N, i, j, offs_h, offs_c, drop_scale, CP,
                          HAS_KEEP)
        x2 = _depthwise(P, Keep, WeT, Wd, Aff, b, H, N, i, j, offs_h, offs_c, drop_scale, CP, KS,
                        HAS_KEEP, BLOCK_M * BLOCK_N)
        _, x3 = _project(x2, WrT, Aff, offs_h, offs_c, HP, CP)
        x4 = _residual(x3, a, Aff, offs_h, CP)
        refined = x4 * _aff(Aff, 3, 0, offs_h, CP) + _aff(Aff, 3, 1, offs_h, CP)
        refined = tl.where(_inside(i, j, N)[:, None], refined, 0.0)  # (BLOCK_P, HP)
        if EXPORT != EXPORT_NONE:
            if pid_d == 0:
                _store_maps(Maps, refined, b, H, N, i, j, offs_h, EXPORT, UPCAST)
        # Pixel p = r * BLOCK_N + c: (BLOCK_P, HP) -> (HP, BLOCK_M, BLOCK_N), one matrix per head.
        refined = tl.permute(tl.reshape(refined, (BLOCK_M, BLOCK_N, HP)), (2, 0, 1))
        cols = start_n + offs_n
        v_mask = ((offs_h < H)[:, None, None] & (cols < N)[None, :, None]
                  & (offs_d < HEAD_DIM)[None, None, :])
        v = tl.load(v_base + (cols.to(tl.int64)[None, :, None] * stride_vn + offs_d[None, None, :]),
                    mask=v_mask, other=0.0)
        acc += tl.dot(refined, v.to(tl.float32), input_precision=_CHANNEL_PRECISION)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = ((b.to(tl.int64) * H + offs_h[:, None, None]) * N * HEAD_DIM
            + rows[None, :, None] * HEAD_DIM + offs_d[None, None, :])
    mask = ((offs_h < H)[:, None, None] & (rows < N)[None, :, None]
            & (offs_d < HEAD_DIM)[None, None, :])
    if UPCAST:
        acc = _round_to_bf16(acc)
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(P, Keep, WeT, Wd, WrT, Aff, GradIn, GradOut, Part, PartW, H, N, drop_scale,
                 STAGE: tl.constexpr, KS: tl.constexpr, HAS_KEEP: tl.constexpr,
                 HP: tl.constexpr, CP: tl.constexpr, W_ROWS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One backward stage over one pixel tile (see the module docstring). GradIn -> GradOut:
    STAGE 4: dA* -> A*; 3: dA* -> dX4; 2: dX4 -> dX3; 1: dX3 -> Z, all (B, H, N, N) fp32.
    Part (tiles, 2, CP): sum dy, sum dy x^; PartW (tiles, W_ROWS, CP): weight partials."""
    i, j, b, tile = _pixels(BLOCK_M, BLOCK_N)
    inside = _inside(i, j, N)[:, None]
    offs_h = tl.arange(0, HP)
    offs_c = tl.arange(0, CP)
    hoffs, hmask = _hmap(b, H, N, i, j, offs_h)
    a, x1, e = _expand(P, Keep, WeT, Aff, b, H, N, i, j, offs_h, offs_c, drop_scale, CP, HAS_KEEP)
    wr = tl.load(WrT + offs_c[:, None] * HP + offs_h[None, :])  # (CP, HP)
    if STAGE == 1:
        d_e = tl.zeros((BLOCK_M * BLOCK_N, CP), tl.float32)
        for o in range(0, KS * KS):
            ri = i - (o // KS - KS // 2)
            rj = j - (o % KS - KS // 2)
            r_inside = _inside(ri, rj, N)[:, None]
            x2 = _depthwise(P, Keep, WeT, Wd, Aff, b, H, N, ri, rj, offs_h, offs_c, drop_scale,
                            CP, KS, HAS_KEEP, BLOCK_M * BLOCK_N)
            roffs, rmask = _hmap(b, H, N, ri, rj, offs_h)
            dx3 = tl.load(GradIn + roffs, mask=rmask, other=0.0)
            d_f = tl.dot(dx3, tl.trans(wr), input_precision=_CHANNEL_PRECISION)
            y2 = x2 * _aff(Aff, 1, 0, offs_c, CP) + _aff(Aff, 1, 1, offs_c, CP)
            dy2 = tl.where((y2 > 0.0) & (y2 < 6.0), d_f, 0.0)
            dx2 = _bn_backward(dy2, _normalised(x2, Aff, 1, offs_c, CP), Aff, 1, offs_c, CP)
            dx2 = tl.where(r_inside, dx2, 0.0)
            d_e += dx2 * tl.load(Wd + o * CP + offs_c)[None, :]
            # dW_dw[:, o] = sum_p dX2(p - o) E(p); E is 0 outside the image.
            tl.store(PartW + (tile * W_ROWS + o) * CP + offs_c, tl.sum(dx2 * e, 0))
        y1 = x1 * _aff(Aff, 0, 0, offs_c, CP) + _aff(Aff, 0, 1, offs_c, CP)
        dy1 = tl.where(inside & (y1 > 0.0) & (y1 < 6.0), d_e, 0.0)
        xh1 = _normalised(x1, Aff, 0, offs_c, CP)
        _store_grad_sums(Part, tile, dy1, xh1, offs_c, CP)
        we = tl.load(WeT + offs_h[:, None] * CP + offs_c[None, :])  # (HP, CP)
        z = tl.dot(dy1 * _aff(Aff, 0, 0, offs_c, CP), tl.trans(we),
                   input_precision=_CHANNEL_PRECISION)
        tl.store(GradOut + hoffs, z, mask=hmask)
        # a is 0 outside the image, so these sums cover the image only.
        row0 = tile * W_ROWS + KS * KS
        w_offs = offs_h[:, None] * CP + offs_c[None, :]
        a_t = tl.trans(a)
        tl.store(PartW + row0 * CP + w_offs,
                 tl.dot(a_t, dy1, input_precision=_CHANNEL_PRECISION))
        tl.store(PartW + (row0 + HP) * CP + w_offs,
                 tl.dot(a_t, xh1, input_precision=_CHANNEL_PRECISION))
        tl.store(PartW + (row0 + 2 * HP) * CP + offs_h, tl.sum(a, 0))
    else:
        x2 = _depthwise(P, Keep, WeT, Wd, Aff, b, H, N, i, j, offs_h, offs_c, drop_scale, CP, KS,
                        HAS_KEEP, BLOCK_M * BLOCK_N)
        f, x3 = _project(x2, WrT, Aff, offs_h, offs_c, HP, CP)
        g_in = tl.load(GradIn + hoffs, mask=hmask, other=0.0)
        xh3 = _normalised(x3, Aff, 2, offs_h, CP)
        if STAGE == 2:
            dx3 = tl.where(inside, _bn_backward(g_in, xh3, Aff, 2, offs_h, CP), 0.0)
            tl.store(GradOut + hoffs, dx3, mask=hmask)
            d_f = tl.dot(dx3, tl.trans(wr), input_precision=_CHANNEL_PRECISION)
            y2 = x2 * _aff(Aff, 1, 0, offs_c, CP) + _aff(Aff, 1, 1, offs_c, CP)
            dy2 = tl.where((y2 > 0.0) & (y2 < 6.0), d_f, 0.0)
            _store_grad_sums(Part, tile, dy2, _normalised(x2, Aff, 1, offs_c, CP), offs_c, CP)
            w_offs = offs_h[:, None] * CP + offs_c[None, :]
            tl.store(PartW + tile * W_ROWS * CP + w_offs,
                     tl.dot(tl.trans(dx3), f, input_precision=_CHANNEL_PRECISION))
        else:
            x4 = _residual(x3, a, Aff, offs_h, CP)
            xh4 = _normalised(x4, Aff, 3, offs_h, CP)
            if STAGE == 4:
                refined = x4 * _aff(Aff, 3, 0, offs_h, CP) + _aff(Aff, 3, 1, offs_h, CP)
                tl.store(GradOut + hoffs, refined, mask=hmask)
                _store_grad_sums(Part, tile, g_in, xh4, offs_h, CP)
            else:
                dx4 = tl.where(inside, _bn_backward(g_in, xh4, Aff, 3, offs_h, CP), 0.0)
                tl.store(GradOut + hoffs, dx4, mask=hmask)
                _store_grad_sums(Part, tile, dx4, xh3, offs_h, CP)


# --------------------------------------------------------------------------------- launchers


class _Problem:
    """Sizes, padded weights (fp32) and the launch geometry shared by the launchers."""

    def __init__(self, q, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, eps, drop_scale,
                 backward=False):
        self.B, self.H, self.N, self.D = q.shape
        self.C, self.K = w_exp.shape[0], w_dw.shape[-1]
        self.HP, self.CP = padded(self.H), padded(self.C)
        H, C, K, CP, HP = self.H, self.C, self.K, self.CP, self.HP
        f32 = {"dtype": torch.float32, "device": q.device}
        self.we = w_exp.float()                                          # (C, H)
        self.we_t = torch.zeros((HP, CP), **f32)
        self.we_t[:H, :C] = self.we.t()
        self.wd = torch.zeros((K * K, CP), **f32)
        self.wd[:, :C] = w_dw.float().reshape(C, K * K).t()
        self.wr_t = torch.zeros((CP, HP), **f32)
        self.wr_t[:C, :H] = w_pro.float().t()
        self.gamma = bn_weight.float().split(self.sizes)
        self.beta = bn_bias.float().split(self.sizes)
        self.eps = [float(e) for e in eps]
        self.keep = keep
        self.drop_scale = float(drop_scale)
        self.block_m, self.block_n, self.num_warps = pixel_tile(self.N, backward)
        self.grid = (triton.cdiv(self.N, self.block_m), triton.cdiv(self.N, self.block_n), self.B)
        self.tiles = self.grid[0] * self.grid[1] * self.B
        self.count = self.B * self.N * self.N

    @property
    def sizes(self):
        return (self.C, self.C, self.H, self.H)

    def keep_arg(self, probs):
        # A bool tensor is read as bytes; without a mask any tensor holds the (unread) place.
        return probs if self.keep is None else self.keep.view(torch.uint8)

    def common(self, probs, aff):
        return (probs, self.keep_arg(probs), self.we_t, self.wd, self.wr_t, aff)

    def meta(self):
        return {"KS": self.K, "HAS_KEEP": self.keep is not None, "HP": self.HP, "CP": self.CP,
                "BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps}

    def affine_table(self, stats, grads=()):
        """(4, 6, CP) fp32: a, b, mean, rstd, c0, c1 per BatchNorm, zero-padded; BatchNorms
        without statistics yet are all zero. stats: (mean, var) float64 per BatchNorm;
        grads: (c0, c1) float64 per BatchNorm, or None (absent or None: 0)."""
        rows = []
        for n, size in enumerate(self.sizes):
            if n >= len(stats):
                rows.append(self.we.new_zeros((_N_AFF_ROWS, self.CP)))
                continue
            mean, var = stats[n]
            rstd = (var + self.eps[n]).rsqrt()
            a = self.gamma[n].double() * rstd
            b = self.beta[n].double() - a * mean
            c0, c1 = (grads[n] if n < len(grads) and grads[n] is not None
                      else (torch.zeros_like(a), torch.zeros_like(a)))
            table = torch.stack([a, b, mean, rstd, c0, c1]).float()
            rows.append(torch.nn.functional.pad(table, (0, self.CP - size)))
        return torch.stack(rows).contiguous()


def probs_fwd(q, k, v, scale: float) -> torch.Tensor:
    """P = softmax(scale q k^T) (B, H, N, N) float32: the attention kernels' LSE pass, then their
    map kernel writing fp32 (its `out` is not used; A* V is the refined output)."""
    B, H, N, _ = q.shape
    _, lse, _ = _attention.attention_fwd(q, k, v, scale, "none")
    probs = torch.empty((B, H, N, N), dtype=torch.float32, device=q.device)
    _attention.write_maps(q, k, lse, probs, "full", scale)
    return probs


def _merge_moments(part: torch.Tensor, width: int):
    """Batch mean and biased variance (float64) from (tiles, 3, CP) partial moments."""
    part = part[:, :, :width].double()
    s, m2, n = part[:, 0], part[:, 1], part[:, 2]
    total = n.sum(0)
    mean = s.sum(0) / total
    var = (m2 + n * (s / n - mean) ** 2).sum(0) / total
    return mean, var


def _batch_stats(pb: _Problem, probs):
    """The four BatchNorms' batch (mean, biased var), float64, one stats pass each."""
    stats = []
    for stage, width in zip((1, 2, 3, 4), pb.sizes):
        part = torch.empty((pb.tiles, 3, pb.CP), dtype=torch.float32, device=probs.device)
        traceable(_stats_kernel)[pb.grid](
            *pb.common(probs, pb.affine_table(stats)), part, pb.H, pb.N, pb.drop_scale,
            STAGE=stage, **pb.meta())
        stats.append(_merge_moments(part, width))
    return stats


# The ops' export strings as _out_kernel's EXPORT.
_EXPORT_CODES = {"none": EXPORT_NONE.value, "full": EXPORT_FULL.value,
                 "head_mean": EXPORT_HEAD_MEAN.value, "cls": EXPORT_CLS.value}


def refined_fwd(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, running_mean, running_var,
                keep, eps, scale, drop_scale, training, save_probs, export="none"):
    """(out, probs, mean, var, maps) as fastattnreg::refined_attention_fwd (see
    ops/refiner_autograd.py), less its y: these kernels keep no Y (ops/triton_refiner.py returns
    an empty one). maps: A* by `export` ("none": (0,), nothing computed), q's dtype.

    q, k, v (B, H, N, D) with stride 1 on D; w_exp (C, H), w_dw (C, K, K), w_pro (H, C);
    bn_weight, bn_bias, running_mean, running_var (2C + 2H,); keep (B, H, N, N) bool or None
    (only passed in training). probs (B, H, N, N) fp32 when training or save_probs, else (0,);
    mean/var fp32: the batch mean and biased variance in training, the running ones in eval.
    """
    pb = _Problem(q, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, eps, drop_scale)
    probs = probs_fwd(q, k, v, scale)
    if training:
        stats = _batch_stats(pb, probs)
    else:
        stats = list(zip(running_mean.double().split(pb.sizes),
                         running_var.double().split(pb.sizes)))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    maps = torch.empty(maps_shape(export, pb.B, pb.H, pb.N), dtype=q.dtype, device=q.device)
    d_block = out_d_block(pb.D, pb.CP)
    meta = pb.meta()
    traceable(_out_kernel)[(pb.grid[0], pb.B, triton.cdiv(pb.D, d_block))](
        *pb.common(probs, pb.affine_table(stats)), v, out, maps if export != "none" else out,
        v.stride(0), v.stride(1), v.stride(2), pb.H, pb.N, pb.drop_scale, HEAD_DIM=pb.D,
        D_BLOCK=d_block, UPCAST=dot_options(q.dtype)["UPCAST"], EXPORT=_EXPORT_CODES[export],
        **meta)
    mean = torch.cat([m for m, _ in stats]).float()
    var = torch.cat([s for _, s in stats]).float()
    if not (training or save_probs):
        probs = probs.new_empty((0,))
    return out, probs, mean, var, maps


def refined_bwd(dout, q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, probs, mean, var, keep,
                eps, scale, drop_scale, training, dmaps=None, export="none"):
    """(dq, dk, dv, dw_exp, dw_dw, dw_pro, dbn_weight, dbn_bias) as
    fastattnreg::refined_attention_bwd. probs: the forward's P, or (0,) after an eval-mode
    forward that did not keep it (recomputed here). mean/var: what the forward returned.
    dmaps: the gradient of the maps exported with `export`, or None."""
    pb = _Problem(q, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, eps, drop_scale,
                  backward=True)
    B, H, N, C, K, HP, CP = pb.B, pb.H, pb.N, pb.C, pb.K, pb.HP, pb.CP
    if probs.numel() == 0:
        probs = probs_fwd(q, k, v, scale)
    stats = list(zip(mean.double().split(pb.sizes), var.double().split(pb.sizes)))
    f32 = {"dtype": torch.float32, "device": q.device}
    dout32 = dout.float()
    d_refined = torch.matmul(dout32, v.float().transpose(-2, -1))  # dA* (B, H, N, N)
    if dmaps is not None:  # the exported maps' gradient, back where each map came from
        if export == "full":
            d_refined += dmaps.float()
        elif export == "head_mean":
            d_refined += (dmaps.float() / H)[:, None]
        else:  # "cls": row 0 of each head
            d_refined[:, :, 0, :] += dmaps.float()
    grads = [None] * 4  # (c0, c1) per BatchNorm, filled in reverse order
    sums = [None] * 4   # (sum dy, sum dy x^) per BatchNorm

    def stage(n, grad_in, w_rows=1):
        """Runs backward stage n (1..4); returns its (B, H, N, N) output and weight partials."""
        grad_out = torch.empty((B, H, N, N), **f32)
        part = torch.empty((pb.tiles, 2, CP), **f32)
        part_w = torch.empty((pb.tiles, w_rows, CP), **f32)
        table = pb.affine_table(stats, grads)
        traceable(_grad_kernel)[pb.grid](
            *pb.common(probs, table), grad_in, grad_out, part, part_w, H, N, pb.drop_scale,
            STAGE=n, W_ROWS=w_rows, **pb.meta())
        width = pb.sizes[n - 1]
        s_dy = part[:, 0, :width].double().sum(0)
        s_dyx = part[:, 1, :width].double().sum(0)
        sums[n - 1] = (s_dy, s_dyx)
        a = pb.gamma[n - 1].double() * (stats[n - 1][1] + pb.eps[n - 1]).rsqrt()
        if training:
            grads[n - 1] = (-a * s_dy / pb.count, -a * s_dyx / pb.count)
        else:
            grads[n - 1] = (torch.zeros_like(a), torch.zeros_like(a))
        return grad_out, part_w

    refined, _ = stage(4, d_refined)
    dx4, _ = stage(3, d_refined)
    dx3, part_w = stage(2, dx4, w_rows=HP)
    dw_pro = part_w.double().sum(0)[:H, :C]
    z, part_w = stage(1, dx3, w_rows=K * K + 2 * HP + 1)
    part_w = part_w.double().sum(0)
    dw_dw = part_w[:K * K, :C].t().reshape(C, K, K)
    a_dy1 = part_w[K * K:K * K + HP][:H, :C].t()              # sum dY1 A^T (C, H)
    a_xh1 = part_w[K * K + HP:K * K + 2 * HP][:H, :C].t()     # sum x^1 A^T (C, H)
    a_sum = part_w[K * K + 2 * HP, :H]                        # sum A (H,)

    # bn1's backward and W_e^T: dA = dX4 + W_e^T dX1, dX1 = a1 dY1 + c0 + c1 x^1 (Z = W_e^T a1 dY1).
    we = pb.we.double()
    mean1, var1 = stats[0]
    rstd1 = (var1 + pb.eps[0]).rsqrt()
    a1 = pb.gamma[0].double() * rstd1
    c0, c1 = grads[0]
    dw_exp = a1[:, None] * a_dy1 + c0[:, None] * a_sum[None, :] + c1[:, None] * a_xh1
    attn = probs if keep is None else probs * keep * pb.drop_scale
    d_attn = dx4 + z
    if training:
        shift = we.t() @ (c0 - c1 * rstd1 * mean1)                  # (H,)
        mix = we.t() @ ((c1 * rstd1)[:, None] * we)                 # (H, H)
        d_attn = (d_attn + shift.float()[None, :, None, None]
                  + torch.einsum("hg,bgij->bhij", mix.float(), attn))
    d_probs = d_attn if keep is None else d_attn * keep * pb.drop_scale
    d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
    dq = (torch.matmul(d_scores, k.float()) * scale).to(q.dtype)
    dk = (torch.matmul(d_scores.transpose(-2, -1), q.float()) * scale).to(q.dtype)
    dv = torch.matmul(refined.transpose(-2, -1), dout32).to(q.dtype)
    dgamma = torch.cat([s[1] for s in sums])
    dbeta = torch.cat([s[0] for s in sums])
    weight_grads = (dw_exp, dw_dw, dw_pro, dgamma, dbeta)  # some are transposed views
    return (dq, dk, dv, *(g.to(q.dtype, memory_format=torch.contiguous_format)
                          for g in weight_grads))


def check_grid(B: int, H: int) -> None:
    if B * H > MAX_GRID_Z or B > MAX_GRID_Z:
        raise ValueError(f"batch x heads must be at most {MAX_GRID_Z} for the Triton kernels (a "
                         f"CUDA grid axis); got B={B} x H={H} = {B * H}")
