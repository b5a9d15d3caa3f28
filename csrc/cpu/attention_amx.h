// The attention kernels for bf16 inputs on AMX tiles: every product goes to oneDNN's batch-reduce
// GEMM micro-kernel (amx_products.h), bf16 operands, float accumulation. The softmax, the LSE,
// the maps, dropout and the softmax backward run in float on the same row passes as the float
// kernels (attention_kernels.h), so masks, dropout and every export behave the same. The
// products write the score tiles in place, with a row stride of N padded to 16 (the scratch's
// ld). brgemm has no alpha: a power-of-two scale (D = 16, 64, 256) is folded exactly into Q's
// bf16 rows, any other scales S in place:
//   forward   S = scale Q K^T      A: Q's rows            B: K^T as column pairs (per head)
//             O = P V              A: P rounded to bf16   B: V as column pairs (per head)
//   backward  S, dP = dO V^T       like S
//             dV^T += dO^T P       A: dO^T rows (D x m)   B: P as column pairs over query rows
//             dQ = dS K            A: dS rounded to bf16  B: K as column pairs (per head)
//             dK^T += Q^T dS       A: Q^T rows (D x m)    B: dS as column pairs over query rows
// dK and dV accumulate transposed (D x N, float) over the head's query blocks, so only the small
// m x D operands are transposed; each head's sums are transposed once when stored. P and dS are
// rounded to bf16 once per block, as PyTorch's own bf16 attention rounds them.
// attention_match's teacher logits (every row matched) come from the same products
// (TeacherOperands); a CLS-row teacher takes the float kernels, whose one-row products it needs.
#pragma once

#include <ATen/native/CPUBlas.h>

#include <algorithm>

#include "amx_products.h"
#include "attention_kernels.h"
#include "bf16_pack.h"
#include "simd_level.h"

#ifdef FASTATTNREG_AVX512_BF16
namespace fastattnreg::cpu::kernels {

// The teacher's operands (attention_match): its head's keys as column pairs and a block's query
// rows, and the padded product its logits come out of.
struct TeacherOperands {
  at::Tensor buf, out_buf;
  uint32_t* Kt = nullptr;   // (kwords(Dt) x n16) the teacher's K^T as column pairs
  uint32_t* pad = nullptr;  // (max(N, bq) x kwords(Dt)) its query rows (or keys, odd Dt)
  float* C = nullptr;       // (bq x n16) its product

  TeacherOperands() = default;
  TeacherOperands(int64_t N, int64_t Dt, int64_t bq) {
    const int64_t dk = amx::kwords(Dt), n16 = amx::pad16(N);
    buf = amx::zeroed_words(dk * n16 + std::max(N, bq) * dk);
    Kt = amx::words_of(buf);
    pad = Kt + dk * n16;
    out_buf = at::empty({std::max<int64_t>(bq * n16, 1)}, at::kFloat);
    C = out_buf.data_ptr<float>();
  }

  // St (mr x N) = scale_t TQ TK^T for the block's mr matched rows, masked: the same products,
  // scale and rounding as the student's scores, so a teacher that copies the student gives the
  // student's logits bit for bit.
  void logits(const Teacher<c10::BFloat16, float>& t, const MaskView<c10::BFloat16>& mask,
              const QueryBlock& blk, int64_t N, int64_t mr, float* St) {
    const int64_t Dt = t.Dt, hdt = N * Dt, n16 = amx::pad16(N);
    bf16::transposed_column_pairs(t.k + blk.bh * hdt, N, Dt, Kt, n16, pad);
    const uint32_t* TQ = amx::query_rows(t.q + blk.bh * hdt + blk.i0 * Dt, mr, Dt, t.scale, pad);
    amx::product(mr, n16, amx::kwords(Dt), TQ, Kt, n16, C, n16, false);
    const float scale = amx::scale_folds(t.scale) ? 1.0f : t.scale;
    for (int64_t r = 0; r < mr; ++r) {
      scale_row(St + r * N, C + r * n16, N, scale);
      if (mask.on()) mask.apply_row(St + r * N, N, blk.b, blk.h, blk.i0 + r);
    }
  }
};

// Forward: the float row buffers of the float kernels, plus the head's K^T and V and the block's
// P as bf16 word operands, and the padded float results of the two products.
struct AmxForwardWorker {
  using Call = AttentionCall<c10::BFloat16, float>;
  ForwardScratch<float> ws;
  at::Tensor buf, out_buf;
  int64_t n16, d16;  // N and D padded to multiples of 16
  uint32_t* Kt;      // (kwords(D) x n16) K^T as column pairs
  uint32_t* Vp;      // (kwords(N) x d16) V as column pairs
  uint32_t* Pp;      // (bq x kwords(N)) P rounded to bf16 rows
  uint32_t* pad;     // (max(N, bq) x kwords(D)) rows of Q (or of K, for odd D), padded
  float* C;          // (bq x d16) E V
  TeacherOperands teacher;  // attention_match only

