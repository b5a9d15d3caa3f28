// The CPU attention kernels shared by every op that runs attention: plain attention with map
// export (attention.cpp) and attention with the fused matching loss (match.cpp).
//
// Work split: a forward task is one query block of one head (or of every head, for "head_mean",
// so the head average is summed in a fixed order without atomics). A query block holds up to
// kTileElems / N rows, so its score tile S (rows x N) stays in L2 and the softmax is exact over
// the whole key range: no online rescaling is needed on the CPU. The GEMMs on the tiles go to
// BLAS (blas.h); the row passes (softmax, exp, softmax backward) are vectorised (rowops.h).
// Backward tasks are whole heads, so dK and dV accumulate over query blocks without races and
// every rerun sums in the same order (bitwise repeatable). The drivers (run_forward_tasks,
// run_backward_tasks) take a worker type, so the bf16 kernels of attention_bf16.h share them and
// every row pass below.
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

// s (N) = alpha x Y^T for one query row x (Dy), each s_j summed over the head dim in ascending
// order, whatever the operands' addresses. The CLS-row logits of student and teacher
// (attention_match) both come from here, so a teacher that copies the student gives bitwise-equal
// logits. BLAS gives no such promise: on AVX2 builds MKL rounded the same one-row product from
// two different buffers differently (measured).
template <typename acc_t>
void row_scores(acc_t alpha, const acc_t* x, const KeyOperand<acc_t>& y, acc_t* s) {
  if (y.transposed_copy) {  // y.data: Dy rows of ld, row d holds component d of every key
    std::fill(s, s + y.N, acc_t(0));
    for (int64_t d = 0; d < y.Dy; ++d) {
      const acc_t xd = x[d];
      const acc_t* yd = y.data + d * y.ld;
      for (int64_t j = 0; j < y.N; ++j) s[j] += xd * yd[j];
    }
  } else {  // y.data: N rows of ld, row j holds key j
    for (int64_t j = 0; j < y.N; ++j) {
      const acc_t* yj = y.data + j * y.ld;
      acc_t dot = 0;
      for (int64_t d = 0; d < y.Dy; ++d) dot += x[d] * yj[d];
      s[j] = dot;
    }
  }
  for (int64_t j = 0; j < y.N; ++j) s[j] *= alpha;
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
  if (t.cls_rows)
    row_scores(t.scale, TQ, tk, st);  // mr = 1; equal to the student's, see row_scores
  else
    score_gemm(mr, t.scale, TQ, tk, st);
  if (mask.on())
    for (int64_t r = 0; r < mr; ++r) mask.apply_row(st + r * N, N, b, h, i0 + r);
}

// The student's logits of the matched rows, into sl (mr x N). For every row they are the score
// tile S (row stride ld) itself (copied: the softmax overwrites S). For the CLS row they are
// recomputed by row_scores, as the teacher's are, so a teacher that is a copy of the student
// gives bitwise-equal logits and a loss of exactly 0. The mask is applied as to S.
template <typename scalar_t, typename acc_t>
void student_match_logits(const Teacher<scalar_t, acc_t>& t, const MaskView<scalar_t>& mask,
                          int64_t b, int64_t h, const acc_t* S, int64_t ld, const acc_t* Q,
                          const KeyOperand<acc_t>& K, int64_t mr, int64_t N, acc_t scale,
                          acc_t* sl) {
  if (t.cls_rows) {
    row_scores(scale, Q, K, sl);
    if (mask.on()) mask.apply_row(sl, N, b, h, 0);
  } else {
    for (int64_t r = 0; r < mr; ++r) std::copy(S + r * ld, S + r * ld + N, sl + r * N);
  }
}

// What a forward or backward call applies besides plain attention: a mask and dropout.
template <typename scalar_t>
struct AttentionExtras {
  MaskView<scalar_t> mask;
  DropoutStream dropout;
  scalar_t* dmask = nullptr;  // backward only: (B, H, N, N) gradient of a float mask, or null
};

// Query block [i0, i0 + m) of head h of batch element b; bh = b * H + h indexes the (B, H) heads.
struct QueryBlock {
  int64_t b, h, bh, i0, m;
  // Index of the block's first row in the (B, H, N) row space (lse, dropout stream, maps).
  int64_t row0(int64_t N) const { return bh * N + i0; }
};

// The forward's tensors, contiguous: q, k, v, out (B, H, N, D); lse (B, H, N); maps in the
// shape of the export (null for none).
template <typename scalar_t, typename acc_t>
struct ForwardTensors {
  const scalar_t *q, *k, *v;
  scalar_t* out;
  acc_t* lse;
  scalar_t* maps;
};

// The backward's tensors, contiguous: dout, q, k, v, out, dq, dk, dv (B, H, N, D); lse, dlse
// (B, H, N); dmaps in the shape of the export. dout, dlse and dmaps may each be null (no
// gradient reaches that output).
template <typename scalar_t, typename acc_t>
struct BackwardTensors {
  const scalar_t *dout, *q, *k, *v, *out;
  const acc_t *lse, *dlse;
  const scalar_t* dmaps;
  scalar_t *dq, *dk, *dv;
};

