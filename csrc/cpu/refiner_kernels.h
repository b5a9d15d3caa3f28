// CPU kernels of the fused Refiner attention (methods.md §1), for refiner.cpp.
//
// The attention map A (B, H, N, N) is an image with H channels (query x key, zero padding). With
// C = expansion * H expanded channels:
//   E = ReLU6(BN1(W_e A))  F = ReLU6(BN2(W_d * E))  Y = W_r F  A* = BN_a(BN3(Y) + A)  out = A* V
// Nothing of size (B, C, N, N) ever exists. Work is done on tiles: one batch element, a block of
// query rows and every channel at once (the 1x1 convolutions mix the heads). A tile recomputes
// the chain from A for its rows plus a (k-1)/2-row halo (2 halos where the backward needs the
// transposed convolution), in planes of (channels x rows x N) laid out so that each 1x1
// convolution is one small GEMM over all of the tile's pixels.
//
// Eval mode: each BatchNorm is a per-channel affine map; one pass per tile from q, k to out.
// Training mode: BatchNorm statistics are global reductions, so the forward runs 4 passes and
// the backward 4 (below); every pass reads the stored P (B, H, N, N) instead of redoing the
// softmax (our choice: P costs 1/(3 * expansion + 6) of the eager module's maps and saves a
// Q K^T GEMM, the most expensive step per pixel, in 7 of 8 passes).
//   forward  F1 softmax -> P stored; BN1 statistics from the sums and the Gram matrix of A
//               (W_e is linear: mean and variance of W_e A follow from them)
//            F2 E, X2 = W_d * E -> BN2 statistics (row two-pass moments, Chan merge)
//            F3 F, Y -> BN3 statistics and BN_a's (co-moments of Y and A per head)
//            F4 A*, out = A* V
//   backward B1 dA* = dout V^T stored; sums for BN_a and BN3 (dz is affine in dA*)
//            B2 dz, dy, dF -> sums for BN2
//            B3 dx2 on the halo, dE = W_d^T * dx2 -> sums for BN1; dW_d, dW_r
//            B4 dx1, dA, dS = P (dP - rowsum), dq, dk, dv; dW_e
// Every pass writes per-task partials that are merged in task order, so results are bitwise
// repeatable whichever thread ran a task.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_kernels.h"
#include "blas.h"
#include "refiner_rows.h"
#include "rowops.h"

