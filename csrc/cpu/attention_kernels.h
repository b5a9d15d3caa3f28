// The CPU attention kernels shared by every op that runs attention: plain attention with map
// export (attention.cpp) and attention with the fused matching loss (match.cpp).
//
// Work split: a forward task is one query block of one head (or of every head, for "head_mean",
// so the head average is summed in a fixed order without atomics). A query block holds up to
// kTileElems / N rows, so its score tile S (rows x N) stays in L2 and the softmax is exact over
// the whole key range: no online rescaling is needed on the CPU. The GEMMs on the tiles go to
// BLAS (blas.h); the row passes (softmax, exp, softmax backward) are vectorised (rowops.h).
// Backward tasks are whole heads, so dK and dV accumulate over query blocks without races and
// every rerun sums in the same order (bitwise repeatable).
//
// A Teacher (match.cpp) adds, for the matched rows of each block, the teacher's logits from its
// own q, k (one more GEMM) and the divergence between the two rows (match_rows.h): its value in
// the forward, its gradient with respect to the student's logits folded into dS in the backward.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>

#include "../checks.h"
#include "attention_mask.h"
#include "blas.h"
#include "dropout_stream.h"
#include "fork_guard.h"
#include "match_rows.h"
#include "rowops.h"
#include "score_gemm.h"

namespace fastattnreg::cpu::kernels {


// Score-tile budget in elements (320 KiB of float): tile and its gradient fit the 2 MiB L2.
constexpr int64_t kTileElems = 80 * 1024;

// Rows per query block: as many as the budget allows, then balanced so no block is a sliver.
inline int64_t query_block_rows(int64_t n) {
  const int64_t cap = std::max<int64_t>(16, kTileElems / n);
  const int64_t blocks = (n + cap - 1) / cap;
  return (n + blocks - 1) / blocks;
}

template <typename T>
at::Tensor scratch(int64_t n) {
  // at::empty is 64-byte aligned, so BLAS takes the same code path on every rerun.
  return at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// A read-only tile in the accumulation type: the input itself when types match, else a copy.
template <typename acc_t, typename scalar_t>
const acc_t* tile_as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    convert_row(buf, src, n);
    return buf;
  }
}

// A writable tile: the destination itself when types match, else the buffer (stored later).
template <typename acc_t, typename scalar_t>
acc_t* out_tile(scalar_t* dst, acc_t* buf) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename acc_t, typename scalar_t>
void store_tile(scalar_t* dst, const acc_t* src, int64_t n) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) convert_row(dst, src, n);
}

// dst (cols x rows, leading dim ld >= rows) = src (rows x cols)^T, converting the element type if
// needed. Used to hand K^T and V^T to the score GEMM as plain row-major operands: MKL runs Q K^T
// as a "no-transpose" product markedly faster than with a transposed operand on ViT tiles (perf at
// N = 65: the transposed kernel took 2.5x the time of the plain one for the same FLOPs), and the
// AVX-512 score kernel (score_gemm.h) reads only this layout.
template <typename Src, typename Dst>
void transpose(const Src* src, int64_t rows, int64_t cols, Dst* dst, int64_t ld) {
  if constexpr (std::is_same_v<Src, float> && std::is_same_v<Dst, float>) {
    // ATen's register-blocked 16 x 16 transpose on AVX-512 (a plain loop elsewhere); the scalar
    // loop below took ~10% of the forward at N = 65 with its strided stores. The source is
    // usually a head's keys read for the first time (from memory): each band of 16 rows is
    // prefetched while the one before it is transposed.
    constexpr int64_t kBand = 16;
    for (int64_t r0 = 0; r0 < rows; r0 += kBand) {
      const int64_t next_begin = (r0 + kBand) * cols;
      const int64_t next_end = std::min(rows, r0 + 2 * kBand) * cols;
      for (int64_t e = next_begin; e < next_end; e += 64 / int64_t(sizeof(float)))
        __builtin_prefetch(src + e);
      at::vec::transpose_mxn<float>(src + r0 * cols, cols, dst + r0, ld,
                                    static_cast<int>(std::min(kBand, rows - r0)),
                                    static_cast<int>(cols));
    }
  } else {
    constexpr int64_t kB = 16;  // 16 x 16 blocks keep both sides within a few cache lines
    for (int64_t r0 = 0; r0 < rows; r0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB);
      for (int64_t c0 = 0; c0 < cols; c0 += kB) {
        const int64_t c1 = std::min(cols, c0 + kB);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) dst[c * ld + r] = static_cast<Dst>(src[r * cols + c]);
      }
    }
  }
}

