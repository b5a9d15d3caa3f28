// Row-level building blocks of the Refiner kernels (refiner_kernels.h): the depthwise k x k
// convolution of one output row and its transpose, and the numerically careful per-channel
// moments (shifted sums per run, Chan merge in double).
// A "row" is one query row of one channel of the attention image: N contiguous values.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "rowops.h"

namespace fastattnreg::cpu::refiner {

// sum_j x[j]
template <typename T>
T sum_row(const T* x, int64_t n) {
  using V = at::vec::Vectorized<T>;
  V acc(T(0));
  for_each_vec<T>(n, [&](int64_t j, int64_t c) { acc = acc + V::loadu(x + j, c); });
  return hsum(acc);
}

// A sum over many rows in lanes of double: the caller sums each row in vector lanes of T (in
// registers, several sums in one pass over the row), then flushes that row's lanes in here; one
// horizontal add at the end (a per-row horizontal add costs as much as the row itself at N = 65).
// The backward's BatchNorm sums cancel heavily when combined (BN3's sum of dz y_hat is a
// difference of terms ~100x larger, see B1); kept in float lanes across a whole tile, their
// rounding made some float32 gradients up to 1.5x less accurate than PyTorch's own.
template <typename T>
struct VecSum {
  using V = at::vec::Vectorized<T>;
  static constexpr int64_t kLanes = V::size();
  double lanes[kLanes] = {};
  void flush(const V& row_lanes) {  // += one row's sum, lane by lane
    T part[kLanes];
    row_lanes.store(part);
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += double(part[l]);
  }
  double total() const {
    double s = 0;
    for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
    return s;
  }
};

// Sums over a run of n values (one channel's rows of a tile, contiguous in its plane): step(j,
// cnt, acc) adds the vector at j (lanes [0, cnt)) into kSums float vector sums, which are flushed
// into out[] (double lanes) every kFlushVectors vectors. A short float chain per lane keeps
// these sums as accurate as per-row sums; one flush per row of N = 65 cost as much as the row.
template <typename T, int kSums, typename Step>
void sum_run(int64_t n, VecSum<T>* out, const Step& step) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t kFlushVectors = 8, kChunk = kFlushVectors * V::size();
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    V acc[kSums];
    for (V& a : acc) a = V(T(0));
    for_each_vec<T>(std::min(kChunk, n - j0), [&](int64_t j, int64_t c) { step(j0 + j, c, acc); });
    for (int k = 0; k < kSums; ++k) out[k].flush(acc[k]);
  }
}

// sum_j (x[j] - c) over a run of n values, and with y, sum_j (x[j] - c) (y[j] - c), in double.
template <typename T>
double shifted_sum_run(const T* x, T c, int64_t n) {
  using V = at::vec::Vectorized<T>;
  const V vc(c), zero(T(0));
  VecSum<T> v[1];
  sum_run<T, 1>(n, v, [&](int64_t j, int64_t cnt, V* acc) {
    acc[0] = acc[0] + V::set(zero, V::loadu(x + j, cnt) - vc, cnt);  // tail lanes zeroed
  });
  return v[0].total();
}
template <typename T>
double shifted_dot_run(const T* x, const T* y, T c, int64_t n) {
  using V = at::vec::Vectorized<T>;
  const V vc(c), zero(T(0));
  VecSum<T> v[1];
  sum_run<T, 1>(n, v, [&](int64_t j, int64_t cnt, V* acc) {
    const V dx = V::set(zero, V::loadu(x + j, cnt) - vc, cnt);  // tail lanes zeroed
    acc[0] = at::vec::fmadd(dx, V::loadu(y + j, cnt) - vc, acc[0]);
  });
  return v[0].total();
}

// Where the moments below centre their sums: the mean of the run's first (up to) 64 values.
template <typename T>
T run_shift(const T* x, int64_t n) {
  const int64_t m = std::min<int64_t>(n, 64);
  return sum_row(x, m) / T(m);
}