namespace fastattnreg::cpu::refiner {

using kernels::scratch;
using kernels::store_tile;
using kernels::TaskQueue;
using kernels::tile_as_acc;
using kernels::transpose;

struct Dims {
  int64_t B, H, N, D, C, K;  // C expanded channels, K kernel size (odd)
  int64_t halo() const { return (K - 1) / 2; }
  double count() const { return double(B) * double(N) * double(N); }  // pixels per channel
};

// Offsets of the four BatchNorms in the packed per-channel vectors (2C + 2H).
struct Packed {
  int64_t bn1, bn2, bn3, bna, total;
  explicit Packed(const Dims& d)
      : bn1(0), bn2(d.C), bn3(2 * d.C), bna(2 * d.C + d.H), total(2 * d.C + 2 * d.H) {}
};

template <typename T>
struct Params {
  const T* w_exp;  // (C, H)
  const T* w_dw;   // (C, K, K)
  const T* w_pro;  // (H, C)
  const T* gamma;  // packed (2C + 2H): bn1 | bn2 | bn3 | adapt
  const T* beta;
};

// The statistics each BatchNorm uses (batch or running), packed, and the folded affine maps
// s x + t = gamma (x - mean) invstd + beta.
template <typename T>
struct Norms {
  std::vector<T> mean, invstd, s, t;
  Norms(const Params<T>& w, const std::vector<double>& mean_in, const std::vector<double>& var,
        const std::vector<double>& eps, const Packed& pk) {
    const int64_t n = pk.total;
    mean.resize(n), invstd.resize(n), s.resize(n), t.resize(n);
    const int64_t starts[5] = {pk.bn1, pk.bn2, pk.bn3, pk.bna, pk.total};
    for (int which = 0; which < 4; ++which)
      for (int64_t c = starts[which]; c < starts[which + 1]; ++c) {
        const double inv = 1.0 / std::sqrt(var[c] + eps[which]);
        mean[c] = T(mean_in[c]);
        invstd[c] = T(inv);
        s[c] = T(double(w.gamma[c]) * inv);
        t[c] = T(double(w.beta[c]) - mean_in[c] * double(w.gamma[c]) * inv);
      }
  }
};

template <typename scalar_t, typename T>
struct Problem {
  Dims d;
  const scalar_t *q, *k, *v;  // (B, H, N, D)
  T scale;
  const bool* keep;  // (B, H, N, N) attention-dropout keep mask, or nullptr
  T drop_scale;      // 1 / (1 - p)
  Params<T> w;
  T* probs;          // (B, H, N, N): P, written by F1 (or the eval pass when saved)
  int64_t block;     // query rows per tile
};

struct Range {
  int64_t lo, hi;
  int64_t size() const { return hi - lo; }
};

inline Range clip(int64_t lo, int64_t hi, int64_t n) {
  return {std::max<int64_t>(lo, 0), std::min<int64_t>(hi, n)};
}

// Rows per tile: an expanded plane (C x rows x N) of about kPlaneElems, at least 8 rows, then
// balanced so that no block is a sliver.
constexpr int64_t kPlaneElems = 64 * 1024;
inline int64_t tile_rows(const Dims& d) {
  const int64_t cap = std::max<int64_t>(8, kPlaneElems / (d.C * d.N) - 4 * d.halo());
  const int64_t blocks = (d.N + cap - 1) / cap;
  return (d.N + blocks - 1) / blocks;
}

// Per-worker planes of one tile. All planes index global query rows from the same `lo`.
template <typename T>
struct Planes {
  int64_t cap, n, lo = 0;
  at::Tensor mem;
  T *A, *Y, *As, *dAs, *dZ, *dY, *dA;  // H channels: A, Y = W_r F, A*, dA*, dz, dy, dA
  T *X1, *E, *X2, *F, *dF, *dE;        // C channels: W_e A, E, W_d * E, F, and gradients
  T *kt, *qb, *vb, *rows;              // K^T or V^T (D x N); rows x D; N x D; 4 rows of N
  T* at(T* buf, int64_t c, int64_t r) const { return buf + (c * cap + (r - lo)) * n; }
  int64_t ld() const { return cap * n; }

  Planes(const Dims& d, int64_t block) : cap(block + 4 * d.halo()), n(d.N) {
    const int64_t hp = d.H * cap * n, cp = d.C * cap * n;
    mem = scratch<T>(7 * hp + 6 * cp + d.D * n + cap * d.D + n * d.D + 4 * n);
    T* p = mem.data_ptr<T>();
    for (T** b : {&A, &Y, &As, &dAs, &dZ, &dY, &dA}) *b = p, p += hp;
    for (T** b : {&X1, &E, &X2, &F, &dF, &dE}) *b = p, p += cp;
    kt = p, p += d.D * n;
    qb = p, p += cap * d.D;
    vb = p, p += n * d.D;
    rows = p;
  }
};

// Runs body(task, worker_planes) over `tasks` tasks on torch's threads, dynamically scheduled.
template <typename T, typename Body>
void for_each_task(const Dims& d, int64_t block, int64_t tasks, const Body& body) {
  TaskQueue queue(tasks);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_guard;
    Planes<T> ws(d, block);
    for (int64_t t; queue.next(&t);) body(t, ws);
  });
}

// ------------------------------------------------------------------------ forward chain steps

