// The attention kernels for bf16 inputs on AVX512-BF16: every product takes bf16 operands and
// accumulates in float (score_gemm.h's Bf16PairDot, VDPBF16PS); the softmax, the LSE, the maps
// and the softmax backward run in float on the same row passes as the float kernels
// (attention_kernels.h), so masks, dropout and every export behave the same. What differs is
// the operands (bf16_pack.h):
//   forward   S = scale Q K^T      Q's rows as they are, K^T as column pairs (per head)
//             O = P V              P rounded to bf16 rows, V as column pairs (per head)
//   backward  S, dP = dO V^T       like S
//             dV += P^T dO         P^T and dO as column pairs over the block's query rows
//             dQ = dS K            dS rounded to bf16 rows, K as column pairs (per head)
//             dK += dS^T Q         dS^T and Q as column pairs over the block's query rows
// P and dS are rounded to bf16 once per block, as PyTorch's own bf16 attention rounds them; out,
// dQ, dK and dV are float until stored. Teachers (attention_match) take the float kernels.
#pragma once

#include "attention_amx.h"
#include "attention_kernels.h"
#include "bf16_pack.h"
#include "simd_level.h"

#ifdef FASTATTNREG_AVX512_BF16
namespace fastattnreg::cpu::kernels {

using c10::BFloat16;
using score_gemm_detail::Bf16PairDot;
using score_gemm_detail::gemm_panels;

// Room for bf16 operands, in 32-bit words (two bf16 each).
inline at::Tensor word_scratch(int64_t words) {
  return at::empty({std::max<int64_t>(words, 1)}, at::kInt);
}
inline uint32_t* words_of(at::Tensor& t) {
  return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>());
}

// Forward: the float row buffers of the float kernels, plus the head's K^T and V and the block's
// P as bf16 word operands.
struct Bf16ForwardWorker {
  using Call = AttentionCall<BFloat16, float>;
  ForwardScratch<float> ws;
  at::Tensor buf;
  uint32_t* Kt;   // (ceil(D / 2) x ldk) K^T as column pairs, ldk = key_copy_ld(N)
  uint32_t* Vp;   // (ceil(N / 2) x D) V as column pairs
  uint32_t* Pp;   // (bq x ceil(N / 2)) P rounded to bf16 rows
  uint32_t* pad;  // (max(N, bq) x ceil(D / 2)) rows of odd length D, padded

  Bf16ForwardWorker(const Call& c, const ForwardTaskSplit& split) : ws(c, split) {
    const int64_t N = c.d.N, D = c.d.D, bq = c.block_rows();
    const int64_t dp = bf16::pairs(D), np = bf16::pairs(N);
    buf = word_scratch(dp * key_copy_ld(N) + np * D + bq * np + std::max(N, bq) * dp);
    Kt = words_of(buf);
    Vp = Kt + dp * key_copy_ld(N);
    Pp = Vp + np * D;
    pad = Pp + bq * np;
  }

  void block(const Call& c, const ForwardTensors<BFloat16, float>& t, const QueryBlock& blk) {
    const int64_t N = c.d.N, D = c.d.D, hd = N * D, m = blk.m;
    const int64_t dp = bf16::pairs(D), np = bf16::pairs(N), ldk = key_copy_ld(N);
    const BFloat16* k = t.k + blk.bh * hd;
    bf16::transposed_column_pairs(k, N, D, Kt, ldk, pad);
    const uint32_t* Q = bf16::row_pairs(t.q + blk.bh * hd + blk.i0 * D, m, D, pad);
    gemm_panels<Bf16PairDot, false>(m, N, dp, c.scale, Q, dp, Kt, ldk, ws.S, N, false);
    mask_scores(c, blk, ws.S, N);
    forward_rows(c, blk, TeacherRowPlan{0, false, false}, t.lse, t.maps, ws);
    // O = diag(1/sum) E V with E rounded to bf16.
    bf16::column_pairs(t.v + blk.bh * hd, N, D, D, Vp, D);
    bf16::row_pairs(ws.S, m, N, N, Pp);
    gemm_panels<Bf16PairDot, false>(m, D, np, 1.0f, Pp, np, Vp, D, ws.O, D, false);
    for (int64_t i = 0; i < m; ++i) scale_row(ws.O + i * D, ws.O + i * D, D, ws.inv_sum[i]);
    store_tile(t.out + blk.bh * hd + blk.i0 * D, ws.O, m * D);
  }
};

