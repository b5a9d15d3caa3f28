// Operand layouts of the AVX512-BF16 products (score_gemm.h's Bf16PairDot). VDPBF16PS multiplies
// pairs of bf16 along the inner dim, so both operands hold their inner dim as 32-bit words of two
// consecutive bf16 (low half first), zero-padded to an even length:
//   row pairs     X (m x k) with the pairs along each row: bf16 row-major with an even row
//                 length is this layout already (row r, word p = elements 2p, 2p + 1);
//   column pairs  Y (k x n) with the pairs down each column: word (p, j) holds rows 2p and
//                 2p + 1 of column j, interleaved from two rows (ceil(k / 2) x n words).
// Conversions from float round to nearest even (VCVTNEPS2BF16).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#ifdef __AVX512BF16__
#include <immintrin.h>

namespace fastattnreg::cpu::bf16 {

using c10::BFloat16;

inline int64_t pairs(int64_t k) { return (k + 1) / 2; }

// 16 bf16 at p (the first `n` lanes; the rest read as 0), widened to the low halves of 32-bit
// lanes.
inline __m512i load_low_halves(const BFloat16* p, int64_t n) {
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
}
inline __m512i load_low_halves(const float* p, int64_t n) {
  const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
  return _mm512_cvtepu16_epi32(
      (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p)));
}

// dst[j] = a[j] | b[j] << 16 for j < n (b null: the high halves 0): two rows of a column-pair
// operand, from bf16 or float rows.
template <typename Src>
void interleave_rows(const Src* a, const Src* b, int64_t n, uint32_t* dst) {
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t c = std::min<int64_t>(16, n - j);
    __m512i w = load_low_halves(a + j, c);
    if (b) w = _mm512_or_si512(w, _mm512_slli_epi32(load_low_halves(b + j, c), 16));
    _mm512_mask_storeu_epi32(dst + j, c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << c) - 1u), w);
  }
}

// Y (k x n, rows of length n, leading dim ld_src) as column pairs: ceil(k / 2) x n words with
// leading dim ld.
template <typename Src>
void column_pairs(const Src* src, int64_t k, int64_t n, int64_t ld_src, uint32_t* dst,
                  int64_t ld) {
  for (int64_t p = 0; 2 * p < k; ++p)
    interleave_rows(src + 2 * p * ld_src, 2 * p + 1 < k ? src + (2 * p + 1) * ld_src : nullptr, n,
                    dst + p * ld);
}

// The rows (length k) of a float tile as row pairs: each row rounded to bf16 and zero-padded to
// ld words (ld >= ceil(k / 2); by default ceil(k / 2)).
inline void row_pairs(const float* src, int64_t m, int64_t k, int64_t ld_src, uint32_t* dst,
                      int64_t ld = 0) {
  const int64_t kp = pairs(k);
  if (ld == 0) ld = kp;
  for (int64_t r = 0; r < m; ++r) {
    const float* row = src + r * ld_src;
    if (ld > kp) std::fill(dst + r * ld + kp, dst + (r + 1) * ld, 0u);
    BFloat16* out = reinterpret_cast<BFloat16*>(dst + r * ld);
    for (int64_t j = 0; j < k; j += 16) {
      const int64_t c = std::min<int64_t>(16, k - j);
      const __mmask16 m16 = c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << c) - 1u);
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m16, row + j));
      _mm256_mask_storeu_epi16(out + j, m16, h);
    }
    if (k % 2) out[k] = BFloat16(0.0f);
  }
}

// bf16 rows (m x k, contiguous) as row pairs: the rows themselves when k is even, else a copy
// with each row zero-padded by one element into buf (m x ceil(k / 2) words).
inline const uint32_t* row_pairs(const BFloat16* src, int64_t m, int64_t k, uint32_t* buf) {
  if (k % 2 == 0) return reinterpret_cast<const uint32_t*>(src);
  const int64_t kp = pairs(k);
  for (int64_t r = 0; r < m; ++r) {
    buf[r * kp + kp - 1] = 0;
    std::memcpy(buf + r * kp, src + r * k, sizeof(BFloat16) * k);
  }
  return buf;
}

// bf16 rows (m x k, contiguous) as row pairs of ld >= ceil(k / 2) words: the rows themselves
// when 2 ld == k, else a copy with each row zero-padded into buf (m x ld words).
inline const uint32_t* row_pairs(const BFloat16* src, int64_t m, int64_t k, int64_t ld,
                                 uint32_t* buf) {
  if (2 * ld == k) return reinterpret_cast<const uint32_t*>(src);
  for (int64_t r = 0; r < m; ++r) {
    std::fill(buf + r * ld, buf + (r + 1) * ld, 0u);
    std::memcpy(buf + r * ld, src + r * k, sizeof(BFloat16) * k);
  }
  return buf;
}

// bf16 rows (m x k, contiguous) times `scale`, rounded back to bf16, as row pairs of ld words
// in buf (each row zero-padded). For a power-of-two scale only the exponent changes, so the
// copy is exact for every element above bf16's normal range's low end times 1 / scale.
inline const uint32_t* scaled_row_pairs(const BFloat16* src, int64_t m, int64_t k, int64_t ld,
                                        float scale, uint32_t* buf) {
  const __m512 vs = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < m; ++r) {
    BFloat16* out = reinterpret_cast<BFloat16*>(buf + r * ld);
    std::fill(buf + r * ld + k / 2, buf + (r + 1) * ld, 0u);
    for (int64_t j = 0; j < k; j += 16) {
      const int64_t c = std::min<int64_t>(16, k - j);
      const __mmask16 m16 = c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << c) - 1u);
      const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m16, src + r * k + j)), 16));
      _mm256_mask_storeu_epi16(out + j, m16, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(x, vs)));
    }
  }
  return buf;
}

// Y^T for Y (n x k, bf16 rows of length k): the k x n operand of S = X Y^T as column pairs,
// ceil(k / 2) x n words with leading dim ld. Word (p, j) is elements 2p, 2p + 1 of row j of Y,
// so this is row j of Y read as words, transposed: ATen's 16 x 16 transpose of 32-bit lanes
// (the words pass through as float bit patterns, moved, never computed on).
inline void transposed_column_pairs(const BFloat16* y, int64_t n, int64_t k, uint32_t* dst,
                                    int64_t ld, uint32_t* pad_buf) {
  const float* w = reinterpret_cast<const float*>(row_pairs(y, n, k, pad_buf));  // n x kp
  const int64_t kp = pairs(k);
  float* out = reinterpret_cast<float*>(dst);
  for (int64_t r0 = 0; r0 < n; r0 += 16)
    at::vec::transpose_mxn<float>(w + r0 * kp, kp, out + r0, ld,
                                  static_cast<int>(std::min<int64_t>(16, n - r0)),
                                  static_cast<int>(kp));
}

}  // namespace fastattnreg::cpu::bf16
#endif