// A on `rows` = softmax(scale q k^T) for batch b, every head; optionally stored into `probs`.
template <typename scalar_t, typename T>
void softmax_rows(const Problem<scalar_t, T>& p, Planes<T>& ws, int64_t b, Range rows,
                  T* probs) {
  const auto& d = p.d;
  const int64_t N = d.N, D = d.D, m = rows.size();
  for (int64_t h = 0; h < d.H; ++h) {
    const int64_t bh = b * d.H + h;
    transpose(p.k + bh * N * D, N, D, ws.kt);
    const T* Q = tile_as_acc(p.q + (bh * N + rows.lo) * D, m * D, ws.qb);
    T* S = ws.at(ws.A, h, rows.lo);
    gemm_rm<T>(false, false, m, N, D, p.scale, Q, D, ws.kt, N, T(0), S, N);
    for (int64_t i = 0; i < m; ++i) {
      T mx;
      const T sum = exp_row(S + i * N, N, &mx);
      scale_row(S + i * N, S + i * N, N, T(1) / sum);
    }
    if (probs) std::copy(S, S + m * N, probs + (bh * N + rows.lo) * N);
  }
}

// A on `rows` from the stored P, with the dropout mask applied.
template <typename scalar_t, typename T>
void load_attn(const Problem<scalar_t, T>& p, Planes<T>& ws, int64_t b, Range rows) {
  const int64_t N = p.d.N;
  for (int64_t h = 0; h < p.d.H; ++h) {
    const int64_t off = ((b * p.d.H + h) * N + rows.lo) * N;
    T* dst = ws.at(ws.A, h, rows.lo);
    const T* src = p.probs + off;
    if (!p.keep) {
      std::copy(src, src + rows.size() * N, dst);
      continue;
    }
    const bool* keep = p.keep + off;
    for (int64_t j = 0; j < rows.size() * N; ++j) dst[j] = keep[j] ? src[j] * p.drop_scale : T(0);
  }
}

// In place on the mask-applied A rows of the plane (training F1 with dropout).
template <typename scalar_t, typename T>
void apply_dropout(const Problem<scalar_t, T>& p, Planes<T>& ws, int64_t b, Range rows) {
  if (!p.keep) return;
  const int64_t N = p.d.N;
  for (int64_t h = 0; h < p.d.H; ++h) {
    const bool* keep = p.keep + ((b * p.d.H + h) * N + rows.lo) * N;
    T* a = ws.at(ws.A, h, rows.lo);
    for (int64_t j = 0; j < rows.size() * N; ++j) a[j] = keep[j] ? a[j] * p.drop_scale : T(0);
  }
}

// X1 = W_e A on `rows`; E = ReLU6(BN1(X1)) when the BN1 statistics are known.
template <typename T>
void expand(const Params<T>& w, const Norms<T>* nm, const Packed& pk, const Dims& d,
            Planes<T>& ws, Range rows) {
  const int64_t pix = rows.size() * d.N;
  gemm_rm<T>(false, false, d.C, pix, d.H, T(1), w.w_exp, d.H, ws.at(ws.A, 0, rows.lo), ws.ld(),
             T(0), ws.at(ws.X1, 0, rows.lo), ws.ld());
  if (!nm) return;
  for (int64_t c = 0; c < d.C; ++c)
    affine_relu6_row(ws.at(ws.E, c, rows.lo), ws.at(ws.X1, c, rows.lo), pix,
                     nm->s[pk.bn1 + c], nm->t[pk.bn1 + c]);
}

// X2 = W_d * E on `rows` (E must be in the planes on every image row within a halo of them).
template <typename T>
void depthwise(const Params<T>& w, const Dims& d, Planes<T>& ws, Range rows) {
  const int64_t N = d.N, K = d.K, h = d.halo();
  for (int64_t c = 0; c < d.C; ++c)
    for (int64_t i = rows.lo; i < rows.hi; ++i) {
      T* out = ws.at(ws.X2, c, i);
      std::fill(out, out + N, T(0));
      for (int64_t di = 0; di < K; ++di) {
        const int64_t r = i + di - h;
        if (r < 0 || r >= N) continue;  // zero padding above and below the image
        const T* in = ws.at(ws.E, c, r);
        for (int64_t dj = 0; dj < K; ++dj)
          shifted_axpy_row(out, in, N, dj - h, w.w_dw[(c * K + di) * K + dj]);
      }
    }
}