// Backward: the float row buffers of the float kernels (dK, dV, dQ accumulate there in float),
// plus the head's K^T, V^T and K and the block's operands as bf16 words.
struct Bf16BackwardWorker {
  using Call = AttentionCall<BFloat16, float>;
  const Call& c;
  BackwardScratch<float> ws;
  at::Tensor buf;
  uint32_t* Kt;   // (ceil(D / 2) x ldk) K^T as column pairs
  uint32_t* Vt;   // (ceil(D / 2) x ldk) V^T as column pairs
  uint32_t* Kp;   // (ceil(N / 2) x D) K as column pairs
  uint32_t* Xr;   // (bq x ceil(N / 2)) dS rounded to bf16 rows
  uint32_t* Xc;   // (ceil(bq / 2) x N) P^T, then dS^T, as column pairs over the query rows
  uint32_t* Yc;   // (ceil(bq / 2) x D) dO, then Q, as column pairs over the query rows
  uint32_t* pad;  // (max(N, bq) x ceil(D / 2)) rows of odd length D, padded
  uint32_t* pad2;

  explicit Bf16BackwardWorker(const Call& call) : c(call), ws(call) {
    const int64_t N = c.d.N, D = c.d.D, bq = c.block_rows();
    const int64_t dp = bf16::pairs(D), np = bf16::pairs(N), ldk = key_copy_ld(N);
    const int64_t rows = std::max(N, bq);
    buf = word_scratch(2 * dp * ldk + np * D + bq * np + bf16::pairs(bq) * (N + D) +
                       2 * rows * dp);
    Kt = words_of(buf);
    Vt = Kt + dp * ldk;
    Kp = Vt + dp * ldk;
    Xr = Kp + np * D;
    Xc = Xr + bq * np;
    Yc = Xc + bf16::pairs(bq) * N;
    pad = Yc + bf16::pairs(bq) * D;
    pad2 = pad + rows * dp;
  }

  void head(const BackwardTensors<BFloat16, float>& t, int64_t bh) {
    const int64_t H = c.d.H, N = c.d.N, D = c.d.D, hd = N * D, bq = c.block_rows();
    const int64_t ldk = key_copy_ld(N);
    bf16::transposed_column_pairs(t.k + bh * hd, N, D, Kt, ldk, pad);
    bf16::transposed_column_pairs(t.v + bh * hd, N, D, Vt, ldk, pad);
    bf16::column_pairs(t.k + bh * hd, N, D, D, Kp, D);
    for (int64_t i0 = 0; i0 < N; i0 += bq)
      block(t, QueryBlock{bh / H, bh % H, bh, i0, std::min(bq, N - i0)});
    if (!t.dout) std::fill(ws.dV, ws.dV + hd, 0.0f);
    store_tile(t.dk + bh * hd, ws.dK, hd);
    store_tile(t.dv + bh * hd, ws.dV, hd);
  }