// A tensor's data, or null for an undefined tensor (an input that was not given).
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename scalar_t, typename acc_t>
BackwardTensors<scalar_t, acc_t> backward_tensors(const at::Tensor& dout, const at::Tensor& q,
                                                  const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& out, const at::Tensor& lse,
                                                  const at::Tensor& dlse, const at::Tensor& dmaps,
                                                  at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  return {data_or_null<scalar_t>(dout), q.const_data_ptr<scalar_t>(),
          k.const_data_ptr<scalar_t>(),  v.const_data_ptr<scalar_t>(),
          out.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
          data_or_null<acc_t>(dlse),     data_or_null<scalar_t>(dmaps),
          dq.data_ptr<scalar_t>(),       dk.data_ptr<scalar_t>(),
          dv.data_ptr<scalar_t>()};
}

// What one call computes besides its tensors: shapes, logit scale, export, mask and dropout, and
// the teacher of attention_match (null for plain attention).
template <typename scalar_t, typename acc_t>
struct AttentionCall {
  Dims d;
  acc_t scale;
  ExportKind kind;
  const AttentionExtras<scalar_t>& extras;
  const Teacher<scalar_t, acc_t>* teacher;
  int64_t block_rows() const { return query_block_rows(d.N); }
  int64_t blocks() const { return (d.N + block_rows() - 1) / block_rows(); }
};

// How the forward splits into tasks. head_mean sums P over heads: a task is one query block of
// every head, in head order. key_mean sums P over every query row of a head: a task is a whole
// head, its query blocks in order. Both then sum without atomics in the same order on every run.
// Otherwise a task is one query block of one head.
struct ForwardTaskSplit {
  bool all_heads, whole_heads;
  int64_t B, H, nqb;
  int64_t count() const { return all_heads ? B * nqb : whole_heads ? B * H : B * H * nqb; }
  // Task t's batch element b, heads [h_begin, h_end) and query blocks [qb_begin, qb_end).
  struct Task {
    int64_t b, h_begin, h_end, qb_begin, qb_end;
  };
  Task task(int64_t t) const {
    if (whole_heads) return {t / H, t % H, t % H + 1, 0, nqb};
    const int64_t qb = t % nqb;
    if (all_heads) return {t / nqb, 0, H, qb, qb + 1};
    return {t / nqb / H, (t / nqb) % H, (t / nqb) % H + 1, qb, qb + 1};
  }
};

// One forward worker's buffers, in acc_t.
template <typename acc_t>
struct ForwardScratch {
  at::Tensor s_buf, mean_buf, cvt_buf, bits_buf, t_buf;
  int64_t ld;      // row stride of S: N, or more where a kernel pads its products' outputs
  acc_t* S;        // (bq x ld) the block's scores, then its unnormalised exp rows
  acc_t* inv_sum;  // (bq) 1 / row sum of exp
  acc_t* M;        // head_mean: (bq x N) the sum of P over heads; key_mean: (N) column sums
  acc_t* K;        // the head's key operand (key_operand_elems)
  acc_t* V;        // bf16 only: the head's values in float (N x D)
  acc_t* Q;        // bf16 only: the block's queries in float (bq x D)
  acc_t* O;        // bf16 only: the block's output in float (bq x D)
  uint64_t* keep;  // dropout: the keep bits of one query block (its rows are consecutive)
  acc_t* TK;       // teacher: its key operand (Dt x N)
  acc_t* TQ;       // teacher: its query rows (bq x Dt)
  acc_t* St;       // teacher: its logits (bq x N)
  acc_t* SL;       // teacher: a copy of the student's logits (bq x N)

  template <typename scalar_t>
  ForwardScratch(const AttentionCall<scalar_t, acc_t>& c, const ForwardTaskSplit& split,
                 int64_t ld_scores = 0) {
    const int64_t N = c.d.N, D = c.d.D, bq = c.block_rows();
    ld = ld_scores > 0 ? ld_scores : N;
    s_buf = scratch<acc_t>(bq * ld + bq);
    mean_buf = scratch<acc_t>(split.all_heads ? bq * N : split.whole_heads ? N : 0);
    const int64_t kel = key_operand_elems(N, D);
    cvt_buf = scratch<acc_t>(kel + N * D + 2 * bq * D);
    bits_buf = at::empty({c.extras.dropout.on ? keep_bits_words(bq * N) : 1}, at::kLong);
    S = s_buf.data_ptr<acc_t>();
    inv_sum = S + bq * ld;
    M = mean_buf.data_ptr<acc_t>();
    K = cvt_buf.data_ptr<acc_t>();
    V = K + kel;
    Q = V + N * D;
    O = Q + bq * D;
    keep = reinterpret_cast<uint64_t*>(bits_buf.data_ptr<int64_t>());
    const int64_t Dt = c.teacher ? c.teacher->Dt : 0;
    const int64_t tkel = c.teacher ? key_operand_elems(N, Dt) : 0;
    t_buf = scratch<acc_t>(c.teacher ? tkel + bq * Dt + 2 * bq * N : 0);
    TK = t_buf.data_ptr<acc_t>();
    TQ = TK + tkel;
    St = TQ + bq * Dt;
    SL = St + bq * N;
  }
};

// How the teacher's loss of a block is reduced in the forward.
struct TeacherRowPlan {
  int64_t rows;  // matched rows of the block
  // The loss reads only logits (logit MSE), no LSE.
  bool logits_only;
  // Every-row KL and logit MSE reduce their loss from the raw logits still in S, before the
  // softmax overwrites them, so S needs no copy (see match_rows.h).
  bool from_scores;
  // Every-row KL: the student's softmax and the divergence in one pass per row.
  bool kl_in_softmax() const { return from_scores && !logits_only; }
};

