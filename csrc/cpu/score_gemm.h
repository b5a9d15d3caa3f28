// The per-head GEMMs of the CPU attention kernels on a register-blocked AVX-512 kernel (float),
// with BLAS for every other case:
//   score tiles     S = alpha X Y, X (m x k) a block of queries, Y (k x n) a head's keys (or
//                   values) transposed, k the head dim (up to kScoreGemmMaxK);
//   narrow products O = P V, dQ = dS K (X Y), dV = P^T dO, dK = dS^T Q (X^T Y), n the head dim.
// Measured with MKL on one thread at k = 64, m = n = 197: score tiles ran at ~100 GFLOP/s against
// ~125 on the same tile's P V product (MKL packs both operands of a short-k product per call), and
// 5 of attention_match's 9 GEMMs are score tiles; this kernel runs them at ~118 and the narrow
// products at 125-135 (MKL: 110-125). All row-major.
//
// Blocking: S is cut into column panels of up to 64 (four 16-lane vectors, the last masked at the
// right edge) and, inside a panel, into blocks of 6 rows: 24 accumulators, and per step of k four
// loads of Y and six broadcasts of X for 24 FMAs. A k x 64 panel of Y (16 KiB at k = 64) stays in
// L1 while every row block of X passes over it. Each S element is one chain of FMAs over k in
// order, so a row's result does not depend on the block it sits in or on m: a one-row product
// equals the same row of an m-row product bitwise.
//
// The same register blocking serves bf16 operands on AVX512-BF16 builds (Bf16PairDot): one step
// of the inner dim is then a pair of bf16 (bf16_pack.h), multiplied pairwise into the float
// accumulators by VDPBF16PS. On the Xeon this project is measured on it runs at half the float
// kernel's FLOP rate (simd_level.h), so only an explicit request selects it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "blas.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define FASTATTNREG_SCORE_GEMM_AVX512 1
#if defined(__AVX512BF16__)
#define FASTATTNREG_AVX512_BF16 1
#endif
#endif

namespace fastattnreg::cpu {

// Head dims up to this take the kernel; larger ones go to BLAS (a 64-wide panel of Y would no
// longer stay in a 32 KiB L1).
constexpr int64_t kScoreGemmMaxK = 128;

#ifdef FASTATTNREG_SCORE_GEMM_AVX512
namespace score_gemm_detail {

constexpr int kRows = 6;  // rows of S per register block
constexpr int kVecs = 4;  // 16-lane vectors of S per register block (a 64-column panel)

// The multiply-add of one step of the inner dim, by operand type. Elem is what one step reads
// from X (broadcast) and Y (16 lanes): a float, or a pair of bf16 packed into 32 bits that
// AVX512-BF16's dot product multiplies pairwise and adds to float.
struct FloatFma {
  using Elem = float;
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static __m512 broadcast(float x) { return _mm512_set1_ps(x); }
  static __m512 madd(__m512 x, __m512 y, __m512 c) { return _mm512_fmadd_ps(x, y, c); }
};

#ifdef FASTATTNREG_AVX512_BF16
struct Bf16PairDot {
  using Elem = uint32_t;
  static __m512 load(const uint32_t* p) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  static __m512 load(const uint32_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, p));
  }
  static __m512 broadcast(uint32_t x) { return _mm512_castsi512_ps(_mm512_set1_epi32(int(x))); }
  // c + x.lo * y.lo + x.hi * y.hi per lane, in float.
  static __m512 madd(__m512 x, __m512 y, __m512 c) {
    return _mm512_dpbf16_ps(c, (__m512bh)x, (__m512bh)y);
  }
};
#endif

// S[0:R, 0:16*V] = alpha X[0:R, 0:k] Y[0:k, 0:16*V], the last vector's lanes limited by `tail`.
// The 24 accumulators are named variables, not an array: GCC keeps an array of 24 vectors in
// memory and stores all of it on every step of k (3x slower, measured).
#define FASTATTNREG_SG_ROW(r)                                                          \
  if constexpr (R > r) {                                                               \
    const __m512 xv = Op::broadcast(kTransX ? x[p * ldx + r] : x[r * ldx + p]);        \
    c##r##0 = Op::madd(xv, y0, c##r##0);                                               \
    if constexpr (V > 1) c##r##1 = Op::madd(xv, y1, c##r##1);                          \
    if constexpr (V > 2) c##r##2 = Op::madd(xv, y2, c##r##2);                          \
    if constexpr (V > 3) c##r##3 = Op::madd(xv, y3, c##r##3);                          \
  }
