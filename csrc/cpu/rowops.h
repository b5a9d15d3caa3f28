// Vectorised row operations on one score row (length n) of a tile, in the accumulation type
// (float or double). These are the only non-GEMM loops of the attention kernels, so each is a
// single pass where the math allows, using at::vec (AVX2 where the build enables it) with a
// masked vector tail, so awkward ViT lengths (17, 197, 257) take no scalar exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastattnreg::cpu {

using at::vec::Vectorized;

// exp of a vector: ATen's fast polynomial for float (used by its own CPU flash attention),
// Sleef's 1-ulp exp for double so float64 results stay float64-exact.
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// On every row pass that takes an exp: GCC otherwise keeps ATen's exp_u20 out of line and calls
// it through the PLT once per vector (perf: ~10% of an attention_match step was that function).
// flatten inlines every call in the pass, exp_u20's body included.
#define FASTATTNREG_ROW_PASS __attribute__((flatten))

template <typename T>
T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& a, Vectorized<T>& b) { return a + b; }, v);
}

// Visits row elements [0, n) a vector at a time; the last call gets the count of real lanes.
template <typename T, typename F>
inline void for_each_vec(int64_t n, F&& f) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + W <= n; j += W) f(j, W);
  if (j < n) f(j, n - j);
}

// max_j s[j] (-inf for n = 0)
template <typename T>
T max_row(const T* s, int64_t n) {
  using V = Vectorized<T>;
  const V neg_inf(-std::numeric_limits<T>::infinity());
  V vmax = neg_inf;
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    vmax = at::vec::maximum(vmax, V::set(neg_inf, V::loadu(s + j, c), c));
  });
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, vmax);
}

// In place: s <- exp(s - max(s)), unnormalised. Returns the row sum (>= 1; 0 for a row whose
// every entry is -inf, i.e. fully masked, which becomes 0) and sets *row_max, so the caller gets
// lse = max + log(sum) and normalises where it needs P (the output rows are scaled after the
// P V product instead, which saves a pass over the N x N tile).
template <typename T>
FASTATTNREG_ROW_PASS
T exp_row(T* s, int64_t n, T* row_max) {
  using V = Vectorized<T>;
  const T mx = max_row(s, n);
  *row_max = mx;
  if (mx == -std::numeric_limits<T>::infinity()) {  // every key masked: P's row is 0
    std::fill(s, s + n, T(0));
    return T(0);
  }
  const V vm(mx);
  V vsum(T(0));
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V e = V::set(V(T(0)), vexp(V::loadu(s + j, c) - vm), c);
    e.store(s + j, c);
    vsum = vsum + e;
  });
  return hsum(vsum);
}

// y[j] = x[j] * a, for rows of any storage types (normalising P into an exported map).
template <typename Y, typename X, typename T>
void scale_row(Y* y, const X* x, int64_t n, T a) {
  for (int64_t j = 0; j < n; ++j) y[j] = static_cast<Y>(static_cast<T>(x[j]) * a);
}

// y[j] += x[j] * a
template <typename T>
void axpy_row(T* y, const T* x, int64_t n, T a) {
  using V = Vectorized<T>;
  const V va(a);
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    at::vec::fmadd(V::loadu(x + j, c), va, V::loadu(y + j, c)).store(y + j, c);
  });
}

// sum_j a[j] * b[j]
template <typename T>
T dot_row(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  V acc(T(0));
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    acc = at::vec::fmadd(V::loadu(a + j, c), V::loadu(b + j, c), acc);  // tail lanes load 0
  });
  return hsum(acc);
}

// One backward pass over a row: s holds scaled logits, dp the gradient of P. In place:
//   s  <- p = exp(s - lse)
//   dp <- scale * (p * (dp - delta) + extra)   (the softmax backward, dS; `extra`, if given, is a
//                                               gradient arriving directly at the logits)
template <typename T>
FASTATTNREG_ROW_PASS
void softmax_grad_row(T* s, T* dp, int64_t n, T lse, T delta, T scale, const T* extra = nullptr) {
  using V = Vectorized<T>;
  const V vl(lse), vd(delta), vs(scale);
  if (extra) {
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      const V p = vexp(V::loadu(s + j, c) - vl);
      p.store(s + j, c);
      (vs * at::vec::fmadd(p, V::loadu(dp + j, c) - vd, V::loadu(extra + j, c))).store(dp + j, c);
    });
    return;
  }
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V p = vexp(V::loadu(s + j, c) - vl);
    p.store(s + j, c);
    (vs * p * (V::loadu(dp + j, c) - vd)).store(dp + j, c);
  });
}

// The same pass when P is already in s (after exp_add_grad_row).
template <typename T>
void softmax_grad_from_p_row(const T* p, T* dp, int64_t n, T delta, T scale) {
  using V = Vectorized<T>;
  const V vd(delta), vs(scale);
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    (vs * V::loadu(p + j, c) * (V::loadu(dp + j, c) - vd)).store(dp + j, c);
  });
}

// For a row that also receives a gradient g through an exported map (g_scale: 1, or 1/H for
// the head mean). In place: s <- p = exp(s - lse), dp <- dp + g_scale * g.
// Returns sum_j p[j] * g_scale * g[j], the map's share of the row's delta.
template <typename T>
FASTATTNREG_ROW_PASS
T exp_add_grad_row(T* s, T* dp, const T* g, int64_t n, T lse, T g_scale) {
  using V = Vectorized<T>;
  const V vl(lse), vg(g_scale);
  V acc(T(0));
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    // Tail lanes are set to 0: they load s = 0, and exp(0 - lse) overflows to inf once the row's
    // lse is below -88 (float; every logit very negative, e.g. a -1e4 padding bias), which times
    // their g of 0 made acc, and with it every gradient of the row, NaN.
    const V p = V::set(V(T(0)), vexp(V::loadu(s + j, c) - vl), c);
    const V gj = V::loadu(g + j, c) * vg;
    p.store(s + j, c);
    (V::loadu(dp + j, c) + gj).store(dp + j, c);
    acc = at::vec::fmadd(p, gj, acc);
  });
  return hsum(acc);
}

// Copy-convert a row between storage and accumulation types.
template <typename Dst, typename Src>
void convert_row(Dst* dst, const Src* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<Dst>(src[j]);
}

}  // namespace fastattnreg::cpu
