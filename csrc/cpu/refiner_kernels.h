// CPU kernels of the fused Refiner attention (DeepViT's Refiner), for refiner.cpp.
//
// The attention map A (B, H, N, N) is an image with H channels (query x key, zero padding). With
// C = expansion * H expanded channels:
//   E = ReLU6(BN1(W_e A))  F = ReLU6(BN2(W_d * E))  Y = W_r F  A* = BN_a(BN3(Y) + A)  out = A* V
// Nothing of size (B, C, N, N) ever exists. Work is done on tiles: one batch element, a block of
// query rows and every channel at once (the 1x1 convolutions mix the heads). A tile recomputes
// the chain from A for its rows plus a (k-1)/2-row halo (2 halos where the backward needs the
// transposed convolution on halo rows), in planes of (channels x rows x N) laid out so that a
// channel's rows are one contiguous run: each 1x1 convolution is one pass over the tile's pixels
// (refiner_mix.h), each BatchNorm sum one pass over a run (refiner_rows.h).
//
// Eval mode: each BatchNorm is a per-channel affine map; one pass per tile from q, k to out.
// Training mode: BatchNorm statistics are global reductions, so the forward runs 4 passes and
// the backward 3 (below); every pass reads the stored P (B, H, N, N) instead of redoing the
// softmax (our choice: P costs 1/(3 * expansion + 6) of the eager module's maps and saves a
// Q K^T GEMM, the most expensive step per pixel, in 6 of 7 passes).
//   forward  F1 softmax -> P stored; BN1 statistics from the sums and the Gram matrix of A
//               (W_e is linear: mean and variance of W_e A follow from them)
//            F2 E, X2 = W_d * E -> BN2 statistics (shifted sums per tile, Chan merge)
//            F3 F, Y -> BN3 statistics and BN_a's (co-moments of Y and A per head); Y stored
//               and kept for the backward
//            F4 A* from A and Y, out = A* V
//   backward B1 dA* = dout V^T stored; sums for BN_a and BN3 (dz is affine in dA*), from the
//               kept Y: no refinement chain in this pass
//            B2 dz, dy, du2 -> sums for BN2 and, through the adjoint of the depthwise
//               convolution, for BN1 (see there)
//            B3 (one task per batch element) dx2 on the halo, dE = W_d^T * dx2, dx1, dA,
//               dS = P (dP - rowsum), dq, dk, dv; dW_e, dW_d, dW_r
// Exported maps (export != "none"): the pass that forms A* (F4, or the eval pass) writes them from
// its A* planes (export_maps); B1 adds their gradient into dA* right after dA* = dout V^T
// (add_maps_grad), so the rest of the backward carries it to every input unchanged.
// Extra memory in training: P and Y from the forward to the backward, dA* during the backward,
// all (B, H, N, N); the dropout keep-mask (B, H, N, N) bool when attn_drop > 0. (Keeping Y
// costs one map and saves the chain in B1, ~5% of a training step at (64, 3, 65, 64).) The dA*
// map and the per-worker planes are kept from one call to the next (KeptMap, PlanesPool).
// Every pass writes per-task partials that are merged in task order, so results are bitwise
// repeatable whichever thread ran a task.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <array>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "attention_kernels.h"
#include "blas.h"
#include "kept_cache.h"
#include "score_gemm.h"
#include "refiner_mix.h"
#include "refiner_rows.h"
#include "rowops.h"