// Mean and sum of squared deviations of one channel, merged run by run in double (Chan et
// al.). Each run is summed as deviations d = x - shift from a shift near its mean (run_shift),
// m2 = sum d^2 - (sum d)^2 / n: accurate even when the mean dwarfs the spread (attention maps
// near uniform: mean 1/N, tiny variance), where E[x^2] - E[x]^2 would cancel. (Two passes per
// row around the row's own mean, with a horizontal sum and a Chan merge per row, were ~40% of
// the pass at N = 65.)
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void add_run(double rn, double rmean, double rm2) {
    const double tot = n + rn, delta = rmean - mean;
    mean += delta * rn / tot;
    m2 += rm2 + delta * delta * n * rn / tot;
    n = tot;
  }
  void merge(const Moments& o) {
    if (o.n > 0) add_run(o.n, o.mean, o.m2);
  }
  template <typename T>
  void add(const T* x, int64_t len) {
    using V = at::vec::Vectorized<T>;
    const T s = run_shift(x, len);
    const V vs(s), zero(T(0));
    VecSum<T> v[2];
    sum_run<T, 2>(len, v, [&](int64_t j, int64_t c, V* acc) {
      const V d = V::set(zero, V::loadu(x + j, c) - vs, c);  // tail lanes zeroed
      acc[0] = acc[0] + d;
      acc[1] = at::vec::fmadd(d, d, acc[1]);
    });
    const double rn = double(len), sd = v[0].total();
    add_run(rn, double(s) + sd / rn, std::max(0.0, v[1].total() - sd * sd / rn));
  }
};

// Joint moments of two channels (y, a): means, sums of squared deviations and the co-moment,
// as Moments does.
struct CoMoments {
  double n = 0, my = 0, ma = 0, m2y = 0, m2a = 0, cya = 0;
  void add_run(double rn, double rmy, double rma, double rm2y, double rm2a, double rcya) {
    const double tot = n + rn, dy = rmy - my, da = rma - ma, w = n * rn / tot;
    my += dy * rn / tot;
    ma += da * rn / tot;
    m2y += rm2y + dy * dy * w;
    m2a += rm2a + da * da * w;
    cya += rcya + dy * da * w;
    n = tot;
  }
  void merge(const CoMoments& o) {
    if (o.n > 0) add_run(o.n, o.my, o.ma, o.m2y, o.m2a, o.cya);
  }
  template <typename T>
  void add(const T* y, const T* a, int64_t len) {
    using V = at::vec::Vectorized<T>;
    const T sy = run_shift(y, len), sa = run_shift(a, len);
    const V vy(sy), va(sa), zero(T(0));
    VecSum<T> v[5];  // sum dy, da, dy^2, da^2, dy da
    sum_run<T, 5>(len, v, [&](int64_t j, int64_t c, V* acc) {
      const V dy = V::set(zero, V::loadu(y + j, c) - vy, c);  // tail lanes zeroed
      const V da = V::set(zero, V::loadu(a + j, c) - va, c);
      acc[0] = acc[0] + dy;
      acc[1] = acc[1] + da;
      acc[2] = at::vec::fmadd(dy, dy, acc[2]);
      acc[3] = at::vec::fmadd(da, da, acc[3]);
      acc[4] = at::vec::fmadd(dy, da, acc[4]);
    });
    const double rn = double(len), sdy = v[0].total(), sda = v[1].total();
    add_run(rn, double(sy) + sdy / rn, double(sa) + sda / rn,
            std::max(0.0, v[2].total() - sdy * sdy / rn),
            std::max(0.0, v[3].total() - sda * sda / rn), v[4].total() - sdy * sda / rn);
  }
};

// Calls f(std::integral_constant<int, kFixedK>) with kFixedK = K for the kernel sizes the
// depthwise passes unroll (3, 5, 7), else 0 (K read at run time).
template <typename F>
void with_fixed_k(int64_t K, const F& f) {
  switch (K) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

// Makes the compiler hold v in a register from here on. GCC otherwise folds a vector load into
// every FMA that reads it (one load per use), undoing the reuse of depthwise_rows.
template <typename Raw, typename T>
inline void pin_as(at::vec::Vectorized<T>& v) {
  Raw raw = v;
  asm("" : "+v"(raw));
  v = at::vec::Vectorized<T>(raw);
}
template <typename T>
inline void pin_in_register(at::vec::Vectorized<T>& v) {
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) pin_as<__m512>(v);
  if constexpr (std::is_same_v<T, double>) pin_as<__m512d>(v);
#elif defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) pin_as<__m256>(v);
  if constexpr (std::is_same_v<T, double>) pin_as<__m256d>(v);
#endif
}

// One vector of pixels (j, lanes [0, c)) of a block of kRows output rows of a K x K depthwise
// convolution, whose kRows + K - 1 input rows (padded) r[t] points at: loads each input row's
// K shifted vectors once, pinned in registers, and calls f(q, di, x) for every output row q
// that input row meets through kernel row di = t - q, in order of t, then q.
template <int kFixedK, int kRows, typename T, typename F>
inline void for_each_shifted_input(const T* const* r, int64_t j, int64_t c, const F& f) {
  using V = at::vec::Vectorized<T>;
#pragma GCC unroll 16
  for (int t = 0; t < kRows + kFixedK - 1; ++t) {
    V x[kFixedK];
#pragma GCC unroll 16
    for (int dj = 0; dj < kFixedK; ++dj) {
      x[dj] = V::loadu(r[t] + j + dj, c);
      pin_in_register(x[dj]);
    }
#pragma GCC unroll 16
    for (int q = 0; q < kRows; ++q) {
      const int di = t - q;
      if (di >= 0 && di < kFixedK) f(q, di, x);
    }
  }
}