template <typename scalar_t, typename acc_t>
TeacherRowPlan teacher_row_plan(const Teacher<scalar_t, acc_t>* t, const QueryBlock& blk) {
  if (!t) return {0, false, false};
  return {t->rows_in_block(blk.i0, blk.m), t->kind == MatchKind::MseLogits,
          !t->cls_rows && t->kind != MatchKind::MseProbs};
}

// The teacher's share of a block's scores, once S holds the student's masked logits and St the
// teacher's (matched rows): the logit-MSE loss straight from S, or a copy of the student's
// logits for the forms reduced after the softmax. Q and K are read for the CLS row only.
template <typename scalar_t, typename acc_t>
void forward_teacher_scores(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                            const TeacherRowPlan& plan, const acc_t* Q,
                            const KeyOperand<acc_t>& K, ForwardScratch<acc_t>& ws) {
  const int64_t N = c.d.N;
  const Teacher<scalar_t, acc_t>& t = *c.teacher;
  const acc_t* S = ws.S;
  if (plan.from_scores && plan.logits_only) {  // needs no LSE
    for (int64_t r = 0; r < plan.rows; ++r) {
      const int64_t ri = t.row_index(blk.bh, N, blk.i0) + r;
      t.lse[ri] = acc_t(0);
      t.row_loss[ri] =
          match_loss_row(t.kind, S + r * ws.ld, acc_t(0), ws.St + r * N, acc_t(0), N);
    }
  } else if (!plan.from_scores) {
    student_match_logits(t, c.extras.mask, blk.b, blk.h, S, ws.ld, Q, K, plan.rows, N, c.scale,
                         ws.SL);
  }
}

// The mask on the block's score rows (row stride ld).
template <typename scalar_t, typename acc_t>
void mask_scores(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk, acc_t* S,
                 int64_t ld) {
  const MaskView<scalar_t>& mask = c.extras.mask;
  if (mask.on())
    for (int64_t i = 0; i < blk.m; ++i)
      mask.apply_row(S + i * ld, c.d.N, blk.b, blk.h, blk.i0 + i);
}

// S = scale * Q K^T (m x N), masked. With a teacher: its logits St of the matched rows, and the
// logit-MSE loss from S, or a copy of the student's logits for the forms reduced after the
// softmax.
template <typename scalar_t, typename acc_t>
void forward_scores(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                    const TeacherRowPlan& plan, const acc_t* Q, const KeyOperand<acc_t>& K,
                    ForwardScratch<acc_t>& ws) {
  const int64_t N = c.d.N;
  TORCH_INTERNAL_ASSERT(ws.ld == N, "the float kernels' score tiles have row stride N");
  score_gemm(blk.m, c.scale, Q, K, ws.S);
  mask_scores(c, blk, ws.S, N);
  if (plan.rows == 0) return;
  const Teacher<scalar_t, acc_t>& t = *c.teacher;
  const KeyOperand<acc_t> TK = key_operand(t.k + blk.bh * N * t.Dt, N, t.Dt, ws.TK);
  teacher_logits(t, c.extras.mask, blk.b, blk.h, blk.bh, N, blk.i0, plan.rows, TK, ws.TQ, ws.St);
  forward_teacher_scores(c, blk, plan, Q, K, ws);
}

// Rows of S become exp(S - rowmax), unnormalised; the block's lse and 1 / row sum. Every-row KL
// takes its matched rows through the fused softmax-and-divergence pass.
template <typename scalar_t, typename acc_t>
void forward_softmax(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                     const TeacherRowPlan& plan, acc_t* lse, ForwardScratch<acc_t>& ws) {
  const int64_t N = c.d.N, row0 = blk.row0(N);
  acc_t* S = ws.S;
  const int64_t kl_rows = plan.kl_in_softmax() ? plan.rows : 0;
  for (int64_t r = 0; r < kl_rows; ++r) {
    const Teacher<scalar_t, acc_t>& t = *c.teacher;
    const int64_t ri = t.row_index(blk.bh, N, blk.i0) + r;
    acc_t mx, sum;
    const acc_t cross = kl_softmax_row(S + r * ws.ld, ws.St + r * N, N, &mx, &sum, &t.lse[ri]);
    const acc_t row_lse = mx + std::log(sum);
    lse[row0 + r] = row_lse;
    // A fully masked row (sum 0): P's row is 0 and the row's loss 0.
    ws.inv_sum[r] = sum > acc_t(0) ? acc_t(1) / sum : acc_t(0);
    t.row_loss[ri] = sum > acc_t(0) ? cross - t.lse[ri] + row_lse : acc_t(0);
  }
  for (int64_t i = kl_rows; i < blk.m; ++i) {
    acc_t mx;
    const acc_t sum = exp_row(S + i * ws.ld, N, &mx);
    // A fully masked row (max -inf) has sum 0: lse -inf, and P, out and maps rows 0.
    lse[row0 + i] = mx + std::log(sum);
    ws.inv_sum[i] = sum > acc_t(0) ? acc_t(1) / sum : acc_t(0);
  }
}