  AmxForwardWorker(const Call& c, const ForwardTaskSplit& split)
      : ws(c, split, amx::pad16(c.d.N)) {
    const int64_t N = c.d.N, D = c.d.D, bq = c.block_rows();
    const int64_t dk = amx::kwords(D), nk = amx::kwords(N);
    n16 = amx::pad16(N);
    d16 = amx::pad16(D);
    buf = amx::zeroed_words(dk * n16 + nk * d16 + bq * nk + std::max(N, bq) * dk);
    Kt = amx::words_of(buf);
    Vp = Kt + dk * n16;
    Pp = Vp + nk * d16;
    pad = Pp + bq * nk;
    out_buf = scratch<float>(bq * d16);
    C = out_buf.data_ptr<float>();
    if (c.teacher) teacher = TeacherOperands(N, c.teacher->Dt, bq);
  }
  // The thread's tile configuration is released when its tasks are done.
  ~AmxForwardWorker() { at::native::cpublas::brgemm_release(); }

  void block(const Call& c, const ForwardTensors<c10::BFloat16, float>& t, const QueryBlock& blk) {
    const int64_t N = c.d.N, D = c.d.D, hd = N * D, m = blk.m;
    const int64_t dk = amx::kwords(D), nk = amx::kwords(N);
    bf16::transposed_column_pairs(t.k + blk.bh * hd, N, D, Kt, n16, pad);
    const uint32_t* Q = amx::query_rows(t.q + blk.bh * hd + blk.i0 * D, m, D, c.scale, pad);
    amx::product(m, n16, dk, Q, Kt, n16, ws.S, n16, false);
    amx::scale_scores(ws.S, m, N, n16, c.scale);
    mask_scores(c, blk, ws.S, n16);
    const TeacherRowPlan plan = teacher_row_plan(c.teacher, blk);
    if (plan.rows > 0) {
      teacher.logits(*c.teacher, c.extras.mask, blk, N, plan.rows, ws.St);
      forward_teacher_scores(c, blk, plan, static_cast<const float*>(nullptr),
                             KeyOperand<float>{}, ws);
    }
    if (!c.teacher && c.kind == ExportKind::None && !c.extras.dropout.on) {
      // Nothing reads the float exp rows: the softmax writes E as bf16 rows directly.
      softmax_to_pairs(c, blk, t.lse);
    } else {
      forward_rows(c, blk, plan, t.lse, t.maps, ws);
      bf16::row_pairs(ws.S, m, N, n16, Pp, nk);
    }
    // O = diag(1/sum) E V with E rounded to bf16.
    bf16::column_pairs(t.v + blk.bh * hd, N, D, D, Vp, d16);
    amx::product(m, d16, nk, Pp, Vp, d16, C, d16, false);
    for (int64_t i = 0; i < m; ++i) scale_row(C + i * d16, C + i * d16, D, ws.inv_sum[i]);
    amx::store_rows(t.out + blk.bh * hd + blk.i0 * D, C, m, D, d16);
  }

  // The softmax of the block's masked rows, without a teacher, exports or dropout: the LSE and
  // 1 / row sum as forward_softmax gives them, E rounded into Pp.
  void softmax_to_pairs(const Call& c, const QueryBlock& blk, float* lse) {
    const int64_t N = c.d.N, nk = amx::kwords(N), row0 = blk.row0(N);
    for (int64_t i = 0; i < blk.m; ++i) {
      float mx;
      const float sum = amx::exp_row_to_pairs(ws.S + i * n16, N, Pp + i * nk, nk, &mx);
      lse[row0 + i] = mx + std::log(sum);
      ws.inv_sum[i] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
  }
};

// Backward: the float row buffers of the float kernels, plus the head's K^T, V^T and K and the
// block's operands as bf16 words; dK^T and dV^T accumulate in float over the head's blocks.
struct AmxBackwardWorker {
  using Call = AttentionCall<c10::BFloat16, float>;
  const Call& c;
  BackwardScratch<float> ws;
  at::Tensor buf, out_buf;
  int64_t n16, d16;
  uint32_t* Kt;   // (kwords(D) x n16) K^T as column pairs
  uint32_t* Vt;   // (kwords(D) x n16) V^T as column pairs
  uint32_t* Kp;   // (kwords(N) x d16) K as column pairs
  uint32_t* Xr;   // (bq x kwords(N)) dS rounded to bf16 rows
  uint32_t* Xc;   // (kwords(bq) x n16) P, then dS, as column pairs over the query rows
  uint32_t* Yt;   // (D x kwords(bq)) dO^T, then Q^T, as bf16 rows
  uint32_t* pad;  // (max(N, bq) x kwords(D)) rows of Q (or of K, V for odd D), padded
  uint32_t* pad2;
  float* C;       // (bq x d16) the block's dQ
  float* dKt;     // (D x n16) the head's dK^T, summed over its blocks
  float* dVt;     // (D x n16) the head's dV^T
  TeacherOperands teacher;  // attention_match with a loss gradient only