// Key counts from which the score GEMMs that go to BLAS hand it the keys as its transposed
// operand instead of an explicit transposed copy. Measured with MKL on one thread (D = 64),
// transposed-operand time over plain-product-plus-copy time: 2.0-2.5x at N = 65, about 1.4x at
// N = 161, about 1.0 at N = 197 and 257. There the copy (also the first, cache-missing read of the
// head's keys: ~8% of an attention_match step in perf) is pure cost. The AVX-512 score kernel
// always takes the copy: on it, as fast as MKL at N = 65 and 5-15% faster at N = 197..257
// (score_gemm.h).
constexpr int64_t kKeysTransposedOperandMin = 192;

// Leading dim of a transposed key copy: a multiple of 16 elements, so each of its rows starts
// 64-byte aligned in a 64-byte aligned buffer (the score kernel's loads then never split lines).
inline int64_t key_copy_ld(int64_t N) { return (N + 15) / 16 * 16; }

// Room, in elements, that key_operand needs for one head's N x Dy keys.
inline int64_t key_operand_elems(int64_t N, int64_t Dy) { return key_copy_ld(N) * Dy; }

// The key side of a score GEMM S = alpha X Y^T (m x N), Y (N x Dy) one head's keys (or values, for
// dP = dO V^T): either the copy Y^T (Dy x N, leading dim ld) or Y itself, in the accumulation type.
template <typename acc_t>
struct KeyOperand {
  const acc_t* data;
  int64_t N, Dy, ld;
  bool transposed_copy;  // data holds Y^T
};

// buf: room for key_operand_elems(N, Dy) values of acc_t (the copy, or bf16's conversion).
template <typename scalar_t, typename acc_t>
KeyOperand<acc_t> key_operand(const scalar_t* y, int64_t N, int64_t Dy, acc_t* buf) {
  if (!score_kernel_takes_tile<acc_t>(Dy) && N >= kKeysTransposedOperandMin)
    return {tile_as_acc(y, N * Dy, buf), N, Dy, Dy, false};
  const int64_t ld = key_copy_ld(N);
  transpose(y, N, Dy, buf, ld);
  return {buf, N, Dy, ld, true};
}

// S (m x N, row-major) = alpha X Y^T for X (m x Dy).
template <typename acc_t>
void score_gemm(int64_t m, acc_t alpha, const acc_t* X, const KeyOperand<acc_t>& y, acc_t* S) {
  if (y.transposed_copy) {
    score_gemm_nn<acc_t>(m, y.N, y.Dy, alpha, X, y.Dy, y.data, y.ld, S, y.N);
  } else {
    gemm_rm<acc_t>(false, true, m, y.N, y.Dy, alpha, X, y.Dy, y.data, y.ld, acc_t(0), S, y.N);
  }
}

// Hands out task indices one at a time from a shared counter to torch's intra-op threads. ViT
// heads are short (tens of microseconds) and the two threads of this kind of machine do not run
// at equal speed, so a static split left one spinning at the barrier (libgomp ~10% in perf).
// Each task writes only its own outputs, so results do not depend on which thread ran it.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t tasks) : tasks_(tasks) {}
  // How many workers to start: one per thread, never more than there are tasks; one in a child
  // forked after this process ran a team, where a new OpenMP team never starts (fork_guard.h).
  int64_t workers() const {
    if (ForkGuard::get().team_lost()) return 1;
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks_));
    if (n > 1) ForkGuard::get().note_parallel_team();
    return n;
  }
  bool next(int64_t* task) {
    *task = next_.fetch_add(1, std::memory_order_relaxed);
    return *task < tasks_;
  }

 private:
  const int64_t tasks_;
  std::atomic<int64_t> next_{0};
};

