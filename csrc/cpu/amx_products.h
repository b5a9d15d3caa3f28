// The AMX kernels' operands and products (attention_amx.h): oneDNN's batch-reduce GEMM
// micro-kernel through ATen (at::native::cpublas::brgemm) multiplies bf16 operands on the tile
// unit and accumulates in float. It takes A (M x K) as bf16 rows and B (K x N) as column pairs
// (bf16_pack.h, oneDNN's VNNI layout) and has no alpha. Every product's N side is padded to a
// multiple of 16 columns and its inner side to a multiple of 32 with zeros, which oneDNN's
// kernels run at their full rate; with a tail in both M and N they run at a tenth of it (23
// against 444 GFLOP/s on a 197 x 197 x 64 product, one thread, measured on a 2-core Xeon with
// AMX), and an inner side of 198 runs at half the rate of 224 (64 x 208 outputs).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "bf16_pack.h"
#include "rowops.h"

#ifdef __AVX512BF16__
namespace fastattnreg::cpu::amx {

using c10::BFloat16;

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }
// Words per row of an operand with inner length k: its bf16 pairs, padded to 16 (32 bf16, the
// depth of one AMX tile).
inline int64_t kwords(int64_t k) { return pad16(bf16::pairs(k)); }

// Room for bf16 operands in 32-bit words (two bf16 each), zeroed: the padded columns and pairs
// of every operand are never written, so they stay 0.
inline at::Tensor zeroed_words(int64_t words) {
  return at::zeros({std::max<int64_t>(words, 1)}, at::kInt);
}
inline uint32_t* words_of(at::Tensor& t) {
  return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>());
}
inline const BFloat16* as_bf16(const uint32_t* w) { return reinterpret_cast<const BFloat16*>(w); }

// C (m x n, ldc) = A B, or += where accumulate: A is m x 2 kp bf16 (kp words per row), B is kp x
// ldb words of column pairs, n and ldb multiples of 16, kp of 16.
inline void product(int64_t m, int64_t n, int64_t kp, const uint32_t* A, const uint32_t* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, 2 * kp, 2 * kp, ldb, ldc, accumulate, as_bf16(A), as_bf16(B),
                              C, /*is_vnni=*/true);
}

// Whether the softmax scale folds exactly into Q's bf16 rows: a power of two changes only their
// exponents.
inline bool scale_folds(float scale) {
  int e = 0;
  return std::isfinite(scale) && scale > 0.0f && std::frexp(scale, &e) == 0.5f;
}

// The A operand of S = scale Q K^T: Q's rows (m x D) padded to kwords(D) words, scaled where the
// scale folds.
inline const uint32_t* query_rows(const BFloat16* q, int64_t m, int64_t D, float scale,
                                  uint32_t* buf) {
  return scale_folds(scale) ? bf16::scaled_row_pairs(q, m, D, kwords(D), scale, buf)
                            : bf16::row_pairs(q, m, D, kwords(D), buf);
}

// The scale, where it did not fold into Q: S (m x n, ld) *= scale in place.
inline void scale_scores(float* S, int64_t m, int64_t n, int64_t ld, float scale) {
  if (scale_folds(scale)) return;
  for (int64_t i = 0; i < m; ++i) scale_row(S + i * ld, S + i * ld, n, scale);
}

// The first n of every ld_src columns of src (m rows), stored as bf16 rows of length n.
inline void store_rows(BFloat16* dst, const float* src, int64_t m, int64_t n, int64_t ld_src) {
  if (n == ld_src) return convert_row(dst, src, m * n);
  for (int64_t i = 0; i < m; ++i) convert_row(dst + i * n, src + i * ld_src, n);
}

// dst (n x m, ld ld_dst) = src^T for src (m x n, ld ld_src), in 16 x 16 tiles.
inline void transpose(const float* src, int64_t m, int64_t n, int64_t ld_src, float* dst,
                      int64_t ld_dst) {
  for (int64_t r0 = 0; r0 < m; r0 += 16)
    for (int64_t c0 = 0; c0 < n; c0 += 16)
      at::vec::transpose_mxn<float>(src + r0 * ld_src + c0, ld_src, dst + c0 * ld_dst + r0, ld_dst,
                                    static_cast<int>(std::min<int64_t>(16, m - r0)),
                                    static_cast<int>(std::min<int64_t>(16, n - c0)));
}

// The A operand X^T (n x kwords(m) words) of a product over X's rows, for X (m x n) bf16 rows:
// ATen's 32 x 32 transpose of 16-bit lanes, each row zero-padded past m.
inline void transposed_rows(const BFloat16* x, int64_t m, int64_t n, uint32_t* dst) {
  const int64_t ld = 2 * kwords(m);  // bf16 per row of dst
  BFloat16* out = reinterpret_cast<BFloat16*>(dst);
  for (int64_t r = 0; r < n; ++r)
    std::memset(static_cast<void*>(out + r * ld + m), 0, sizeof(BFloat16) * (ld - m));
  for (int64_t r0 = 0; r0 < m; r0 += 32)
    for (int64_t c0 = 0; c0 < n; c0 += 32)
      at::vec::transpose_mxn<BFloat16>(x + r0 * n + c0, n, out + c0 * ld + r0, ld,
                                       static_cast<int>(std::min<int64_t>(32, m - r0)),
                                       static_cast<int>(std::min<int64_t>(32, n - c0)));
}

// X (m x n, ld ld_src) as column pairs over its rows (kwords(m) x ld words): the pair rows past
// ceil(m / 2) zeroed, since a longer block may have written them.
inline void pairs_over_rows(const float* x, int64_t m, int64_t n, int64_t ld_src, uint32_t* dst,
                            int64_t ld) {
  bf16::column_pairs(x, m, n, ld_src, dst, ld);
  std::fill(dst + bf16::pairs(m) * ld, dst + kwords(m) * ld, 0u);
}

// The softmax of one score row (length n) straight into P's bf16 row (ld words, zero-padded):
// exp(s - max s), unnormalised, as exp_row computes it, rounded to bf16 without storing the
// float row. Returns the row sum (0 for a fully masked row, whose P row is 0) and sets *row_max.
FASTATTNREG_ROW_PASS
inline float exp_row_to_pairs(const float* s, int64_t n, uint32_t* p, int64_t ld,
                              float* row_max) {
  using V = at::vec::Vectorized<float>;
  const float mx = max_row(s, n);
  *row_max = mx;
  std::fill(p + n / 2, p + ld, 0u);
  BFloat16* out = reinterpret_cast<BFloat16*>(p);
  if (mx == -std::numeric_limits<float>::infinity()) {
    std::fill(p, p + bf16::pairs(n), 0u);
    return 0.0f;
  }
  const V vm(mx);
  V vsum(0.0f);
  for_each_vec<float>(n, [&](int64_t j, int64_t c) {
    const V e = V::set(V(0.0f), vexp(V::loadu(s + j, c) - vm), c);
    vsum = vsum + e;
    const __mmask16 k = c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << c) - 1u);
    _mm256_mask_storeu_epi16(out + j, k, (__m256i)_mm512_cvtneps_pbh(__m512(e)));
  });
  return hsum(vsum);
}

}  // namespace fastattnreg::cpu::amx
#endif  // __AVX512BF16__