  explicit AmxBackwardWorker(const Call& call) : c(call), ws(call, amx::pad16(call.d.N)) {
    const int64_t N = c.d.N, D = c.d.D, bq = c.block_rows();
    const int64_t dk = amx::kwords(D), nk = amx::kwords(N), bk = amx::kwords(bq);
    const int64_t rows = std::max(N, bq);
    n16 = amx::pad16(N);
    d16 = amx::pad16(D);
    buf = amx::zeroed_words(2 * dk * n16 + nk * d16 + bq * nk + bk * n16 + D * bk +
                            2 * rows * dk);
    Kt = amx::words_of(buf);
    Vt = Kt + dk * n16;
    Kp = Vt + dk * n16;
    Xr = Kp + nk * d16;
    Xc = Xr + bq * nk;
    Yt = Xc + bk * n16;
    pad = Yt + D * bk;
    pad2 = pad + rows * dk;
    out_buf = scratch<float>(bq * d16 + 2 * D * n16);
    C = out_buf.data_ptr<float>();
    dKt = C + bq * d16;
    dVt = dKt + D * n16;
    if (c.teacher && c.teacher->drow_loss) teacher = TeacherOperands(N, c.teacher->Dt, bq);
  }
  ~AmxBackwardWorker() { at::native::cpublas::brgemm_release(); }

  void head(const BackwardTensors<c10::BFloat16, float>& t, int64_t bh) {
    const int64_t H = c.d.H, N = c.d.N, D = c.d.D, hd = N * D, bq = c.block_rows();
    bf16::transposed_column_pairs(t.k + bh * hd, N, D, Kt, n16, pad);
    bf16::transposed_column_pairs(t.v + bh * hd, N, D, Vt, n16, pad);
    bf16::column_pairs(t.k + bh * hd, N, D, D, Kp, d16);
    for (int64_t i0 = 0; i0 < N; i0 += bq)
      block(t, QueryBlock{bh / H, bh % H, bh, i0, std::min(bq, N - i0)});
    amx::transpose(dKt, D, N, n16, ws.dK, D);
    convert_row(t.dk + bh * hd, ws.dK, hd);
    if (t.dout) {
      amx::transpose(dVt, D, N, n16, ws.dV, D);
      convert_row(t.dv + bh * hd, ws.dV, hd);
    } else {
      std::fill(t.dv + bh * hd, t.dv + (bh + 1) * hd, c10::BFloat16(0.0f));
    }
  }

  void block(const BackwardTensors<c10::BFloat16, float>& t, const QueryBlock& blk) {
    const int64_t N = c.d.N, D = c.d.D, hd = N * D, m = blk.m, i0 = blk.i0;
    const int64_t dk = amx::kwords(D), nk = amx::kwords(N), mk = amx::kwords(m);
    const bool accumulate = i0 > 0;  // the first block of a head overwrites dK^T, dV^T
    const c10::BFloat16* q = t.q + blk.bh * hd + i0 * D;
    const c10::BFloat16* dout = t.dout ? t.dout + blk.bh * hd + i0 * D : nullptr;
    // P holds the scaled, masked logits, dP = dO V^T; each row pass then makes P and dS.
    amx::product(m, n16, dk, amx::query_rows(q, m, D, c.scale, pad), Kt, n16, ws.P, n16, false);
    amx::scale_scores(ws.P, m, N, n16, c.scale);
    mask_scores(c, blk, ws.P, n16);
    // The teacher's logits of the matched rows: folded into the row pass, or turned into the
    // loss gradient first (teacher_logit_grads; its Q and K are read for the CLS row only).
    const int64_t mr = c.teacher && c.teacher->drow_loss ? c.teacher->rows_in_block(i0, m) : 0;
    const bool teacher_in_row = teacher_grad_in_row_pass(c, t.dmaps != nullptr);
    if (mr > 0) teacher.logits(*c.teacher, c.extras.mask, blk, N, mr, ws.St);
    if (mr > 0 && !teacher_in_row)
      teacher_logit_grads(c, blk, mr, t.lse, static_cast<const float*>(nullptr),
                          BackwardHead<float>{}, ws);
    if (dout)
      amx::product(m, n16, dk, bf16::row_pairs(dout, m, D, dk, pad2), Vt, n16, ws.dP, n16, false);
    backward_rows(c, t, blk, ws, mr, teacher_in_row);
    if (dout) {  // dV^T += dO^T P
      amx::transposed_rows(dout, m, D, Yt);
      amx::pairs_over_rows(ws.P, m, N, n16, Xc, n16);
      amx::product(D, n16, mk, Yt, Xc, n16, dVt, n16, accumulate);
    }
    // dQ = dS K
    bf16::row_pairs(ws.dP, m, N, n16, Xr, nk);
    amx::product(m, d16, nk, Xr, Kp, d16, C, d16, false);
    amx::store_rows(t.dq + blk.bh * hd + i0 * D, C, m, D, d16);
    // dK^T += Q^T dS
    amx::pairs_over_rows(ws.dP, m, N, n16, Xc, n16);
    amx::transposed_rows(q, m, D, Yt);
    amx::product(D, n16, mk, Yt, Xc, n16, dKt, n16, accumulate);
  }
};

}  // namespace fastattnreg::cpu::kernels
#endif  // FASTATTNREG_AVX512_BF16
