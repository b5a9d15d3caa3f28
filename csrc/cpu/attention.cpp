// CPU attention forward and backward with exact map export.
//
// Work split: a task is one query block of one head (or of every head, for "head_mean", so the
// head average is summed in a fixed order without atomics). A query block holds up to
// kTileElems / N rows, so its score tile S (rows x N) stays in L2 and the softmax is exact over
// the whole key range: no online rescaling is needed on the CPU. The GEMMs on the tiles go to
// BLAS (blas.h); the row passes (softmax, exp, softmax backward) are vectorised (rowops.h).
// Backward tasks are whole heads, so dK and dV accumulate over query blocks without races and
// every rerun sums in the same order (bitwise repeatable).
#include "attention.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "blas.h"
#include "rowops.h"

namespace fastattnreg::cpu {
namespace {

// Score-tile budget in elements (320 KiB of float): tile and its gradient fit the 2 MiB L2.
constexpr int64_t kTileElems = 80 * 1024;

// Rows per query block: as many as the budget allows, then balanced so no block is a sliver.
int64_t query_block_rows(int64_t n) {
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

// dst (cols x rows) = src (rows x cols)^T, converting the element type if needed. Used to hand
// K^T and V^T to BLAS as plain row-major operands: MKL runs Q K^T as a "no-transpose" product
// markedly faster than with a transposed operand on ViT tiles (perf at N = 65: the transposed
// kernel took 2.5x the time of the plain one for the same FLOPs).
template <typename Src, typename Dst>
void transpose(const Src* src, int64_t rows, int64_t cols, Dst* dst) {
  if constexpr (std::is_same_v<Src, float> && std::is_same_v<Dst, float>) {
    // ATen's register-blocked 16 x 16 transpose on AVX-512 (a plain loop elsewhere); the scalar
    // loop below took ~10% of the forward at N = 65 with its strided stores.
    at::vec::transpose_mxn<float>(src, cols, dst, rows, static_cast<int>(rows),
                                  static_cast<int>(cols));
  } else {
    constexpr int64_t kB = 16;  // 16 x 16 blocks keep both sides within a few cache lines
    for (int64_t r0 = 0; r0 < rows; r0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB);
      for (int64_t c0 = 0; c0 < cols; c0 += kB) {
        const int64_t c1 = std::min(cols, c0 + kB);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) dst[c * rows + r] = static_cast<Dst>(src[r * cols + c]);
      }
    }
  }
}

// Hands out task indices one at a time from a shared counter to torch's intra-op threads. ViT
// heads are short (tens of microseconds) and the two threads of this kind of machine do not run
// at equal speed, so a static split left one spinning at the barrier (libgomp ~10% in perf).
// Each task writes only its own outputs, so results do not depend on which thread ran it.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t tasks) : tasks_(tasks) {}
  // How many workers to start: one per thread, never more than there are tasks.
  int64_t workers() const {
    return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks_));
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