#define FASTATTNREG_SG_STORE(r)                                                        \
  if constexpr (R > r) {                                                               \
    float* sr = s + r * lds;                                                           \
    store(sr, c##r##0, 0);                                                             \
    if constexpr (V > 1) store(sr, c##r##1, 1);                                        \
    if constexpr (V > 2) store(sr, c##r##2, 2);                                        \
    if constexpr (V > 3) store(sr, c##r##3, 3);                                        \
  }

// kTransX: X is given transposed (stored k x m, element (r, p) at x[p * ldx + r]).
// accumulate: S += the product instead of S = it.
template <typename Op, int R, int V, bool kTransX>
inline void block(int64_t k, float alpha, const typename Op::Elem* x, int64_t ldx,
                  const typename Op::Elem* y, int64_t ldy, float* s, int64_t lds, __mmask16 tail,
                  bool accumulate) {
  static_assert(R >= 1 && R <= kRows && V >= 1 && V <= kVecs, "register block out of range");
  const __m512 z = _mm512_setzero_ps();
  __m512 c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z;
  __m512 c20 = z, c21 = z, c22 = z, c23 = z, c30 = z, c31 = z, c32 = z, c33 = z;
  __m512 c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z, c52 = z, c53 = z;
  // Vector v of row p of Y; the last one (v = V - 1) masked to the panel's real columns.
  auto load = [&](int64_t p, int v) {
    return v == V - 1 ? Op::load(y + p * ldy + 16 * v, tail) : Op::load(y + p * ldy + 16 * v);
  };
  for (int64_t p = 0; p < k; ++p) {
    const __m512 y0 = load(p, 0);
    const __m512 y1 = V > 1 ? load(p, 1) : z;
    const __m512 y2 = V > 2 ? load(p, 2) : z;
    const __m512 y3 = V > 3 ? load(p, 3) : z;
    FASTATTNREG_SG_ROW(0)
    FASTATTNREG_SG_ROW(1)
    FASTATTNREG_SG_ROW(2)
    FASTATTNREG_SG_ROW(3)
    FASTATTNREG_SG_ROW(4)
    FASTATTNREG_SG_ROW(5)
  }
  const __m512 va = _mm512_set1_ps(alpha);
  auto store = [&](float* row, __m512 acc, int v) {
    const __mmask16 mask = v == V - 1 ? tail : __mmask16(0xFFFF);
    __m512 out = _mm512_mul_ps(acc, va);
    if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mask, row + 16 * v));
    _mm512_mask_storeu_ps(row + 16 * v, mask, out);
  };
  FASTATTNREG_SG_STORE(0)
  FASTATTNREG_SG_STORE(1)
  FASTATTNREG_SG_STORE(2)
  FASTATTNREG_SG_STORE(3)
  FASTATTNREG_SG_STORE(4)
  FASTATTNREG_SG_STORE(5)
}
#undef FASTATTNREG_SG_ROW
#undef FASTATTNREG_SG_STORE

// One column panel (V vectors wide), every row of S: full row blocks, then the 1-5 left over.
template <typename Op, int V, bool kTransX>
inline void panel(int64_t m, int64_t k, float alpha, const typename Op::Elem* x, int64_t ldx,
                  const typename Op::Elem* y, int64_t ldy, float* s, int64_t lds, __mmask16 tail,
                  bool acc) {
  // Row r of X starts at x + r * xr.
  const int64_t xr = kTransX ? 1 : ldx;
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows)
    block<Op, kRows, V, kTransX>(k, alpha, x + i * xr, ldx, y, ldy, s + i * lds, lds, tail, acc);
  x += i * xr;
  s += i * lds;
  switch (m - i) {
    case 5: block<Op, 5, V, kTransX>(k, alpha, x, ldx, y, ldy, s, lds, tail, acc); break;
    case 4: block<Op, 4, V, kTransX>(k, alpha, x, ldx, y, ldy, s, lds, tail, acc); break;
    case 3: block<Op, 3, V, kTransX>(k, alpha, x, ldx, y, ldy, s, lds, tail, acc); break;
    case 2: block<Op, 2, V, kTransX>(k, alpha, x, ldx, y, ldy, s, lds, tail, acc); break;
    case 1: block<Op, 1, V, kTransX>(k, alpha, x, ldx, y, ldy, s, lds, tail, acc); break;
    default: break;
  }
}

// S (m x n, leading dim lds) = alpha op(X) Y (k x n, ldy) [+ S when accumulate], op(X) = X
// (m x k, ldx) or, with kTransX, X^T for X stored k x m (ldx); k counts Op::Elem steps.
// The ceil(n / 16) column vectors are dealt to panels of 3 or 4 (197 columns: 4 + 3 + 3 + 3, not
// 4 + 4 + 4 + 1: a one-vector panel loads as much per FMA as it computes, and took 1/8 of the
// kernel's time for 1/13 of its columns).
template <typename Op, bool kTransX>
inline void gemm_panels(int64_t m, int64_t n, int64_t k, float alpha, const typename Op::Elem* x,
                        int64_t ldx, const typename Op::Elem* y, int64_t ldy, float* s,
                        int64_t lds, bool accumulate) {
  const int64_t vecs = (n + 15) / 16;
  const int64_t panels = (vecs + kVecs - 1) / kVecs;
  int64_t j = 0;
  for (int64_t pi = 0; pi < panels; ++pi) {
    const int64_t pv = vecs / panels + (pi < vecs % panels ? 1 : 0);  // vectors in this panel
    const int64_t w = std::min<int64_t>(16 * pv, n - j);              // its real columns
    const int last = static_cast<int>(w - 16 * (pv - 1));              // real lanes of its last
    const __mmask16 tail = static_cast<__mmask16>((1u << last) - 1u);
    const typename Op::Elem* yj = y + j;
    float* sj = s + j;
    const bool acc = accumulate;
    switch (pv) {
      case 4: panel<Op, 4, kTransX>(m, k, alpha, x, ldx, yj, ldy, sj, lds, tail, acc); break;
      case 3: panel<Op, 3, kTransX>(m, k, alpha, x, ldx, yj, ldy, sj, lds, tail, acc); break;
      case 2: panel<Op, 2, kTransX>(m, k, alpha, x, ldx, yj, ldy, sj, lds, tail, acc); break;
      default: panel<Op, 1, kTransX>(m, k, alpha, x, ldx, yj, ldy, sj, lds, tail, acc); break;
    }
    j += w;
  }
}

}  // namespace score_gemm_detail