// F = ReLU6(BN2(X2)), then Y = W_r F, on `rows`.
template <typename T>
void project(const Params<T>& w, const Norms<T>& nm, const Packed& pk, const Dims& d,
             Planes<T>& ws, Range rows) {
  const int64_t pix = rows.size() * d.N;
  for (int64_t c = 0; c < d.C; ++c)
    affine_relu6_row(ws.at(ws.F, c, rows.lo), ws.at(ws.X2, c, rows.lo), pix, nm.s[pk.bn2 + c],
                     nm.t[pk.bn2 + c]);
  gemm_rm<T>(false, false, d.H, pix, d.C, T(1), w.w_pro, d.C, ws.at(ws.F, 0, rows.lo), ws.ld(),
             T(0), ws.at(ws.Y, 0, rows.lo), ws.ld());
}

// The whole chain up to Y on `x_rows` (A and E on x_rows plus a halo). A comes from the stored
// P, or (eval mode without a stored P) from the softmax, whose rows in `keep_rows` are then
// written to p.probs when that is set.
template <typename scalar_t, typename T>
void chain_to_y(const Problem<scalar_t, T>& p, const Norms<T>& nm, const Packed& pk,
                Planes<T>& ws, int64_t b, Range x_rows, bool from_probs = true) {
  const Range e_rows = clip(x_rows.lo - p.d.halo(), x_rows.hi + p.d.halo(), p.d.N);
  ws.lo = e_rows.lo;
  if (from_probs) {
    load_attn(p, ws, b, e_rows);
  } else {
    softmax_rows(p, ws, b, e_rows, static_cast<T*>(nullptr));
    if (p.probs)  // saved for an eval-mode backward: this tile's own rows only
      for (int64_t h = 0; h < p.d.H; ++h)
        std::copy(ws.at(ws.A, h, x_rows.lo), ws.at(ws.A, h, x_rows.hi),
                  p.probs + ((b * p.d.H + h) * p.d.N + x_rows.lo) * p.d.N);
  }
  expand(p.w, &nm, pk, p.d, ws, e_rows);
  depthwise(p.w, p.d, ws, x_rows);
  project(p.w, nm, pk, p.d, ws, x_rows);
}

// z = BN3(Y) + A as s3 Y + t3 + A, for one row of head h.
template <typename T>
inline T bn3_plus_a(const Norms<T>& nm, const Packed& pk, int64_t h, T y, T a) {
  return nm.s[pk.bn3 + h] * y + nm.t[pk.bn3 + h] + a;
}

// A* = BN_a(BN3(Y) + A) on `rows`, every head, into the As planes.
template <typename T>
void refine(const Norms<T>& nm, const Packed& pk, const Dims& d, Planes<T>& ws, Range rows) {
  const int64_t pix = rows.size() * d.N;
  for (int64_t h = 0; h < d.H; ++h) {
    const T s3 = nm.s[pk.bn3 + h], t3 = nm.t[pk.bn3 + h];
    const T sa = nm.s[pk.bna + h], ta = nm.t[pk.bna + h];
    const T* y = ws.at(ws.Y, h, rows.lo);
    const T* a = ws.at(ws.A, h, rows.lo);
    T* out = ws.at(ws.As, h, rows.lo);
    for (int64_t j = 0; j < pix; ++j) out[j] = sa * (s3 * y[j] + t3 + a[j]) + ta;
  }
}

// out rows = A* V per head.
template <typename scalar_t, typename T>
void attend(const Problem<scalar_t, T>& p, Planes<T>& ws, int64_t b, Range rows,
            scalar_t* out) {
  const int64_t N = p.d.N, D = p.d.D, m = rows.size();
  for (int64_t h = 0; h < p.d.H; ++h) {
    const int64_t bh = b * p.d.H + h;
    const T* V = tile_as_acc(p.v + bh * N * D, N * D, ws.vb);
    T* O = kernels::out_tile(out + (bh * N + rows.lo) * D, ws.qb);
    gemm_rm<T>(false, false, m, D, N, T(1), ws.at(ws.As, h, rows.lo), N, V, D, T(0), O, D);
    store_tile(out + (bh * N + rows.lo) * D, O, m * D);
  }
}

}  // namespace fastattnreg::cpu::refiner