template <typename scalar_t, typename acc_t>
void forward_impl(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                  acc_t* lse, scalar_t* maps, Dims d, acc_t scale, ExportKind kind) {
  const int64_t B = d.B, H = d.H, N = d.N, D = d.D, hd = N * D;
  const int64_t bq = query_block_rows(N);
  const int64_t nqb = (N + bq - 1) / bq;
  const bool all_heads = kind == ExportKind::HeadMean;
  const int64_t tasks = all_heads ? B * nqb : B * H * nqb;
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;

  TaskQueue queue(tasks);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_guard;
    at::Tensor s_buf = scratch<acc_t>(bq * N + bq);
    at::Tensor mean_buf = scratch<acc_t>(all_heads ? bq * N : 0);
    // K^T of the head (D x N), and for bf16 V, the query block and its output in float.
    at::Tensor cvt_buf = scratch<acc_t>(2 * hd + 2 * bq * D);
    acc_t* S = s_buf.data_ptr<acc_t>();
    acc_t* inv_sum = S + bq * N;  // 1 / row sum of exp, per query row of the block
    acc_t* M = mean_buf.data_ptr<acc_t>();
    acc_t* cvt = cvt_buf.data_ptr<acc_t>();
    for (int64_t t; queue.next(&t);) {
      const int64_t qb = t % nqb, i0 = qb * bq, m = std::min(bq, N - i0);
      const int64_t b = all_heads ? t / nqb : t / nqb / H;
      const int64_t h_begin = all_heads ? 0 : (t / nqb) % H;
      const int64_t h_end = all_heads ? H : h_begin + 1;
      for (int64_t h = h_begin; h < h_end; ++h) {
        const int64_t bh = b * H + h;
        acc_t* Kt = cvt;
        transpose(k + bh * hd, N, D, Kt);
        const acc_t* V = tile_as_acc(v + bh * hd, hd, cvt + hd);
        const acc_t* Q = tile_as_acc(q + bh * hd + i0 * D, m * D, cvt + 2 * hd);
        acc_t* O = out_tile(out + bh * hd + i0 * D, cvt + 2 * hd + bq * D);
        // S = scale * Q K^T (m x N); rows become exp(S - rowmax), unnormalised.
        gemm_rm<acc_t>(false, false, m, N, D, scale, Q, D, Kt, N, acc_t(0), S, N);
        for (int64_t i = 0; i < m; ++i) {
          acc_t mx;
          const acc_t sum = exp_row(S + i * N, N, &mx);
          lse[bh * N + i0 + i] = mx + std::log(sum);
          inv_sum[i] = acc_t(1) / sum;
        }
        // O = diag(1/sum) E V  (m x D): normalising the D-wide output, not the N-wide row.
        gemm_rm<acc_t>(false, false, m, D, N, acc_t(1), S, N, V, D, acc_t(0), O, D);
        for (int64_t i = 0; i < m; ++i) scale_row(O + i * D, O + i * D, D, inv_sum[i]);
        store_tile(out + bh * hd + i0 * D, O, m * D);

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
        }
      }
      if (all_heads) scale_row(maps + (b * N + i0) * N, M, m * N, acc_t(1) / acc_t(H));
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                   const scalar_t* v, const scalar_t* out, const acc_t* lse, const acc_t* dlse,
                   const scalar_t* dmaps, scalar_t* dq, scalar_t* dk, scalar_t* dv, Dims d,
                   acc_t scale, ExportKind kind) {
  const int64_t H = d.H, N = d.N, D = d.D, hd = N * D;
  const int64_t bq = query_block_rows(N);
  const int64_t nqb = (N + bq - 1) / bq;
  constexpr bool kConvert = !std::is_same_v<acc_t, scalar_t>;

  TaskQueue queue(d.B * H);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_guard;
    at::Tensor s_buf = scratch<acc_t>(2 * bq * N + N);
    // K^T, V^T of the head (D x N) for the score GEMMs (see transpose()); for bf16 also K, dK,
    // dV of the head and Q, dO, O, dQ of the block, in float.
    at::Tensor cvt_buf = scratch<acc_t>(2 * hd + (kConvert ? 3 * hd + 4 * bq * D : 0));
    acc_t* P = s_buf.data_ptr<acc_t>();
    acc_t* dP = P + bq * N;
    acc_t* g_row = dP + bq * N;  // one row of the map gradient in acc_t
    acc_t* cvt = cvt_buf.data_ptr<acc_t>();
    for (int64_t bh; queue.next(&bh);) {
      const int64_t b = bh / H;
      acc_t* Kt = cvt;
      acc_t* Vt = cvt + hd;
      transpose(k + bh * hd, N, D, Kt);
      transpose(v + bh * hd, N, D, Vt);
      const acc_t* K = tile_as_acc(k + bh * hd, hd, cvt + 2 * hd);
      acc_t* dK = out_tile(dk + bh * hd, cvt + 3 * hd);
      acc_t* dV = out_tile(dv + bh * hd, cvt + 4 * hd);
      acc_t* blk = cvt + 5 * hd;
      for (int64_t qb = 0; qb < nqb; ++qb) {
        const int64_t i0 = qb * bq, m = std::min(bq, N - i0), row0 = bh * N + i0;
        const acc_t beta = qb == 0 ? acc_t(0) : acc_t(1);  // first block overwrites dK, dV
        const acc_t* Q = tile_as_acc(q + bh * hd + i0 * D, m * D, blk);
        const acc_t* dO = dout ? tile_as_acc(dout + bh * hd + i0 * D, m * D, blk + bq * D) : nullptr;
        const acc_t* O = dout ? tile_as_acc(out + bh * hd + i0 * D, m * D, blk + 2 * bq * D) : nullptr;
        acc_t* dQ = out_tile(dq + bh * hd + i0 * D, blk + 3 * bq * D);

        // P holds the scaled logits, dP = dO V^T; each row pass then makes P and dS from them.
        gemm_rm<acc_t>(false, false, m, N, D, scale, Q, D, Kt, N, acc_t(0), P, N);
        if (dO) {
          gemm_rm<acc_t>(false, false, m, N, D, acc_t(1), dO, D, Vt, N, acc_t(0), dP, N);
        } else {
          std::fill(dP, dP + m * N, acc_t(0));
        }
        for (int64_t i = 0; i < m; ++i) {
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
          }
          acc_t* Pi = P + i * N;
          acc_t* dPi = dP + i * N;
          if (g) {
            delta += exp_add_grad_row(Pi, dPi, tile_as_acc(g, N, g_row), N, lse[row0 + i], g_scale);
            softmax_grad_from_p_row(Pi, dPi, N, delta, scale);
          } else {
            softmax_grad_row(Pi, dPi, N, lse[row0 + i], delta, scale);
          }
        }
        if (dO) gemm_rm<acc_t>(true, false, N, D, m, acc_t(1), P, N, dO, D, beta, dV, D);
        gemm_rm<acc_t>(false, false, m, D, N, acc_t(1), dP, N, K, D, acc_t(0), dQ, D);
        gemm_rm<acc_t>(true, false, N, D, m, acc_t(1), dP, N, Q, D, beta, dK, D);
        store_tile(dq + bh * hd + i0 * D, dQ, m * D);
      }
      if (!dout) std::fill(dV, dV + hd, acc_t(0));
      store_tile(dk + bh * hd, dK, hd);
      store_tile(dv + bh * hd, dV, hd);
    }
  });
}