namespace fastattnreg::cpu::refiner {

using kernels::key_copy_ld;
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

// Rows per tile: an expanded plane (C x rows x N) of about kPlaneElems (128 KiB of float, so the
// dozen planes of a tile stay near the 2 MiB L2; 16 to 64 Ki measured alike within noise), at
// least 8 rows, then balanced so that no block is a sliver.
constexpr int64_t kPlaneElems = 32 * 1024;
inline int64_t tile_rows(const Dims& d) {
  // A whole image within twice the budget is one tile: no halo rows to recompute at all.
  if (d.C * d.N * d.N <= 2 * kPlaneElems) return d.N;
  const int64_t cap = std::max<int64_t>(8, kPlaneElems / (d.C * d.N) - 4 * d.halo());
  const int64_t blocks = (d.N + cap - 1) / cap;
  return (d.N + blocks - 1) / blocks;
}

// Per-worker planes of one tile. All planes index global query rows from the same `lo`. E and
// DX2 (the inputs of the depthwise convolution and of its transpose) are padded: each row has
// `halo` zeros on both sides, so every tap reads in bounds and the zero padding of the image
// along the key axis costs nothing.
template <typename T>
struct Planes {
  int64_t cap, n, hl, np, lo = 0;  // rows per channel, N, halo, padded row length N + 2 halo
  at::Tensor mem, padded;
  T *A, *Y, *As, *dZ, *dY, *dA;  // H channels: A, Y = W_r F, A*, dz, dy, dA
  T *X1, *X2, *F, *dF, *dE;            // C channels: W_e A, W_d * E, F, and gradients
  T *E, *DX2;                          // C channels, padded rows: E, dx2
  T* zero_row;                         // a padded row of zeros: image rows outside [0, N)
  T *kt, *qb, *vb;                     // K^T or V^T (D x N, leading dim kld); rows x D; N x D
  int64_t kld;                         // key_copy_ld(N): kt's rows start 64-byte aligned
  // A is read through a() and a_ld(): either the A plane, or (a_view set) the stored P itself,
  // whose heads lie N x N apart. Without dropout the tile's A is exactly those rows of P, so
  // every pass but the first reads them in place instead of copying them (the copies were ~5%
  // of a training step at N = 65).
  const T* a_view = nullptr;  // row `lo` of head 0 of the tile's batch element in P
  int64_t a_cs = 0;           // head stride of a_view
  T* at(T* buf, int64_t c, int64_t r) const { return buf + (c * cap + (r - lo)) * n; }
  T* at_pad(T* buf, int64_t c, int64_t r) const { return buf + (c * cap + (r - lo)) * np + hl; }
  int64_t ld() const { return cap * n; }
  const T* a(int64_t h, int64_t r) const {
    return a_view ? a_view + h * a_cs + (r - lo) * n : at(A, h, r);
  }
  int64_t a_ld() const { return a_view ? a_cs : ld(); }

  Planes(const Dims& d, int64_t block)
      : cap(block + 4 * d.halo()), n(d.N), hl(d.halo()), np(d.N + 2 * d.halo()),
        kld(key_copy_ld(d.N)) {
    const int64_t hp = d.H * cap * n, cp = d.C * cap * n;
    mem = scratch<T>(d.D * kld + 6 * hp + 5 * cp + cap * d.D + n * d.D);
    T* p = mem.data_ptr<T>();
    kt = p, p += d.D * kld;  // first: the buffer's 64-byte aligned start
    for (T** b : {&A, &Y, &As, &dZ, &dY, &dA}) *b = p, p += hp;
    for (T** b : {&X1, &X2, &F, &dF, &dE}) *b = p, p += cp;
    qb = p, p += cap * d.D;
    vb = p;
    // The margins are never written: zero them once.
    padded = at::zeros({2 * d.C * cap * np + np}, mem.options());
    E = padded.data_ptr<T>();
    DX2 = E + d.C * cap * np;
    zero_row = DX2 + d.C * cap * np + hl;
  }
};

// Prints the wall time of a pass to stderr when FASTATTNREG_PROFILE is set (for tuning).
class PassTimer {
 public:
  explicit PassTimer(const char* name)
      : name_(name), on_(enabled()), t0_(std::chrono::steady_clock::now()) {}
  ~PassTimer() {
    if (!on_) return;
    const double ms = std::chrono::duration<double, std::milli>(
                          std::chrono::steady_clock::now() - t0_).count();
    std::fprintf(stderr, "[fastattnreg refiner] %s %.2f ms\n", name_, ms);
  }

 private:
  static bool enabled() {
    static const bool on = std::getenv("FASTATTNREG_PROFILE") != nullptr;
    return on;
  }
  const char* name_;
  bool on_;
  std::chrono::steady_clock::time_point t0_;
};

// The per-worker planes of one forward or backward call: taken on a worker's first task (kept
// from an earlier call of the same shape, else made), reused by every later pass of the call,
// kept for the next call at the end (kept_cache.h). Made per pass, their allocation (page
// faults, and zeroing the padded planes) cost ~1 ms of every pass at (64, 3, 65, 64) on two
// threads; made per call, ~1,000 page faults per training step.
template <typename T>
class PlanesPool {
 public:
  PlanesPool(const Dims& d, int64_t block)
      : d_(d), block_(block), slots_(std::max<int64_t>(1, at::get_num_threads())) {}
  ~PlanesPool() {
    for (auto& slot : slots_)
      if (slot) cache().give_back(key(), std::move(slot), static_cast<int64_t>(slots_.size()));
  }
  PlanesPool(const PlanesPool&) = delete;
  PlanesPool& operator=(const PlanesPool&) = delete;
  Planes<T>& get(int64_t worker) {
    std::unique_ptr<Planes<T>>& slot = slots_.at(worker);
    if (!slot) {
      auto kept = cache().take(key());
      slot = kept ? std::move(*kept) : std::make_unique<Planes<T>>(d_, block_);
    }
    return *slot;
  }