template <bool kTransX>
inline void score_gemm_avx512(int64_t m, int64_t n, int64_t k, float alpha, const float* x,
                              int64_t ldx, const float* y, int64_t ldy, float* s, int64_t lds,
                              bool accumulate) {
  score_gemm_detail::gemm_panels<score_gemm_detail::FloatFma, kTransX>(
      m, n, k, alpha, x, ldx, y, ldy, s, lds, accumulate);
}
#endif

// Which products take the kernel (float on AVX-512 builds): score tiles, k <= kScoreGemmMaxK; and
// a tile times a head's values or keys (O = P V, dQ = dS K, dV = P^T dO, dK = dS^T Q), whose n is
// the head dim: one or two panels, with Y read from L2. Measured against MKL on one thread at
// N = 197..577: 5-30% faster for head dims 64 and 80 except P V at 80 (within 8%); at 16 the
// transposed form (one one-vector panel) is 1.6x slower, so narrow heads stay with BLAS.
// These predicates are the one rule: the GEMMs below dispatch on them, and key_operand
// (attention_kernels.h) uses the first to choose the key layout the kernel reads.
constexpr int64_t kNarrowGemmMinN = 48;

template <typename T>
constexpr bool score_kernel_built() {
#ifdef FASTATTNREG_SCORE_GEMM_AVX512
  return std::is_same_v<T, float>;
#else
  return false;
#endif
}

// A score tile with inner dim k (the head dim).
template <typename T>
bool score_kernel_takes_tile(int64_t k) {
  return score_kernel_built<T>() && k <= kScoreGemmMaxK;
}

// A narrow product whose n is the head dim.
template <typename T>
bool score_kernel_takes_narrow(int64_t n) {
  return score_kernel_built<T>() && n >= kNarrowGemmMinN && n <= kScoreGemmMaxK;
}

// S (m x n, lds) = alpha X (m x k, ldx) Y (k x n, ldy). Y's rows are best 64-byte aligned (ldy a
// multiple of 16 floats from an aligned base): unaligned rows cost the kernel 5-20% (measured).
template <typename T>
void score_gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* x, int64_t ldx, const T* y,
                   int64_t ldy, T* s, int64_t lds) {
#ifdef FASTATTNREG_SCORE_GEMM_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (score_kernel_takes_tile<T>(k) || score_kernel_takes_narrow<T>(n)) {
      score_gemm_avx512<false>(m, n, k, alpha, x, ldx, y, ldy, s, lds, false);
      return;
    }
  }
#endif
  gemm_rm<T>(false, false, m, n, k, alpha, x, ldx, y, ldy, T(0), s, lds);
}

// S (m x n, lds) = alpha X^T Y [+ S when accumulate], X stored k x m (ldx), Y k x n (ldy).
template <typename T>
void score_gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* x, int64_t ldx, const T* y,
                   int64_t ldy, bool accumulate, T* s, int64_t lds) {
#ifdef FASTATTNREG_SCORE_GEMM_AVX512
  if constexpr (std::is_same_v<T, float>) {
    if (score_kernel_takes_narrow<T>(n)) {
      score_gemm_avx512<true>(m, n, k, alpha, x, ldx, y, ldy, s, lds, accumulate);
      return;
    }
  }
#endif
  gemm_rm<T>(true, false, m, n, k, alpha, x, ldx, y, ldy, accumulate ? T(1) : T(0), s, lds);
}

}  // namespace fastattnreg::cpu