// Output rows [lo, hi) of one channel of a depthwise K x K convolution (zero 'same' padding):
//   out(i)[j] = sum_{di, dj} w[di K + dj] in(i + di - K/2)[j + dj - K/2],  j in [0, n)
// in_row(r) points at column 0 of input row r, padded with K/2 zeros on both sides (a row of
// zeros for r outside the image); out_row(i) at output row i. Each kernel row's taps accumulate
// in a register (dj in order), the K rows' sums are then added in order: the same order for
// every pixel, whichever path below computes it, so results do not depend on the row blocking.
//
// kFixedK > 0 (3, 5, 7) unrolls the taps, keeps the K*K broadcast weights in registers for the
// whole channel (with K read at run time the tap loop cost twice the FMAs it issues) and
// computes kRows output rows together: each shifted input vector is loaded once and used for
// every output row it touches. One output row at a time made 9 loads per 9 FMAs at K = 3, most
// of them split across two cache lines (rows are not 64-byte aligned), and the loads, not the
// FMAs, set the pace (perf: the depthwise convolutions were 18% of a training step at N = 65).
template <int kFixedK, typename T, typename InRow, typename OutRow>
void depthwise_rows(const T* w, int64_t runtime_k, int64_t lo, int64_t hi, int64_t n,
                    const InRow& in_row, const OutRow& out_row) {
  using V = at::vec::Vectorized<T>;
  const int64_t K = kFixedK > 0 ? kFixedK : runtime_k, h = K / 2;
  constexpr int kMaxTaps = kFixedK > 0 ? kFixedK * kFixedK : 1;
  V wv[kMaxTaps];
  if constexpr (kFixedK > 0)
    for (int t = 0; t < kMaxTaps; ++t) wv[t] = V(w[t]);
  const auto weight = [&](int64_t t) {
    if constexpr (kFixedK > 0) {
      return wv[t];
    } else {
      return V(w[t]);
    }
  };
  int64_t i = lo;
  if constexpr (kFixedK > 0) {
    // Output rows per block: K = 3 keeps 4 x 3 accumulators, 9 weights and 3 inputs in the 32
    // vector registers; larger kernels take 2 rows.
    constexpr int kRows = kFixedK == 3 ? 4 : 2, kIn = kRows + kFixedK - 1;
    for (; i + kRows <= hi; i += kRows) {
      const T* r[kIn];
      for (int t = 0; t < kIn; ++t) r[t] = in_row(i + t - h) - h;
      T* o[kRows];
      for (int q = 0; q < kRows; ++q) o[q] = out_row(i + q);
      for_each_vec<T>(n, [&](int64_t j, int64_t c) {
        V acc[kRows][kFixedK];
        for_each_shifted_input<kFixedK, kRows>(r, j, c, [&](int q, int di, const V* x) {
          acc[q][di] = x[0] * wv[di * kFixedK];
#pragma GCC unroll 16
          for (int dj = 1; dj < kFixedK; ++dj)
            acc[q][di] = at::vec::fmadd(x[dj], wv[di * kFixedK + dj], acc[q][di]);
        });
#pragma GCC unroll 16
        for (int q = 0; q < kRows; ++q) {
          V sum = acc[q][0];
          for (int di = 1; di < kFixedK; ++di) sum = sum + acc[q][di];
          sum.store(o[q] + j, c);
        }
      });
    }
  }
  // The remaining rows (every row when K is read at run time), one at a time.
  const T* r[kFixedK > 0 ? kFixedK : 16];  // the runtime path serves K <= 15 (refiner.cpp)
  for (; i < hi; ++i) {
    for (int64_t di = 0; di < K; ++di) r[di] = in_row(i + di - h) - h;
    T* o = out_row(i);
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      // One accumulator per kernel row, added in row order at the end: a single chain of K*K
      // dependent FMAs left the loop waiting on FMA latency.
      V acc[kFixedK > 0 ? kFixedK : 16];
      for (int64_t di = 0; di < K; ++di) {
        acc[di] = V::loadu(r[di] + j, c) * weight(di * K);
        for (int64_t dj = 1; dj < K; ++dj)
          acc[di] = at::vec::fmadd(V::loadu(r[di] + j + dj, c), weight(di * K + dj), acc[di]);
      }
      V sum = acc[0];
      for (int64_t di = 1; di < K; ++di) sum = sum + acc[di];
      sum.store(o + j, c);
    });
  }
}

