// The Refiner chain's 1x1 convolutions fused with the per-pixel maps around them (for
// refiner_kernels.h and refiner_backward.h): one pass over a tile's pixels, a vector of 16 at a
// time, computes every output channel of a 1x1 convolution and applies the BatchNorm / ReLU6
// step that follows (or precedes) it.
//
// Why not a GEMM: the channel counts are tiny (H = 3..16 heads, C = expansion * H), so each
// 1x1 convolution is a GEMM with K = 3..64 over thousands of pixels: bound by memory, and the
// separate elementwise pass re-read the whole C-channel plane. MKL's small-GEMM overhead and
// that pass were ~15% of a training step at (64, 3, 65, 64); here each input vector is read
// from L1 right after it was loaded or produced.
//
// Planes as in refiner_kernels.h: channel x rows x N, the rows of a channel contiguous (plane
// stride ld), so a block of rows is one flat run of pixels; E and DX2 rows are padded.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#include "rowops.h"

namespace fastattnreg::cpu::refiner {

// Every output of a 1x1 convolution with an (outs x ins) weight matrix read as w[o * w_os +
// i * w_is] (w_os, w_is pick W or its transpose), at the vector of pixels j (lanes [0, cnt)):
// finish(o, sum_i w(o, i) src[i * src_ld + j]), summed in order of i. One output at a time:
// blocks of up to 8 outputs sharing each input load (sums kept in registers) measured ~8%
// slower over a training step at (64, 3, 65, 64); the re-loads hit L1.
template <typename T, typename Finish>
inline void mix_vec(const T* w, int64_t w_os, int64_t w_is, int64_t outs, int64_t ins,
                    const T* src, int64_t src_ld, int64_t j, int64_t cnt, const Finish& finish) {
  using V = at::vec::Vectorized<T>;
  for (int64_t o = 0; o < outs; ++o) {
    V acc(T(0));
    for (int64_t i = 0; i < ins; ++i)
      acc = at::vec::fmadd(V::loadu(src + i * src_ld + j, cnt), V(w[o * w_os + i * w_is]), acc);
    finish(o, acc);
  }
}

// min(max(s x + t, 0), 6): a folded BatchNorm, then ReLU6.
template <typename T>
inline at::vec::Vectorized<T> affine_relu6_vec(const at::vec::Vectorized<T>& x, T s, T t) {
  using V = at::vec::Vectorized<T>;
  // clamp, not minimum(maximum()): those also test every lane for NaN (3 more instructions).
  return at::vec::clamp(at::vec::fmadd(V(s), x, V(t)), V(T(0)), V(T(6)));
}

// g where 0 < s x + t < 6, else 0: ReLU6's gradient mask (strict, as PyTorch's hardtanh).
template <typename T>
inline at::vec::Vectorized<T> relu6_grad_vec(const at::vec::Vectorized<T>& g,
                                             const at::vec::Vectorized<T>& x, T s, T t) {
  using V = at::vec::Vectorized<T>;
  const V u = at::vec::fmadd(V(s), x, V(t));
  return V::blendv(V(T(0)), g, (u > V(T(0))) & (u < V(T(6))));
}

// One row (n pixels) of every output channel of x = W a, and e = ReLU6(s x + t):
//   a: ins input rows, a_ld apart; w (outs, ins) row-major; x: outs rows, x_ld apart;
//   e: outs rows, e_ld apart (padded planes: only [0, n) is written, the margins stay zero).
template <typename T>
void mix_affine_relu6_row(const T* w, int64_t outs, int64_t ins, const T* a, int64_t a_ld,
                          const T* s, const T* t, T* x, int64_t x_ld, T* e, int64_t e_ld,
                          int64_t n) {
  for_each_vec<T>(n, [&](int64_t j, int64_t cnt) {
    mix_vec(w, ins, 1, outs, ins, a, a_ld, j, cnt, [&](int64_t o, const auto& xo) {
      xo.store(x + o * x_ld + j, cnt);
      affine_relu6_vec(xo, s[o], t[o]).store(e + o * e_ld + j, cnt);
    });
  });
}

// f = ReLU6(s x + t) for ins channels, then y = W f (outs channels), over n pixels:
//   x, f: ins runs, ld apart; w (outs, ins) row-major; y: outs runs, ld apart.
template <typename T>
void affine_relu6_mix(const T* x, const T* s, const T* t, const T* w, int64_t outs, int64_t ins,
                      T* f, T* y, int64_t ld, int64_t n) {
  for_each_vec<T>(n, [&](int64_t j, int64_t cnt) {
    using V = at::vec::Vectorized<T>;
    for (int64_t i = 0; i < ins; ++i)
      affine_relu6_vec(V::loadu(x + i * ld + j, cnt), s[i], t[i]).store(f + i * ld + j, cnt);
    mix_vec(w, ins, 1, outs, ins, static_cast<const T*>(f), ld, j, cnt,
            [&](int64_t o, const V& yo) { yo.store(y + o * ld + j, cnt); });
  });
}

}  // namespace fastattnreg::cpu::refiner