// Shape of the exported maps for q of shape (B, H, N, D).
std::vector<int64_t> maps_shape(const at::Tensor& q, ExportKind kind) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  switch (kind) {
    case ExportKind::Full: return {B, H, N, N};
    case ExportKind::HeadMean: return {B, N, N};
    case ExportKind::Cls: return {B, H, N};
    default: return {0};
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& v, double scale,
                                                             c10::string_view export_kind) {
  check_qkv_cpu(q, k, v);
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number; got ", scale);
  const ExportKind kind = parse_export(export_kind);
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  auto out = at::empty_like(qc, at::MemoryFormat::Contiguous);
  auto lse = at::empty({d.B, d.H, d.N}, q.options().dtype(acc_dtype(q.scalar_type())));
  auto maps = at::empty(maps_shape(q, kind), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_impl<scalar_t, acc_t>(qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
                                  vc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                  lse.data_ptr<acc_t>(), maps.data_ptr<scalar_t>(), d,
                                  static_cast<acc_t>(scale), kind);
  });
  return {out, lse, maps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const std::optional<at::Tensor>& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& dmaps, double scale,
    c10::string_view export_kind) {
  check_qkv_cpu(q, k, v);
  check_like(out, "out", q.sizes(), q.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number; got ", scale);
  const ExportKind kind = parse_export(export_kind);
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  const auto acc = acc_dtype(q.scalar_type());
  check_like(lse, "lse", {d.B, d.H, d.N}, acc);
  at::Tensor dout_c, dlse_c, dmaps_c;
  if (dout.has_value()) {
    check_like(*dout, "dout", q.sizes(), q.scalar_type());
    dout_c = dout->contiguous();
  }
  if (dlse.has_value()) {
    check_like(*dlse, "dlse", {d.B, d.H, d.N}, acc);
    dlse_c = dlse->contiguous();
  }
  if (dmaps.has_value()) {
    TORCH_CHECK_VALUE(kind != ExportKind::None, "dmaps was given but export is 'none'");
    check_like(*dmaps, "dmaps", maps_shape(q, kind), q.scalar_type());
    dmaps_c = dmaps->contiguous();
  }
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto lse_c = lse.contiguous(), out_c = out.contiguous();
  auto dq = at::empty_like(qc, at::MemoryFormat::Contiguous);
  auto dk = at::empty_like(kc, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(vc, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t, acc_t>(
        dout_c.defined() ? dout_c.const_data_ptr<scalar_t>() : nullptr,
        qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
        vc.const_data_ptr<scalar_t>(), out_c.const_data_ptr<scalar_t>(),
        lse_c.const_data_ptr<acc_t>(),
        dlse_c.defined() ? dlse_c.const_data_ptr<acc_t>() : nullptr,
        dmaps_c.defined() ? dmaps_c.const_data_ptr<scalar_t>() : nullptr, dq.data_ptr<scalar_t>(),
        dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), d, static_cast<acc_t>(scale), kind);
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(fastattnreg, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace fastattnreg::cpu