struct Dims {
  int64_t B, H, N, D;
};

// The teacher side of attention_match: its q, k (B, H, N, Dt) and what the kernels produce or
// consume per matched row. Matched rows are every query row (R = N), or with cls_rows only query
// 0 over keys 1..N-1, both softmaxes renormalised over those keys (R = 1).
template <typename scalar_t, typename acc_t>
struct Teacher {
  const scalar_t* q;
  const scalar_t* k;
  int64_t Dt;
  acc_t scale;
  MatchKind kind;
  bool cls_rows;
  acc_t* lse;               // (B, H, R): written by the forward (0 for MseLogits, which needs
                            // none), read by the backward
  acc_t* row_loss;          // (B, H, R): forward output, one divergence per matched row
  const acc_t* drow_loss;   // (B, H, R): backward input, the gradient of each row's loss

  // Rows of the query block [i0, i0 + m) that are matched, and the (B, H, R) index of its first.
  int64_t rows_in_block(int64_t i0, int64_t m) const { return cls_rows ? (i0 == 0 ? 1 : 0) : m; }
  int64_t row_index(int64_t bh, int64_t n, int64_t i0) const { return cls_rows ? bh : bh * n + i0; }
  // The keys a matched row is compared over: all n, or 1..n-1 for the CLS row.
  int64_t key0() const { return cls_rows ? 1 : 0; }
};

// St (mr x N) = scale_t * TQ TK^T for the first mr rows of the query block at i0 of head
// bh = b * H + h, masked like the student's logits. tk holds the head's teacher keys, tq_buf
// room for mr x Dt query rows in acc_t.
template <typename scalar_t, typename acc_t>
void teacher_logits(const Teacher<scalar_t, acc_t>& t, const MaskView<scalar_t>& mask, int64_t b,
                    int64_t h, int64_t bh, int64_t N, int64_t i0, int64_t mr,
                    const KeyOperand<acc_t>& tk, acc_t* tq_buf, acc_t* st) {
  const int64_t hdt = N * t.Dt;
  const acc_t* TQ = tile_as_acc(t.q + bh * hdt + i0 * t.Dt, mr * t.Dt, tq_buf);
  score_gemm(mr, t.scale, TQ, tk, st);
  if (mask.on())
    for (int64_t r = 0; r < mr; ++r) mask.apply_row(st + r * N, N, b, h, i0 + r);
}

// The student's logits of the matched rows, into sl (mr x N). For every row they are the score
// tile S itself (copied: the softmax overwrites S). For the CLS row they are recomputed by a
// one-row GEMM of the same shape as the teacher's, so a teacher that is a copy of the student
// gives bitwise-equal logits and a loss of exactly 0 (BLAS may round a 1-row product
// differently from the same row inside an m-row product). The mask is applied as to S.
template <typename scalar_t, typename acc_t>
void student_match_logits(const Teacher<scalar_t, acc_t>& t, const MaskView<scalar_t>& mask,
                          int64_t b, int64_t h, const acc_t* S, const acc_t* Q,
                          const KeyOperand<acc_t>& K, int64_t mr, int64_t N, acc_t scale,
                          acc_t* sl) {
  if (t.cls_rows) {
    score_gemm(1, scale, Q, K, sl);
    if (mask.on()) mask.apply_row(sl, N, b, h, 0);
  } else {
    std::copy(S, S + mr * N, sl);
  }
}

// What a forward or backward call applies besides plain attention: a mask and dropout.
template <typename scalar_t>
struct AttentionExtras {
  MaskView<scalar_t> mask;
  DropoutStream dropout;
  scalar_t* dmask = nullptr;  // backward only: (B, H, N, N) gradient of a float mask, or null
};