// The matched rows' losses that are reduced after the softmax (probability MSE, the CLS row):
// from the student's logits copy SL and the teacher's St, each over the row's matched keys.
template <typename scalar_t, typename acc_t>
void forward_teacher_losses(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                            const TeacherRowPlan& plan, const acc_t* lse,
                            const ForwardScratch<acc_t>& ws) {
  if (plan.from_scores) return;
  const int64_t N = c.d.N;
  for (int64_t r = 0; r < plan.rows; ++r) {
    const Teacher<scalar_t, acc_t>& t = *c.teacher;
    const int64_t j0 = t.key0(), n = N - j0, ri = t.row_index(blk.bh, N, blk.i0) + r;
    const acc_t* ss = ws.SL + r * N + j0;
    const acc_t* st = ws.St + r * N + j0;
    const acc_t slse = plan.logits_only ? acc_t(0)
                       : j0 == 0        ? lse[blk.row0(N) + r]
                                        : logsumexp_row(ss, n);
    const acc_t tlse = plan.logits_only ? acc_t(0) : logsumexp_row(st, n);
    t.lse[ri] = tlse;
    // Every matched key masked: slse is -inf and the row's loss 0.
    const bool dead = slse == -std::numeric_limits<acc_t>::infinity();
    t.row_loss[ri] = dead ? acc_t(0) : match_loss_row(t.kind, ss, slse, st, tlse, n);
  }
}

// The maps are P before dropout: written from the unnormalised rows and 1 / sum. head_mean
// and key_mean gather their sums in ws.M (scaled by the task once its heads or blocks are done).
template <typename scalar_t, typename acc_t>
void forward_export(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                    scalar_t* maps, ForwardScratch<acc_t>& ws) {
  const int64_t N = c.d.N, m = blk.m;
  const acc_t* S = ws.S;
  const acc_t* inv_sum = ws.inv_sum;
  switch (c.kind) {
    case ExportKind::Full:
      for (int64_t i = 0; i < m; ++i)
        scale_row(maps + (blk.row0(N) + i) * N, S + i * ws.ld, N, inv_sum[i]);
      break;
    case ExportKind::Cls:
      if (blk.i0 == 0) scale_row(maps + blk.bh * N, S, N, inv_sum[0]);
      break;
    case ExportKind::HeadMean:
      // Sum of P over heads in head order; divided by H once the task's heads are done.
      for (int64_t i = 0; i < m; ++i) {
        if (blk.h == 0) {
          scale_row(ws.M + i * N, S + i * ws.ld, N, inv_sum[i]);
        } else {
          axpy_row(ws.M + i * N, S + i * ws.ld, N, inv_sum[i]);
        }
      }
      break;
    case ExportKind::KeyMean:
      // Column sums of P over the head's query rows, in row order; divided by N at the end.
      for (int64_t i = 0; i < m; ++i) axpy_row(ws.M, S + i * ws.ld, N, inv_sum[i]);
      break;
    default: break;
  }
}

// Dropout on the block's exp rows (after the maps, which are P before dropout).
template <typename scalar_t, typename acc_t>
void forward_dropout(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                     ForwardScratch<acc_t>& ws) {
  const DropoutStream& drop = c.extras.dropout;
  if (!drop.on) return;
  const int64_t N = c.d.N;
  const uint64_t e0 = uint64_t(blk.row0(N) * N);
  drop.keep_bits(e0, blk.m * N, ws.keep);
  for (int64_t i = 0; i < blk.m; ++i)
    drop.apply(ws.S + i * ws.ld, N, ws.keep, int64_t(e0 & 3) + i * N);
}

// O = diag(1/sum) E V (m x D): normalising the D-wide output, not the N-wide row.
template <typename scalar_t, typename acc_t>
void forward_attend(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                    const acc_t* V, acc_t* O, ForwardScratch<acc_t>& ws) {
  const int64_t N = c.d.N, D = c.d.D, m = blk.m;
  score_gemm_nn<acc_t>(m, D, N, acc_t(1), ws.S, ws.ld, V, D, O, D);
  for (int64_t i = 0; i < m; ++i) scale_row(O + i * D, O + i * D, D, ws.inv_sum[i]);
}

// The row passes of a block once ws.S holds its masked logits (and, with a teacher, St and SL
// those forward_teacher_scores leaves): the softmax (lse, 1 / row sum), the teacher's losses,
// the maps, dropout. The bf16 kernels' forward runs these between their two products.
template <typename scalar_t, typename acc_t>
void forward_rows(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                  const TeacherRowPlan& plan, acc_t* lse, scalar_t* maps,
                  ForwardScratch<acc_t>& ws) {
  forward_softmax(c, blk, plan, lse, ws);
  forward_teacher_losses(c, blk, plan, lse, ws);
  forward_export(c, blk, maps, ws);
  forward_dropout(c, blk, ws);
}

// Forward of one query block of one head: scores, softmax, the teacher's losses, maps, output.
template <typename scalar_t, typename acc_t>
void forward_block(const AttentionCall<scalar_t, acc_t>& c,
                   const ForwardTensors<scalar_t, acc_t>& t,
                   const QueryBlock& blk, ForwardScratch<acc_t>& ws) {
  const int64_t N = c.d.N, D = c.d.D, hd = N * D, bh = blk.bh, i0 = blk.i0, m = blk.m;
  const KeyOperand<acc_t> K = key_operand(t.k + bh * hd, N, D, ws.K);
  const acc_t* V = tile_as_acc(t.v + bh * hd, hd, ws.V);
  const acc_t* Q = tile_as_acc(t.q + bh * hd + i0 * D, m * D, ws.Q);
  acc_t* O = out_tile(t.out + bh * hd + i0 * D, ws.O);
  const TeacherRowPlan plan = teacher_row_plan(c.teacher, blk);
  forward_scores(c, blk, plan, Q, K, ws);
  forward_rows(c, blk, plan, t.lse, t.maps, ws);
  forward_attend(c, blk, V, O, ws);
  store_tile(t.out + bh * hd + i0 * D, O, m * D);
}