 private:
  // Everything the planes' layout depends on (B is not: a plane holds one batch element).
  using Key = std::array<int64_t, 6>;
  using Cache = KeptCache<Key, std::unique_ptr<Planes<T>>>;
  Key key() const { return {d_.H, d_.N, d_.D, d_.C, d_.K, block_}; }
  static Cache& cache() { return Cache::template instance<PlanesPool>(); }

  Dims d_;
  int64_t block_;
  std::vector<std::unique_ptr<Planes<T>>> slots_;
};

// A (B, H, N, N) scratch map in the accumulation type, kept between calls (kept_cache.h): dA*
// during the backward.
template <typename T>
class KeptMap {
 public:
  explicit KeptMap(int64_t numel) : numel_(numel) {
    auto kept = cache().take(numel);
    buf_ = kept ? std::move(*kept) : scratch<T>(numel);
  }
  ~KeptMap() { cache().give_back(numel_, std::move(buf_), 1); }
  KeptMap(const KeptMap&) = delete;
  KeptMap& operator=(const KeptMap&) = delete;
  T* data() const { return buf_.data_ptr<T>(); }

 private:
  using Cache = KeptCache<int64_t, at::Tensor>;
  static Cache& cache() { return Cache::template instance<KeptMap>(); }
  int64_t numel_;
  at::Tensor buf_;
};

// Runs body(task, worker_planes) over `tasks` tasks on torch's threads, dynamically scheduled.
// parallel_for hands each worker a distinct index in [0, workers), its slot in the pool.
template <typename T, typename Body>
void for_each_task(PlanesPool<T>& pool, int64_t tasks, const Body& body) {
  TaskQueue queue(tasks);
  at::parallel_for(0, queue.workers(), 1, [&](int64_t worker, int64_t) {
    SingleThreadedBlas blas_guard;
    Planes<T>& ws = pool.get(worker);
    for (int64_t t; queue.next(&t);) body(t, ws);
  });
}

// ------------------------------------------------------------------------ forward chain steps

// A on `rows` (from ws.lo = rows.lo) from the stored P, with the dropout mask applied: a view of
// P itself without dropout, else a masked copy in the A plane.
template <typename scalar_t, typename T>
void load_attn(const Problem<scalar_t, T>& p, Planes<T>& ws, int64_t b, Range rows) {
  const int64_t N = p.d.N;
  if (!p.keep) {
    ws.a_view = p.probs + (b * p.d.H * N + rows.lo) * N;
    ws.a_cs = N * N;
    return;
  }
  ws.a_view = nullptr;
  for (int64_t h = 0; h < p.d.H; ++h) {
    const int64_t off = ((b * p.d.H + h) * N + rows.lo) * N;
    T* dst = ws.at(ws.A, h, rows.lo);
    const T* src = p.probs + off;
    const bool* keep = p.keep + off;
    for (int64_t j = 0; j < rows.size() * N; ++j) dst[j] = keep[j] ? src[j] * p.drop_scale : T(0);
  }
}

// P on `rows` = softmax(scale q k^T) for batch b, every head, written to `probs` (the stored P,
// then A is load_attn's) or, with probs = nullptr, to the A plane.
template <typename scalar_t, typename T>
void softmax_rows(const Problem<scalar_t, T>& p, Planes<T>& ws, int64_t b, Range rows,
                  T* probs) {
  const auto& d = p.d;
  const int64_t N = d.N, D = d.D, m = rows.size();
  for (int64_t h = 0; h < d.H; ++h) {
    const int64_t bh = b * d.H + h;
    transpose(p.k + bh * N * D, N, D, ws.kt, ws.kld);
    const T* Q = tile_as_acc(p.q + (bh * N + rows.lo) * D, m * D, ws.qb);
    T* S = probs ? probs + (bh * N + rows.lo) * N : ws.at(ws.A, h, rows.lo);
    score_gemm_nn<T>(m, N, D, p.scale, Q, D, ws.kt, ws.kld, S, N);
    for (int64_t i = 0; i < m; ++i) {
      T mx;
      const T sum = exp_row(S + i * N, N, &mx);
      scale_row(S + i * N, S + i * N, N, T(1) / sum);
    }
  }
  if (probs) {
    load_attn(p, ws, b, rows);
  } else {
    ws.a_view = nullptr;
  }
}

// X1 = W_e A and E = ReLU6(BN1(X1)) on `rows`, in one pass (refiner_mix.h).
template <typename T>
void expand(const Params<T>& w, const Norms<T>& nm, const Packed& pk, const Dims& d,
            Planes<T>& ws, Range rows) {
  for (int64_t i = rows.lo; i < rows.hi; ++i)
    mix_affine_relu6_row(w.w_exp, d.C, d.H, ws.a(0, i), ws.a_ld(), &nm.s[pk.bn1],
                         &nm.t[pk.bn1], ws.at(ws.X1, 0, i), ws.ld(), ws.at_pad(ws.E, 0, i),
                         ws.cap * ws.np, d.N);
}

// out = W * in on `rows`, depthwise K x K, from a padded plane (the image's rows outside
// [0, N) count as zero; `in` must hold every image row within a halo of `rows`).
template <typename T>
void depthwise(const T* weights, const Dims& d, const Planes<T>& ws, T* in_pad, T* out,
               Range rows) {
  const int64_t N = d.N, K = d.K;
  for (int64_t c = 0; c < d.C; ++c) {
    const auto in_row = [&](int64_t r) -> const T* {
      return (r < 0 || r >= N) ? ws.zero_row : ws.at_pad(in_pad, c, r);
    };
    const auto out_row = [&](int64_t i) { return ws.at(out, c, i); };
    const T* w = weights + c * K * K;
    with_fixed_k(K, [&](auto fixed) {
      depthwise_rows<decltype(fixed)::value>(w, K, rows.lo, rows.hi, N, in_row, out_row);
    });
  }
}

// F = ReLU6(BN2(X2)), then Y = W_r F, on `rows`, in one pass (refiner_mix.h).
template <typename T>
void project(const Params<T>& w, const Norms<T>& nm, const Packed& pk, const Dims& d,
             Planes<T>& ws, Range rows) {
  affine_relu6_mix(ws.at(ws.X2, 0, rows.lo), &nm.s[pk.bn2], &nm.t[pk.bn2], w.w_pro, d.H, d.C,
                   ws.at(ws.F, 0, rows.lo), ws.at(ws.Y, 0, rows.lo), ws.ld(),
                   rows.size() * d.N);
}

// H-channel rows [rows) of batch b from a (B, H, N, N) buffer into a plane.
template <typename T>
void load_rows(const T* src, const Dims& d, Planes<T>& ws, T* plane, int64_t b, Range rows) {
  for (int64_t h = 0; h < d.H; ++h) {
    const T* from = src + ((b * d.H + h) * d.N + rows.lo) * d.N;
    std::copy(from, from + rows.size() * d.N, ws.at(plane, h, rows.lo));
  }
}

// ... and back.
template <typename T>
void store_rows(T* dst, const Dims& d, const Planes<T>& ws, T* plane, int64_t b, Range rows) {
  for (int64_t h = 0; h < d.H; ++h) {
    const T* from = ws.at(plane, h, rows.lo);
    std::copy(from, from + rows.size() * d.N, dst + ((b * d.H + h) * d.N + rows.lo) * d.N);
  }
}

// The chain up to X2 = W_d * E on `x_rows` (A and E on x_rows plus a halo). A comes from the
// stored P, or (eval mode without a stored P) from the softmax, whose rows in x_rows are then
// written to p.probs when that is set.
template <typename scalar_t, typename T>
void chain_to_x2(const Problem<scalar_t, T>& p, const Norms<T>& nm, const Packed& pk,
                 Planes<T>& ws, int64_t b, Range x_rows, bool from_probs = true) {
  const Range e_rows = clip(x_rows.lo - p.d.halo(), x_rows.hi + p.d.halo(), p.d.N);
  ws.lo = e_rows.lo;
  if (from_probs) {
    load_attn(p, ws, b, e_rows);
  } else {
    softmax_rows(p, ws, b, e_rows, static_cast<T*>(nullptr));
    if (p.probs) store_rows(p.probs, p.d, ws, ws.A, b, x_rows);  // for an eval backward
  }
  expand(p.w, nm, pk, p.d, ws, e_rows);
  depthwise(p.w.w_dw, p.d, ws, ws.E, ws.X2, x_rows);
}

// The whole chain up to Y on `x_rows`.
template <typename scalar_t, typename T>
void chain_to_y(const Problem<scalar_t, T>& p, const Norms<T>& nm, const Packed& pk,
                Planes<T>& ws, int64_t b, Range x_rows, bool from_probs = true) {
  chain_to_x2(p, nm, pk, ws, b, x_rows, from_probs);
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
    const T* a = ws.a(h, rows.lo);
    T* out = ws.at(ws.As, h, rows.lo);
    for (int64_t j = 0; j < pix; ++j) out[j] = sa * (s3 * y[j] + t3 + a[j]) + ta;
  }
}