  void block(const BackwardTensors<BFloat16, float>& t, const QueryBlock& blk) {
    const int64_t N = c.d.N, D = c.d.D, hd = N * D, m = blk.m, i0 = blk.i0;
    const int64_t dp = bf16::pairs(D), np = bf16::pairs(N), mp = bf16::pairs(m);
    const int64_t ldk = key_copy_ld(N);
    const bool accumulate = i0 > 0;  // the first block of a head overwrites dK, dV
    const BFloat16* q = t.q + blk.bh * hd + i0 * D;
    const BFloat16* dout = t.dout ? t.dout + blk.bh * hd + i0 * D : nullptr;
    // P holds the scaled, masked logits, dP = dO V^T; each row pass then makes P and dS.
    gemm_panels<Bf16PairDot, false>(m, N, dp, c.scale, bf16::row_pairs(q, m, D, pad), dp, Kt,
                                    ldk, ws.P, N, false);
    if (dout)
      gemm_panels<Bf16PairDot, false>(m, N, dp, 1.0f, bf16::row_pairs(dout, m, D, pad2), dp, Vt,
                                      ldk, ws.dP, N, false);
    mask_scores(c, blk, ws.P, N);
    backward_rows(c, t, blk, ws);
    if (dout) {  // dV += P^T dO
      bf16::column_pairs(ws.P, m, N, N, Xc, N);
      bf16::column_pairs(dout, m, D, D, Yc, D);
      gemm_panels<Bf16PairDot, true>(N, D, mp, 1.0f, Xc, N, Yc, D, ws.dV, D, accumulate);
    }
    // dQ = dS K
    bf16::row_pairs(ws.dP, m, N, N, Xr);
    gemm_panels<Bf16PairDot, false>(m, D, np, 1.0f, Xr, np, Kp, D, ws.dQ, D, false);
    store_tile(t.dq + blk.bh * hd + i0 * D, ws.dQ, m * D);
    // dK += dS^T Q
    bf16::column_pairs(ws.dP, m, N, N, Xc, N);
    bf16::column_pairs(q, m, D, D, Yc, D);
    gemm_panels<Bf16PairDot, true>(N, D, mp, 1.0f, Xc, N, Yc, D, ws.dK, D, accumulate);
  }
};

}  // namespace fastattnreg::cpu::kernels
#endif  // FASTATTNREG_AVX512_BF16

namespace fastattnreg::cpu::kernels {

// Runs the bf16 kernels simd_level.h selects when the inputs are bf16: AMX without a teacher or
// with an every-row teacher (attention_match), AVX512-BF16 without a teacher; returns whether
// they ran (else the caller runs the float kernels).
template <typename scalar_t, typename acc_t>
bool forward_bf16(const ForwardTensors<scalar_t, acc_t>& t,
                  const AttentionCall<scalar_t, acc_t>& c) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // Read on every build, so an unknown FASTATTNREG_SIMD is refused everywhere.
    [[maybe_unused]] const Bf16Kernels kernels = bf16_kernels();
#ifdef FASTATTNREG_AVX512_BF16
    if ((c.teacher == nullptr || !c.teacher->cls_rows) && kernels == Bf16Kernels::Amx) {
      run_forward_tasks<AmxForwardWorker>(t, c);
      return true;
    }
    if (c.teacher == nullptr && kernels == Bf16Kernels::Avx512Bf16) {
      run_forward_tasks<Bf16ForwardWorker>(t, c);
      return true;
    }
#endif
  }
  return false;
}

template <typename scalar_t, typename acc_t>
bool backward_bf16(const BackwardTensors<scalar_t, acc_t>& t,
                   const AttentionCall<scalar_t, acc_t>& c) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // Read on every build, so an unknown FASTATTNREG_SIMD is refused everywhere.
    [[maybe_unused]] const Bf16Kernels kernels = bf16_kernels();
#ifdef FASTATTNREG_AVX512_BF16
    if ((c.teacher == nullptr || !c.teacher->cls_rows) && kernels == Bf16Kernels::Amx) {
      run_backward_tasks<AmxBackwardWorker>(t, c);
      return true;
    }
    if (c.teacher == nullptr && kernels == Bf16Kernels::Avx512Bf16) {
      run_backward_tasks<Bf16BackwardWorker>(t, c);
      return true;
    }
#endif
  }
  return false;
}

}  // namespace fastattnreg::cpu::kernels