// The float kernels' forward worker: its buffers and the block step (forward_block).
template <typename scalar_t, typename acc_t>
struct ForwardWorker {
  ForwardScratch<acc_t> ws;
  ForwardWorker(const AttentionCall<scalar_t, acc_t>& c, const ForwardTaskSplit& split)
      : ws(c, split) {}
  void block(const AttentionCall<scalar_t, acc_t>& c, const ForwardTensors<scalar_t, acc_t>& t,
             const QueryBlock& blk) {
    forward_block(c, t, blk, ws);
  }
};

// Runs the forward's tasks on torch's threads, one Worker (buffers and block step) per thread.
template <typename Worker, typename scalar_t, typename acc_t>
void run_forward_tasks(const ForwardTensors<scalar_t, acc_t>& t,
                       const AttentionCall<scalar_t, acc_t>& c) {
  const int64_t H = c.d.H, N = c.d.N, bq = c.block_rows();
  const ForwardTaskSplit split{c.kind == ExportKind::HeadMean, c.kind == ExportKind::KeyMean,
                               c.d.B, H, c.blocks()};
  TaskQueue queue(split.count());
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_guard;
    Worker worker(c, split);
    acc_t* M = worker.ws.M;
    for (int64_t ti; queue.next(&ti);) {
      const ForwardTaskSplit::Task task = split.task(ti);
      const int64_t b = task.b;
      if (split.whole_heads) std::fill(M, M + N, acc_t(0));
      for (int64_t qb = task.qb_begin; qb < task.qb_end; ++qb) {
        const int64_t i0 = qb * bq, m = std::min(bq, N - i0);
        for (int64_t h = task.h_begin; h < task.h_end; ++h)
          worker.block(c, t, QueryBlock{b, h, b * H + h, i0, m});
        if (split.all_heads) scale_row(t.maps + (b * N + i0) * N, M, m * N, acc_t(1) / acc_t(H));
      }
      if (split.whole_heads)
        scale_row(t.maps + (b * H + task.h_begin) * N, M, N, acc_t(1) / acc_t(N));
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_impl(const ForwardTensors<scalar_t, acc_t>& t,
                  const AttentionCall<scalar_t, acc_t>& c) {
  run_forward_tasks<ForwardWorker<scalar_t, acc_t>>(t, c);
}

// One backward worker's buffers, in acc_t.
template <typename acc_t>
struct BackwardScratch {
  at::Tensor s_buf, cvt_buf, t_buf, bits_buf;
  int64_t ld;    // row stride of P and dP: N, or more where a kernel pads its products' outputs
  acc_t* P;      // (bq x ld) the block's logits, then P, then P after dropout
  acc_t* dP;     // (bq x ld) dO V^T, then dS
  acc_t* g_row;  // (N) one row of the map gradient in acc_t
  acc_t* K;      // the head's key operand of K, then of V (key_operand_elems each)
  acc_t* V;
  // bf16 only, in float: the head's K, dK, dV (N x D each), the block's Q, dO, O, dQ (bq x D).
  acc_t* K_rows;
  acc_t* dK;
  acc_t* dV;
  acc_t* Q;
  acc_t* dO;
  acc_t* O;
  acc_t* dQ;
  acc_t* TK;  // teacher (its loss has a gradient): its key operand, query rows (bq x Dt),
  acc_t* TQ;  // logits St (bq x N; match_grad_row turns them in place into the loss gradient
  acc_t* St;  // with respect to the student's logits) and the student's CLS-row logits SL
  acc_t* SL;  // (see student_match_logits)
  uint64_t* keep;  // dropout: the keep bits of one query block, regenerated

  template <typename scalar_t>
  explicit BackwardScratch(const AttentionCall<scalar_t, acc_t>& c, int64_t ld_scores = 0) {
    constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;
    const int64_t N = c.d.N, D = c.d.D, hd = N * D, bq = c.block_rows();
    ld = ld_scores > 0 ? ld_scores : N;
    s_buf = scratch<acc_t>(2 * bq * ld + N);
    const int64_t kel = key_operand_elems(N, D);
    cvt_buf = scratch<acc_t>(2 * kel + (kConvert ? 3 * hd + 4 * bq * D : 0));
    P = s_buf.data_ptr<acc_t>();
    dP = P + bq * ld;
    g_row = dP + bq * ld;
    K = cvt_buf.data_ptr<acc_t>();
    V = K + kel;
    K_rows = V + kel;
    dK = K_rows + hd;
    dV = dK + hd;
    Q = dV + hd;
    dO = Q + bq * D;
    O = dO + bq * D;
    dQ = O + bq * D;
    const bool match = c.teacher && c.teacher->drow_loss;
    const int64_t Dt = match ? c.teacher->Dt : 0;
    const int64_t tkel = match ? key_operand_elems(N, Dt) : 0;
    t_buf = scratch<acc_t>(match ? tkel + bq * Dt + bq * N + N : 0);
    TK = t_buf.data_ptr<acc_t>();
    TQ = TK + tkel;
    St = TQ + bq * Dt;
    SL = St + bq * N;
    bits_buf = at::empty({c.extras.dropout.on ? keep_bits_words(bq * N) : 1}, at::kLong);
    keep = reinterpret_cast<uint64_t*>(bits_buf.data_ptr<int64_t>());
  }
};

// The operands of one head in acc_t: the key operands of K and V for the score GEMMs, K's rows
// for dQ = dS K, and where dK, dV accumulate.
template <typename acc_t>
struct BackwardHead {
  KeyOperand<acc_t> K_op, V_op, TK_op;
  const acc_t* K;
  acc_t* dK;
  acc_t* dV;
};

// The operands of one query block in acc_t (inputs converted for bf16, else the inputs).
template <typename acc_t>
struct BackwardBlock {
  const acc_t* Q;
  const acc_t* dO;  // null without dout
  const acc_t* O;   // null without dout
  acc_t* dQ;
};

// Whether the teacher's loss gradient is folded into the softmax backward's row pass (every-row
// KL and logit MSE, match_rows.h); the other forms turn St into the gradient first. No op passes
// both a teacher and a map gradient; the map path expects St to hold the gradient, so it is kept
// off the folded path.
template <typename scalar_t, typename acc_t>
bool teacher_grad_in_row_pass(const AttentionCall<scalar_t, acc_t>& c, bool has_dmaps) {
  const Teacher<scalar_t, acc_t>* t = c.teacher;
  return t && t->drow_loss && !has_dmaps && !t->cls_rows && t->kind != MatchKind::MseProbs;
}

// The teacher's loss gradient with respect to the student's logits of the block's mr matched
// rows, into St, from the logits still in P (CLS row: recomputed into SL).
template <typename scalar_t, typename acc_t>
void teacher_logit_grads(const AttentionCall<scalar_t, acc_t>& c, const QueryBlock& blk,
                         int64_t mr, const acc_t* lse, const acc_t* Q,
                         const BackwardHead<acc_t>& head, BackwardScratch<acc_t>& ws) {
  const Teacher<scalar_t, acc_t>& t = *c.teacher;
  const int64_t N = c.d.N;
  acc_t* St = ws.St;
  const acc_t* student = ws.P;
  int64_t ld = ws.ld;
  if (t.cls_rows) {
    student_match_logits(t, c.extras.mask, blk.b, blk.h, ws.P, ws.ld, Q, head.K_op, mr, N,
                         c.scale, ws.SL);
    student = ws.SL;
    ld = N;
  }
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t j0 = t.key0(), n = N - j0, ri = t.row_index(blk.bh, N, blk.i0) + r;
    const acc_t* ss = student + r * ld + j0;
    const acc_t slse = t.kind == MatchKind::MseLogits ? acc_t(0)
                       : j0 == 0                      ? lse[blk.row0(N) + r]
                                                      : logsumexp_row(ss, n);
    if (slse == -std::numeric_limits<acc_t>::infinity()) {
      std::fill(St + r * N, St + (r + 1) * N, acc_t(0));  // fully masked: no gradient
      continue;
    }
    match_grad_row(t.kind, ss, slse, St + r * N + j0, t.lse[ri], n, t.drow_loss[ri]);
    if (j0 == 1) St[r * N] = acc_t(0);  // the CLS row's own key is not matched
  }
}

// The row of the maps' gradient that query row i of the block receives (null where the export
// does not involve the row), and the factor the export applied to P: head_mean divides by H,
// key_mean by N (every query row contributes P_ij / N to key j's mean).
template <typename scalar_t, typename acc_t>
struct MapGradRow {
  const scalar_t* g;
  acc_t g_scale;
};

template <typename scalar_t, typename acc_t>
MapGradRow<scalar_t, acc_t> map_grad_row(const scalar_t* dmaps, ExportKind kind, const Dims& d,
                                         const QueryBlock& blk, int64_t i) {
  const int64_t N = d.N;
  if (!dmaps) return {nullptr, acc_t(1)};
  switch (kind) {
    case ExportKind::Full: return {dmaps + (blk.row0(N) + i) * N, acc_t(1)};
    case ExportKind::HeadMean: return {dmaps + (blk.b * N + blk.i0 + i) * N, acc_t(1) / acc_t(d.H)};
    case ExportKind::Cls: return {blk.i0 + i == 0 ? dmaps + blk.bh * N : nullptr, acc_t(1)};
    case ExportKind::KeyMean: return {dmaps + blk.bh * N, acc_t(1) / acc_t(N)};
    default: return {nullptr, acc_t(1)};
  }
}

// The softmax backward of query row i of the block: P's row from the logits, dS from dP (and
// the map gradient, the teacher's logit gradient and the LSE gradient), in place in P and dP.
template <typename scalar_t, typename acc_t>
void backward_row(const AttentionCall<scalar_t, acc_t>& c,
                  const BackwardTensors<scalar_t, acc_t>& t,
                  const QueryBlock& blk, const BackwardBlock<acc_t>& ops, int64_t i, int64_t mr,
                  bool teacher_in_row, BackwardScratch<acc_t>& ws) {
  const int64_t N = c.d.N, D = c.d.D, row = blk.row0(N) + i;
  const DropoutStream& drop = c.extras.dropout;
  const Teacher<scalar_t, acc_t>* teacher = c.teacher;
  const acc_t scale = c.scale;
  acc_t* Pi = ws.P + i * ws.ld;
  acc_t* dPi = ws.dP + i * ws.ld;
  scalar_t* dmask_row = c.extras.dmask ? c.extras.dmask + row * N : nullptr;
  if (t.lse[row] == -std::numeric_limits<acc_t>::infinity()) {
    // Every key masked: P's row is 0, so the row adds nothing to any gradient.
    std::fill(Pi, Pi + N, acc_t(0));
    std::fill(dPi, dPi + N, acc_t(0));
    if (dmask_row) std::fill(dmask_row, dmask_row + N, scalar_t(0));
    return;
  }
  // Dropout: dP = (dO V^T) * keep / (1 - p); P itself is dropped after the row pass.
  const int64_t keep_bit0 = int64_t(uint64_t(blk.row0(N) * N) & 3) + i * N;
  if (drop.on) drop.apply(dPi, N, ws.keep, keep_bit0);
  // delta_i = sum_j P_ij dP_ij = dO_i . O_i (+ the map's share), minus the LSE gradient.
  acc_t delta = (ops.dO ? dot_row(ops.dO + i * D, ops.O + i * D, D) : acc_t(0)) -
                (t.dlse ? t.dlse[row] : acc_t(0));
  const auto map = map_grad_row<scalar_t, acc_t>(t.dmaps, c.kind, c.d, blk, i);
  // With a mask gradient the row pass makes dL/d(logits) (scale 1), which is the float mask's
  // gradient itself, and dS = scale * that follows; dividing dS by the scale instead would give
  // NaN at scale 0.
  const acc_t row_scale = dmask_row ? acc_t(1) : scale;
  if (map.g) {
    delta += exp_add_grad_row(Pi, dPi, tile_as_acc(map.g, N, ws.g_row), N, t.lse[row], map.g_scale);
    softmax_grad_from_p_row(Pi, dPi, N, delta, row_scale);
    if (i < mr) axpy_row(dPi, ws.St + i * N, N, row_scale);
  } else if (i < mr && teacher_in_row) {
    const int64_t ri = teacher->row_index(blk.bh, N, blk.i0) + i;
    if (teacher->kind == MatchKind::KL) {
      softmax_grad_kl_row(Pi, dPi, ws.St + i * N, N, t.lse[row], delta, row_scale,
                          teacher->lse[ri], teacher->drow_loss[ri]);
    } else {
      softmax_grad_mse_logits_row(Pi, dPi, ws.St + i * N, N, t.lse[row], delta, row_scale,
                                  teacher->drow_loss[ri]);
    }
  } else if (i < mr) {
    // Matched row: dS = scale (P (dP - delta) + the matching loss's logit gradient).
    softmax_grad_row(Pi, dPi, N, t.lse[row], delta, row_scale, ws.St + i * N);
  } else {
    softmax_grad_row(Pi, dPi, N, t.lse[row], delta, row_scale);
  }
  // The float mask is added to the logits after the scale: its gradient is dL/d(logits).
  if (dmask_row) {
    convert_row(dmask_row, dPi, N);
    scale_row(dPi, dPi, N, scale);
  }
  if (drop.on) drop.apply(Pi, N, ws.keep, keep_bit0);  // dV = (P * keep / (1 - p))^T dO
}

// Backward of one query block: P and dP from the recomputed logits, the row passes, then
// dV += P^T dO, dQ = dS K, dK += dS^T Q (the first block of a head overwrites dK, dV).
template <typename scalar_t, typename acc_t>
void backward_block(const AttentionCall<scalar_t, acc_t>& c,
                    const BackwardTensors<scalar_t, acc_t>& t, const QueryBlock& blk,
                    const BackwardHead<acc_t>& head, BackwardScratch<acc_t>& ws) {
  const int64_t N = c.d.N, D = c.d.D, hd = N * D, bh = blk.bh, i0 = blk.i0, m = blk.m;
  const int64_t row0 = blk.row0(N);
  const bool accumulate = i0 > 0;  // the first block of a head overwrites dK, dV
  const BackwardBlock<acc_t> ops{
      tile_as_acc(t.q + bh * hd + i0 * D, m * D, ws.Q),
      t.dout ? tile_as_acc(t.dout + bh * hd + i0 * D, m * D, ws.dO) : nullptr,
      t.dout ? tile_as_acc(t.out + bh * hd + i0 * D, m * D, ws.O) : nullptr,
      out_tile(t.dq + bh * hd + i0 * D, ws.dQ)};
  // P holds the scaled, masked logits, dP = dO V^T; each row pass then makes P and dS.
  TORCH_INTERNAL_ASSERT(ws.ld == N, "the float kernels' score tiles have row stride N");
  score_gemm(m, c.scale, ops.Q, head.K_op, ws.P);
  mask_scores(c, blk, ws.P, N);
  const MaskView<scalar_t>& mask = c.extras.mask;
  const bool match = c.teacher && c.teacher->drow_loss;
  const int64_t mr = match ? c.teacher->rows_in_block(i0, m) : 0;
  const bool teacher_in_row = teacher_grad_in_row_pass(c, t.dmaps != nullptr);
  if (mr > 0)
    teacher_logits(*c.teacher, mask, blk.b, blk.h, bh, N, i0, mr, head.TK_op, ws.TQ, ws.St);
  if (mr > 0 && !teacher_in_row) teacher_logit_grads(c, blk, mr, t.lse, ops.Q, head, ws);
  if (ops.dO) {
    score_gemm(m, acc_t(1), ops.dO, head.V_op, ws.dP);
  } else {
    std::fill(ws.dP, ws.dP + m * N, acc_t(0));
  }
  const DropoutStream& drop = c.extras.dropout;
  if (drop.on) drop.keep_bits(uint64_t(row0 * N), m * N, ws.keep);  // the block's rows
  for (int64_t i = 0; i < m; ++i) backward_row(c, t, blk, ops, i, mr, teacher_in_row, ws);
  if (ops.dO) score_gemm_tn<acc_t>(N, D, m, acc_t(1), ws.P, N, ops.dO, D, accumulate, head.dV, D);
  score_gemm_nn<acc_t>(m, D, N, acc_t(1), ws.dP, N, head.K, D, ops.dQ, D);
  score_gemm_tn<acc_t>(N, D, m, acc_t(1), ws.dP, N, ops.Q, D, accumulate, head.dK, D);
  store_tile(t.dq + bh * hd + i0 * D, ops.dQ, m * D);
}

// The row passes of a block once ws.P holds its scaled, masked logits, ws.dP holds dO V^T
// (where dout is given) and, for the mr matched rows of a teacher, St holds its logits (folded
// into the row pass) or the loss gradient (teacher_logit_grads): dO and O widened for delta_i =
// dO_i . O_i, dropout's keep bits, then each row's softmax backward (P and dS in place). The
// bf16 kernels' backward runs these between their score products and their gradient products.
template <typename scalar_t, typename acc_t>
void backward_rows(const AttentionCall<scalar_t, acc_t>& c,
                   const BackwardTensors<scalar_t, acc_t>& t, const QueryBlock& blk,
                   BackwardScratch<acc_t>& ws, int64_t mr = 0, bool teacher_in_row = false) {
  const int64_t N = c.d.N, D = c.d.D, m = blk.m, off = blk.bh * N * D + blk.i0 * D;
  BackwardBlock<acc_t> ops{nullptr, nullptr, nullptr, nullptr};
  if (t.dout) {
    convert_row(ws.dO, t.dout + off, m * D);
    convert_row(ws.O, t.out + off, m * D);
    ops.dO = ws.dO;
    ops.O = ws.O;
  } else {
    std::fill(ws.dP, ws.dP + m * ws.ld, acc_t(0));
  }
  const DropoutStream& drop = c.extras.dropout;
  if (drop.on) drop.keep_bits(uint64_t(blk.row0(N) * N), m * N, ws.keep);
  for (int64_t i = 0; i < m; ++i) backward_row(c, t, blk, ops, i, mr, teacher_in_row, ws);
}

// The float kernels' backward worker: one head at a time, its key operands made once, then its
// query blocks in order (dK and dV accumulate over them).
template <typename scalar_t, typename acc_t>
struct BackwardWorker {
  const AttentionCall<scalar_t, acc_t>& c;
  BackwardScratch<acc_t> ws;
  explicit BackwardWorker(const AttentionCall<scalar_t, acc_t>& call) : c(call), ws(call) {}
  void head(const BackwardTensors<scalar_t, acc_t>& t, int64_t bh) {
    const int64_t H = c.d.H, N = c.d.N, D = c.d.D, hd = N * D, bq = c.block_rows();
    const Teacher<scalar_t, acc_t>* teacher = c.teacher;
    BackwardHead<acc_t> head;
    head.K_op = key_operand(t.k + bh * hd, N, D, ws.K);
    head.V_op = key_operand(t.v + bh * hd, N, D, ws.V);
    head.K = head.K_op.transposed_copy ? tile_as_acc(t.k + bh * hd, hd, ws.K_rows) : head.K_op.data;
    head.dK = out_tile(t.dk + bh * hd, ws.dK);
    head.dV = out_tile(t.dv + bh * hd, ws.dV);
    head.TK_op = teacher && teacher->drow_loss
                     ? key_operand(teacher->k + bh * N * teacher->Dt, N, teacher->Dt, ws.TK)
                     : KeyOperand<acc_t>{};
    for (int64_t i0 = 0; i0 < N; i0 += bq)
      backward_block(c, t, QueryBlock{bh / H, bh % H, bh, i0, std::min(bq, N - i0)}, head, ws);
    if (!t.dout) std::fill(head.dV, head.dV + hd, acc_t(0));
    store_tile(t.dk + bh * hd, head.dK, hd);
    store_tile(t.dv + bh * hd, head.dV, hd);
  }
};

// Backward tasks are whole heads, so dK and dV accumulate over the head's query blocks without
// races, in the same order on every run. One Worker per thread.
template <typename Worker, typename scalar_t, typename acc_t>
void run_backward_tasks(const BackwardTensors<scalar_t, acc_t>& t,
                        const AttentionCall<scalar_t, acc_t>& c) {
  TaskQueue queue(c.d.B * c.d.H);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_guard;
    Worker worker(c);
    for (int64_t bh; queue.next(&bh);) worker.head(t, bh);
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const BackwardTensors<scalar_t, acc_t>& t,
                   const AttentionCall<scalar_t, acc_t>& c) {
  run_backward_tasks<BackwardWorker<scalar_t, acc_t>>(t, c);
}

}  // namespace fastattnreg::cpu::kernels