// The exported maps of A*: kind and where they go (nullptr when kind is None), q's dtype.
//   Full (B, H, N, N); HeadMean (B, N, N), the mean over heads; Cls (B, H, N), row 0 per head.
template <typename scalar_t>
struct MapsOut {
  ExportKind kind = ExportKind::None;
  scalar_t* data = nullptr;
};

// n values from the accumulation type into the maps' dtype.
template <typename scalar_t, typename T>
void store_run(scalar_t* dst, const T* src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    std::copy(src, src + n, dst);
  } else {
    convert_row(dst, src, n);
  }
}

// Writes the exported maps on `rows` of batch b from the As planes (refine()'s A*). HeadMean sums
// the heads in head order into the dA planes' first channel (unused in the forward), then divides
// by H; Cls writes only from the tile that holds row 0.
template <typename scalar_t, typename T>
void export_maps(const Dims& d, Planes<T>& ws, int64_t b, Range rows,
                 const MapsOut<scalar_t>& maps) {
  const int64_t N = d.N, H = d.H, pix = rows.size() * N;
  switch (maps.kind) {
    case ExportKind::Full:
      for (int64_t h = 0; h < H; ++h)
        store_run(maps.data + ((b * H + h) * N + rows.lo) * N, ws.at(ws.As, h, rows.lo), pix);
      break;
    case ExportKind::HeadMean: {
      T* sum = ws.at(ws.dA, 0, rows.lo);
      const T* first = ws.at(ws.As, 0, rows.lo);
      std::copy(first, first + pix, sum);
      for (int64_t h = 1; h < H; ++h) {
        const T* a = ws.at(ws.As, h, rows.lo);
        for (int64_t j = 0; j < pix; ++j) sum[j] += a[j];
      }
      for (int64_t j = 0; j < pix; ++j) sum[j] /= T(H);
      store_run(maps.data + (b * N + rows.lo) * N, static_cast<const T*>(sum), pix);
      break;
    }
    case ExportKind::Cls:
      if (rows.lo == 0)
        for (int64_t h = 0; h < H; ++h)
          store_run(maps.data + (b * H + h) * N, ws.at(ws.As, h, 0), N);
      break;
    default:  // None: nothing exported
      break;
  }
}