// The weight gradient of depthwise_rows for one channel, rows [lo, hi):
//   g[di K + dj] += sum_i sum_j dout(i)[j] in(i + di - K/2)[j + dj - K/2]
// in_row(r) as for depthwise_rows (a row of zeros for r outside the image); dout_row(i) points
// at output-gradient row i. Each tap's sum runs in float vector lanes, then once to double.
// kFixedK > 0 keeps the K*K tap sums in registers (independent accumulators: one per tap
// chained every FMA on the one before, perf: 5% of a training step at N = 65 waiting on FMA
// latency) and, as depthwise_rows, takes kRows gradient rows at a time so that each shifted
// input vector is loaded once for every gradient row it meets (one row at a time: 4 loads
// per 3 FMAs, 12% of the backward's last pass).
template <int kFixedK, typename T, typename InRow, typename GradRow>
void depthwise_weight_grad_rows(T* g, int64_t runtime_k, int64_t lo, int64_t hi, int64_t n,
                                const InRow& in_row, const GradRow& dout_row) {
  using V = at::vec::Vectorized<T>;
  const int64_t K = kFixedK > 0 ? kFixedK : runtime_k, h = K / 2;
  if constexpr (kFixedK > 0) {
    constexpr int kRows = kFixedK == 3 ? 4 : 2, kIn = kRows + kFixedK - 1;
    V acc[kFixedK][kFixedK];
    for (auto& row : acc)
      for (V& a : row) a = V(T(0));
    // One kernel row's taps of one gradient row at one vector: acc[di][dj] += go x_dj.
    const auto taps = [&](const V& go, const V* x, int di) {
#pragma GCC unroll 16
      for (int dj = 0; dj < kFixedK; ++dj) acc[di][dj] = at::vec::fmadd(go, x[dj], acc[di][dj]);
    };
    int64_t i = lo;
    for (; i + kRows <= hi; i += kRows) {
      const T* r[kIn];
      for (int t = 0; t < kIn; ++t) r[t] = in_row(i + t - h) - h;
      const T* go_rows[kRows];
      for (int q = 0; q < kRows; ++q) go_rows[q] = dout_row(i + q);
      for_each_vec<T>(n, [&](int64_t j, int64_t c) {
        V go[kRows];
#pragma GCC unroll 16
        for (int q = 0; q < kRows; ++q) {
          go[q] = V::loadu(go_rows[q] + j, c);  // tail lanes load 0
          pin_in_register(go[q]);
        }
        for_each_shifted_input<kFixedK, kRows>(
            r, j, c, [&](int q, int di, const V* x) { taps(go[q], x, di); });
      });
    }
    for (; i < hi; ++i) {  // the remaining rows, one at a time
      const T* go_row = dout_row(i);
      for (int di = 0; di < kFixedK; ++di) {
        const T* in = in_row(i + di - h) - h;
        for_each_vec<T>(n, [&](int64_t j, int64_t c) {
          V x[kFixedK];
          for (int dj = 0; dj < kFixedK; ++dj) x[dj] = V::loadu(in + j + dj, c);
          taps(V::loadu(go_row + j, c), x, di);
        });
      }
    }
    for (int di = 0; di < kFixedK; ++di)
      for (int dj = 0; dj < kFixedK; ++dj) g[di * K + dj] += T(double(hsum(acc[di][dj])));
  } else {
    for (int64_t di = 0; di < K; ++di) {
      V acc[16];  // K <= 15 (refiner.cpp)
      for (int64_t dj = 0; dj < K; ++dj) acc[dj] = V(T(0));
      for (int64_t i = lo; i < hi; ++i) {
        const T* in = in_row(i + di - h) - h;
        const T* go = dout_row(i);
        for_each_vec<T>(n, [&](int64_t j, int64_t c) {
          const V x = V::loadu(go + j, c);  // tail lanes load 0
          for (int64_t dj = 0; dj < K; ++dj)
            acc[dj] = at::vec::fmadd(x, V::loadu(in + j + dj, c), acc[dj]);
        });
      }
      for (int64_t dj = 0; dj < K; ++dj) g[di * K + dj] += T(double(hsum(acc[dj])));
    }
  }
}

}  // namespace fastattnreg::cpu::refiner