template <typename scalar_t, typename acc_t>
void forward_impl(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                  acc_t* lse, scalar_t* maps, Dims d, acc_t scale, ExportKind kind,
                  const AttentionExtras<scalar_t>& extras = {},
                  const Teacher<scalar_t, acc_t>* teacher = nullptr) {
  const int64_t B = d.B, H = d.H, N = d.N, D = d.D, hd = N * D;
  const int64_t bq = query_block_rows(N);
  const int64_t nqb = (N + bq - 1) / bq;
  const bool all_heads = kind == ExportKind::HeadMean;
  // key_mean sums P over every query row of a head: a task is a whole head, its query blocks in
  // order, so the column sums need no atomics and every run adds in the same order.
  const bool whole_heads = kind == ExportKind::KeyMean;
  const int64_t tasks = all_heads ? B * nqb : whole_heads ? B * H : B * H * nqb;
  const MaskView<scalar_t>& mask = extras.mask;
  const DropoutStream& drop = extras.dropout;

  TaskQueue queue(tasks);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_guard;
    at::Tensor s_buf = scratch<acc_t>(bq * N + bq);
    at::Tensor mean_buf = scratch<acc_t>(all_heads ? bq * N : whole_heads ? N : 0);
    // K^T of the head (D x N, key_operand), and for bf16 V, the query block and its output in
    // float.
    const int64_t kel = key_operand_elems(N, D);
    at::Tensor cvt_buf = scratch<acc_t>(kel + hd + 2 * bq * D);
    // Dropout: the keep bits of one query block (its rows are consecutive in the stream).
    at::Tensor bits_buf = at::empty({drop.on ? keep_bits_words(bq * N) : 1}, at::kLong);
    acc_t* S = s_buf.data_ptr<acc_t>();
    acc_t* inv_sum = S + bq * N;  // 1 / row sum of exp, per query row of the block
    acc_t* M = mean_buf.data_ptr<acc_t>();
    acc_t* cvt = cvt_buf.data_ptr<acc_t>();
    uint64_t* keep = reinterpret_cast<uint64_t*>(bits_buf.data_ptr<int64_t>());
    // Teacher: its K^T (Dt x N), query rows, logits St and a copy of the student's logits SL.
    const int64_t Dt = teacher ? teacher->Dt : 0;
    const int64_t tkel = teacher ? key_operand_elems(N, Dt) : 0;
    at::Tensor t_buf = scratch<acc_t>(teacher ? tkel + bq * Dt + 2 * bq * N : 0);
    acc_t* TKt = t_buf.data_ptr<acc_t>();
    acc_t* TQ = TKt + tkel;
    acc_t* St = TQ + bq * Dt;
    acc_t* SL = St + bq * N;
    for (int64_t t; queue.next(&t);) {
      // The task's batch element, heads and query blocks.
      int64_t b, h_begin, h_end, qb_begin, qb_end;
      if (whole_heads) {
        b = t / H, h_begin = t % H, h_end = h_begin + 1, qb_begin = 0, qb_end = nqb;
      } else {
        qb_begin = t % nqb, qb_end = qb_begin + 1;
        b = all_heads ? t / nqb : t / nqb / H;
        h_begin = all_heads ? 0 : (t / nqb) % H;
        h_end = all_heads ? H : h_begin + 1;
      }
      if (whole_heads) std::fill(M, M + N, acc_t(0));
      for (int64_t qb = qb_begin; qb < qb_end; ++qb) {
        const int64_t i0 = qb * bq, m = std::min(bq, N - i0);
        for (int64_t h = h_begin; h < h_end; ++h) {
          const int64_t bh = b * H + h;
          const KeyOperand<acc_t> K = key_operand(k + bh * hd, N, D, cvt);
          const acc_t* V = tile_as_acc(v + bh * hd, hd, cvt + kel);
          const acc_t* Q = tile_as_acc(q + bh * hd + i0 * D, m * D, cvt + kel + hd);
          acc_t* O = out_tile(out + bh * hd + i0 * D, cvt + kel + hd + bq * D);
          // S = scale * Q K^T (m x N), masked; rows become exp(S - rowmax), unnormalised.
          score_gemm(m, scale, Q, K, S);
          if (mask.on())
            for (int64_t i = 0; i < m; ++i) mask.apply_row(S + i * N, N, b, h, i0 + i);
          const int64_t mr = teacher ? teacher->rows_in_block(i0, m) : 0;
          const bool logits_only = teacher && teacher->kind == MatchKind::MseLogits;
          // Every-row KL and logit MSE reduce their loss from the raw logits still in S, before the
          // softmax overwrites them, so S needs no copy (see match_rows.h).
          const bool on_s = teacher && !teacher->cls_rows && teacher->kind != MatchKind::MseProbs;
          if (mr > 0) {
            const KeyOperand<acc_t> TK = key_operand(teacher->k + bh * N * Dt, N, Dt, TKt);
            teacher_logits(*teacher, mask, b, h, bh, N, i0, mr, TK, TQ, St);
            if (on_s && logits_only) {  // needs no LSE
              for (int64_t r = 0; r < mr; ++r) {
                const int64_t ri = teacher->row_index(bh, N, i0) + r;
                teacher->lse[ri] = acc_t(0);
                teacher->row_loss[ri] =
                    match_loss_row(teacher->kind, S + r * N, acc_t(0), St + r * N, acc_t(0), N);
              }
            } else if (!on_s) {
              student_match_logits(*teacher, mask, b, h, S, Q, K, mr, N, scale, SL);
            }
          }
          // Every-row KL: the student's softmax and the divergence in one pass per row (below the
          // loop for the other rows).
          const bool kl_rows = on_s && !logits_only;
          for (int64_t r = 0; r < (kl_rows ? mr : 0); ++r) {
            const int64_t ri = teacher->row_index(bh, N, i0) + r;
            acc_t mx, sum;
            const acc_t cross =
                kl_softmax_row(S + r * N, St + r * N, N, &mx, &sum, &teacher->lse[ri]);
            const acc_t row_lse = mx + std::log(sum);
            lse[bh * N + i0 + r] = row_lse;
            // A fully masked row (sum 0): P's row is 0 and the row's loss 0.
            inv_sum[r] = sum > acc_t(0) ? acc_t(1) / sum : acc_t(0);
            teacher->row_loss[ri] = sum > acc_t(0) ? cross - teacher->lse[ri] + row_lse : acc_t(0);
          }
          for (int64_t i = kl_rows ? mr : 0; i < m; ++i) {
            acc_t mx;
            const acc_t sum = exp_row(S + i * N, N, &mx);
            // A fully masked row (max -inf) has sum 0: lse -inf, and P, out and maps rows 0.
            lse[bh * N + i0 + i] = mx + std::log(sum);
            inv_sum[i] = sum > acc_t(0) ? acc_t(1) / sum : acc_t(0);
          }
          for (int64_t r = 0; r < (on_s ? 0 : mr); ++r) {
            const int64_t j0 = teacher->key0(), n = N - j0, ri = teacher->row_index(bh, N, i0) + r;
            const acc_t* ss = SL + r * N + j0;
            const acc_t* st = St + r * N + j0;
            const acc_t slse = logits_only ? acc_t(0)
                               : j0 == 0   ? lse[bh * N + i0 + r]
                                           : logsumexp_row(ss, n);
            const acc_t tlse = logits_only ? acc_t(0) : logsumexp_row(st, n);
            teacher->lse[ri] = tlse;
            // Every matched key masked: slse is -inf and the row's loss 0.
            const bool dead = slse == -std::numeric_limits<acc_t>::infinity();
            teacher->row_loss[ri] =
                dead ? acc_t(0) : match_loss_row(teacher->kind, ss, slse, st, tlse, n);
          }
          // The maps are P before dropout: written from the unnormalised rows and 1 / sum.
          if (kind == ExportKind::Full) {
            for (int64_t i = 0; i < m; ++i)
              scale_row(maps + (bh * N + i0 + i) * N, S + i * N, N, inv_sum[i]);
          } else if (kind == ExportKind::Cls && i0 == 0) {
            scale_row(maps + bh * N, S, N, inv_sum[0]);
          } else if (all_heads) {
            // Sum of P over heads in head order; divided by H once below.
            for (int64_t i = 0; i < m; ++i) {
              if (h == 0) {
                scale_row(M + i * N, S + i * N, N, inv_sum[i]);
              } else {
                axpy_row(M + i * N, S + i * N, N, inv_sum[i]);
              }
            }
          } else if (whole_heads) {
            // Column sums of P over the head's query rows, in row order; divided by N below.
            for (int64_t i = 0; i < m; ++i) axpy_row(M, S + i * N, N, inv_sum[i]);
          }
          if (drop.on) {
            const uint64_t e0 = uint64_t((bh * N + i0) * N);
            drop.keep_bits(e0, m * N, keep);
            for (int64_t i = 0; i < m; ++i)
              drop.apply(S + i * N, N, keep, int64_t(e0 & 3) + i * N);
          }
          // O = diag(1/sum) E V  (m x D): normalising the D-wide output, not the N-wide row.
          score_gemm_nn<acc_t>(m, D, N, acc_t(1), S, N, V, D, O, D);
          for (int64_t i = 0; i < m; ++i) scale_row(O + i * D, O + i * D, D, inv_sum[i]);
          store_tile(out + bh * hd + i0 * D, O, m * D);
        }
        if (all_heads) scale_row(maps + (b * N + i0) * N, M, m * N, acc_t(1) / acc_t(H));
      }
      if (whole_heads) scale_row(maps + (b * H + h_begin) * N, M, N, acc_t(1) / acc_t(N));
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                   const scalar_t* v, const scalar_t* out, const acc_t* lse, const acc_t* dlse,
                   const scalar_t* dmaps, scalar_t* dq, scalar_t* dk, scalar_t* dv, Dims d,
                   acc_t scale, ExportKind kind, const AttentionExtras<scalar_t>& extras = {},
                   const Teacher<scalar_t, acc_t>* teacher = nullptr) {
  const int64_t H = d.H, N = d.N, D = d.D, hd = N * D;
  const int64_t bq = query_block_rows(N);
  const int64_t nqb = (N + bq - 1) / bq;
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
  const MaskView<scalar_t>& mask = extras.mask;
  const DropoutStream& drop = extras.dropout;
  scalar_t* dmask = extras.dmask;

  TaskQueue queue(d.B * H);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_guard;
    at::Tensor s_buf = scratch<acc_t>(2 * bq * N + N);
    // The key operands of K and V for the score GEMMs (key_operand); for bf16 also K, dK, dV of
    // the head and Q, dO, O, dQ of the block, in float.
    const int64_t kel = key_operand_elems(N, D);
    at::Tensor cvt_buf = scratch<acc_t>(2 * kel + (kConvert ? 3 * hd + 4 * bq * D : 0));
    acc_t* P = s_buf.data_ptr<acc_t>();
    acc_t* dP = P + bq * N;
    acc_t* g_row = dP + bq * N;  // one row of the map gradient in acc_t
    acc_t* cvt = cvt_buf.data_ptr<acc_t>();
    // Teacher (only when its loss has a gradient): its key operand, query rows, and logits St, which
    // match_grad_row turns in place into the loss gradient with respect to the student's logits.
    const bool match = teacher && teacher->drow_loss;
    const int64_t Dt = match ? teacher->Dt : 0;
    const int64_t tkel = match ? key_operand_elems(N, Dt) : 0;
    at::Tensor t_buf = scratch<acc_t>(match ? tkel + bq * Dt + bq * N + N : 0);
    acc_t* TKt = t_buf.data_ptr<acc_t>();
    acc_t* TQ = TKt + tkel;
    acc_t* St = TQ + bq * Dt;
    acc_t* SL = St + bq * N;  // the student's CLS-row logits (see student_match_logits)
    // Dropout: the keep bits of one query block, regenerated (its rows are consecutive).
    at::Tensor bits_buf = at::empty({drop.on ? keep_bits_words(bq * N) : 1}, at::kLong);
    uint64_t* keep = reinterpret_cast<uint64_t*>(bits_buf.data_ptr<int64_t>());
    for (int64_t bh; queue.next(&bh);) {
      const int64_t b = bh / H;
      const KeyOperand<acc_t> Kop = key_operand(k + bh * hd, N, D, cvt);
      const KeyOperand<acc_t> Vop = key_operand(v + bh * hd, N, D, cvt + kel);
      acc_t* more = cvt + 2 * kel;  // bf16 only: K, dK, dV of the head, then the block's tiles
      const acc_t* K = Kop.transposed_copy ? tile_as_acc(k + bh * hd, hd, more) : Kop.data;
      acc_t* dK = out_tile(dk + bh * hd, more + hd);
      acc_t* dV = out_tile(dv + bh * hd, more + 2 * hd);
      acc_t* blk = more + 3 * hd;
      const KeyOperand<acc_t> TK =
          match ? key_operand(teacher->k + bh * N * Dt, N, Dt, TKt) : KeyOperand<acc_t>{};
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * bq, m = std::min(bq, N - i0), row0 = bh * N + i0;
        const bool accumulate = qb > 0;  // the first block overwrites dK, dV
        const acc_t* Q = tile_as_acc(q + bh * hd + i0 * D, m * D, blk);
        const acc_t* dO = dout ? tile_as_acc(dout + bh * hd + i0 * D, m * D, blk + bq * D) : nullptr;
        const acc_t* O = dout ? tile_as_acc(out + bh * hd + i0 * D, m * D, blk + 2 * bq * D) : nullptr;
        acc_t* dQ = out_tile(dq + bh * hd + i0 * D, blk + 3 * bq * D);

        // P holds the scaled, masked logits, dP = dO V^T; each row pass then makes P and dS.
        score_gemm(m, scale, Q, Kop, P);
        if (mask.on())
          for (int64_t i = 0; i < m; ++i) mask.apply_row(P + i * N, N, b, bh % H, i0 + i);
        const int64_t mr = match ? teacher->rows_in_block(i0, m) : 0;
        // Every-row KL and logit MSE fold their gradient into the softmax backward's row pass
        // (match_rows.h); the other forms turn St into the gradient first.
        // (No op passes both a teacher and a map gradient; the map path below expects St to hold
        // the gradient, so it is kept off the fused path.)
        const bool fused = match && !dmaps && !teacher->cls_rows &&
                           teacher->kind != MatchKind::MseProbs;
        if (mr > 0) teacher_logits(*teacher, mask, b, bh % H, bh, N, i0, mr, TK, TQ, St);
        if (mr > 0 && !fused) {
          // Loss gradient w.r.t. the student's logits, from the logits still in P.
          const acc_t* student = P;
          if (teacher->cls_rows) {
            student_match_logits(*teacher, mask, b, bh % H, P, Q, Kop, mr, N, scale, SL);
            student = SL;
          }
          for (int64_t r = 0; r < mr; ++r) {
            const int64_t j0 = teacher->key0(), n = N - j0, ri = teacher->row_index(bh, N, i0) + r;
            const acc_t* ss = student + r * N + j0;
            const acc_t slse = teacher->kind == MatchKind::MseLogits ? acc_t(0)
                               : j0 == 0                             ? lse[row0 + r]
                                                                     : logsumexp_row(ss, n);
            if (slse == -std::numeric_limits<acc_t>::infinity()) {
              std::fill(St + r * N, St + (r + 1) * N, acc_t(0));  // fully masked: no gradient
              continue;
            }
            match_grad_row(teacher->kind, ss, slse, St + r * N + j0, teacher->lse[ri], n,
                           teacher->drow_loss[ri]);
            if (j0 == 1) St[r * N] = acc_t(0);  // the CLS row's own key is not matched
          }
        }
        if (dO) {
          score_gemm(m, acc_t(1), dO, Vop, dP);
        } else {
          std::fill(dP, dP + m * N, acc_t(0));
        }
        if (drop.on) drop.keep_bits(uint64_t(row0 * N), m * N, keep);  // the block's rows
        for (int64_t i = 0; i < m; ++i) {
          acc_t* Pi = P + i * N;
          acc_t* dPi = dP + i * N;
          scalar_t* dmask_row = dmask ? dmask + (row0 + i) * N : nullptr;
          if (lse[row0 + i] == -std::numeric_limits<acc_t>::infinity()) {
            // Every key masked: P's row is 0, so the row adds nothing to any gradient.
            std::fill(Pi, Pi + N, acc_t(0));
            std::fill(dPi, dPi + N, acc_t(0));
            if (dmask_row) std::fill(dmask_row, dmask_row + N, scalar_t(0));
            continue;
          }
          // Dropout: dP = (dO V^T) * keep / (1 - p); P itself is dropped after the row pass.
          const int64_t keep_bit0 = int64_t(uint64_t(row0 * N) & 3) + i * N;
          if (drop.on) drop.apply(dPi, N, keep, keep_bit0);
          // delta_i = sum_j P_ij dP_ij = dO_i . O_i (+ the map's share), minus the LSE gradient.
          acc_t delta = (dO ? dot_row(dO + i * D, O + i * D, D) : acc_t(0)) -
                        (dlse ? dlse[row0 + i] : acc_t(0));
          const scalar_t* g = nullptr;
          acc_t g_scale = 1;
          if (dmaps && kind == ExportKind::Full) {
            g = dmaps + (row0 + i) * N;
          } else if (dmaps && kind == ExportKind::HeadMean) {
            g = dmaps + (b * N + i0 + i) * N;
            g_scale = acc_t(1) / acc_t(H);
          } else if (dmaps && kind == ExportKind::Cls && i0 + i == 0) {
            g = dmaps + bh * N;
          } else if (dmaps && kind == ExportKind::KeyMean) {
            g = dmaps + bh * N;  // every query row contributes P_ij / N to key j's mean
            g_scale = acc_t(1) / acc_t(N);
          }
          // With a mask gradient the row pass makes dL/d(logits) (scale 1), which is the float
          // mask's gradient itself, and dS = scale * that follows; dividing dS by the scale
          // instead would give NaN at scale 0.
          const acc_t row_scale = dmask_row ? acc_t(1) : scale;
          if (g) {
            delta += exp_add_grad_row(Pi, dPi, tile_as_acc(g, N, g_row), N, lse[row0 + i], g_scale);
            softmax_grad_from_p_row(Pi, dPi, N, delta, row_scale);
            if (i < mr) axpy_row(dPi, St + i * N, N, row_scale);
          } else if (i < mr && fused) {
            const int64_t ri = teacher->row_index(bh, N, i0) + i;
            if (teacher->kind == MatchKind::KL) {
              softmax_grad_kl_row(Pi, dPi, St + i * N, N, lse[row0 + i], delta, row_scale,
                                  teacher->lse[ri], teacher->drow_loss[ri]);
            } else {
              softmax_grad_mse_logits_row(Pi, dPi, St + i * N, N, lse[row0 + i], delta, row_scale,
                                          teacher->drow_loss[ri]);
            }
          } else if (i < mr) {
            // Matched row: dS = scale (P (dP - delta) + the matching loss's logit gradient).
            softmax_grad_row(Pi, dPi, N, lse[row0 + i], delta, row_scale, St + i * N);
          } else {
            softmax_grad_row(Pi, dPi, N, lse[row0 + i], delta, row_scale);
          }
          // The float mask is added to the logits after the scale: its gradient is dL/d(logits).
          if (dmask_row) {
            convert_row(dmask_row, dPi, N);
            scale_row(dPi, dPi, N, scale);
          }
          if (drop.on) drop.apply(Pi, N, keep, keep_bit0);  // dV = (P * keep / (1 - p))^T dO
        }
        if (dO) score_gemm_tn<acc_t>(N, D, m, acc_t(1), P, N, dO, D, accumulate, dV, D);
        score_gemm_nn<acc_t>(m, D, N, acc_t(1), dP, N, K, D, dQ, D);
        score_gemm_tn<acc_t>(N, D, m, acc_t(1), dP, N, Q, D, accumulate, dK, D);
        store_tile(dq + bh * hd + i0 * D, dQ, m * D);
      }
      if (!dout) std::fill(dV, dV + hd, acc_t(0));
      store_tile(dk + bh * hd, dK, hd);
      store_tile(dv + bh * hd, dV, hd);
    }
  });
}

}  // namespace fastattnreg::cpu::kernels