// dA* += the gradient of the exported maps, on `rows` (m = rows.size()) of head h of batch b:
// das points at row rows.lo of that head's dA* (m x N). HeadMean spreads dmaps / H over every
// head; Cls adds to row 0 only.
template <typename scalar_t, typename T>
void add_maps_grad(const Dims& d, ExportKind kind, const scalar_t* dmaps, int64_t b, int64_t h,
                   Range rows, T* das) {
  const int64_t N = d.N, H = d.H, pix = rows.size() * N;
  switch (kind) {
    case ExportKind::Full: {
      const scalar_t* g = dmaps + ((b * H + h) * N + rows.lo) * N;
      for (int64_t j = 0; j < pix; ++j) das[j] += T(g[j]);
      break;
    }
    case ExportKind::HeadMean: {
      const scalar_t* g = dmaps + (b * N + rows.lo) * N;
      for (int64_t j = 0; j < pix; ++j) das[j] += T(g[j]) / T(H);
      break;
    }
    case ExportKind::Cls:
      if (rows.lo == 0) {
        const scalar_t* g = dmaps + (b * H + h) * N;
        for (int64_t j = 0; j < N; ++j) das[j] += T(g[j]);
      }
      break;
    default:  // None: nothing exported
      break;
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
    score_gemm_nn<T>(m, D, N, T(1), ws.at(ws.As, h, rows.lo), N, V, D, O, D);
    store_tile(out + (bh * N + rows.lo) * D, O, m * D);
  }
}

}  // namespace fastattnreg::cpu::refiner
