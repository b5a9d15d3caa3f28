// The backward passes of the fused Refiner attention (see refiner_kernels.h for the plan).
//
// Each BatchNorm's backward, u = gamma x_hat + beta, x_hat = (x - mean) invstd, is
//   dx = gamma invstd (du - c_beta - x_hat c_gamma),  c_beta = sum du / n, c_gamma = sum du x_hat / n
// in training mode; with frozen statistics (eval mode) c_beta = c_gamma = 0. The sums are also
// the gradients of beta and gamma. Each pass computes the sums one BatchNorm needs.
#pragma once

#include <vector>

#include "refiner_forward.h"

namespace fastattnreg::cpu::refiner {

// Gradient buffers of the backward (acc type; the entry point converts).
template <typename scalar_t, typename T>
struct Grads {
  const scalar_t* dout;  // (B, H, N, D)
  T* dattn;              // (B, H, N, N) scratch: dA* = dout V^T (+ dmaps), written by B1
  scalar_t *dq, *dk, *dv;
  T *dw_exp, *dw_dw, *dw_pro, *dgamma, *dbeta;  // (C, H), (C, K, K), (H, C), packed x 2
  // The gradient of the exported maps (shape by export_kind, see MapsOut), or nullptr.
  const scalar_t* dmaps = nullptr;
  ExportKind export_kind = ExportKind::None;
};

// Per BatchNorm channel: dx = k (du - cb - x_hat cg).
template <typename T>
struct BnGrad {
  std::vector<T> k, cb, cg;
  explicit BnGrad(int64_t n) : k(n, T(0)), cb(n, T(0)), cg(n, T(0)) {}
};

// B1's six sums over a run of n values of head h (the tile's rows), in one pass (z_hat, y_hat
// never stored): into v[0..5] sum dA*, dA* z_hat, dA* y_hat, z_hat y_hat, z_hat, y_hat, with
// z = s3 y + t3 + a the input of BN_a (packed index a) and y that of BN3 (c3).
template <typename T>
FASTATTNREG_ROW_PASS void bn_a_bn3_run_sums(const Norms<T>& nm, int64_t a, int64_t c3, const T* y,
                                            const T* at, const T* das, int64_t n, VecSum<T>* v) {
  using V = at::vec::Vectorized<T>;
  const V s3(nm.s[c3]), t3(nm.t[c3]), ma(nm.mean[a]), ia(nm.invstd[a]);
  const V m3(nm.mean[c3]), i3(nm.invstd[c3]), zero(T(0));
  sum_run<T, 6>(n, v, [&](int64_t j, int64_t c, V* acc) {
    const V yv = V::loadu(y + j, c), dv = V::loadu(das + j, c);  // tail lanes load 0
    // The tail lanes of z_hat and y_hat are not 0 (the shifts): zeroed for their own sums.
    const V zh = V::set(zero, (at::vec::fmadd(s3, yv, t3) + V::loadu(at + j, c) - ma) * ia, c);
    const V yh = V::set(zero, (yv - m3) * i3, c);
    acc[0] = acc[0] + dv;
    acc[1] = at::vec::fmadd(dv, zh, acc[1]);
    acc[2] = at::vec::fmadd(dv, yh, acc[2]);
    acc[3] = at::vec::fmadd(zh, yh, acc[3]);
    acc[4] = acc[4] + zh;
    acc[5] = acc[5] + yh;
  });
}

// B2's eight sums over a run of n values of channel c (the tile's rows), in one pass (x_hat2
// never stored): into v[0..7] sum du2, du2 x_hat2, then for G = g0 and G' = g1 each: sum G du2,
// G x_hat2, G.
template <typename T>
FASTATTNREG_ROW_PASS void bn2_bn1_run_sums(T mean2, T invstd2, const T* du2, const T* x2,
                                           const T* g0, const T* g1, int64_t n, VecSum<T>* v) {
  using V = at::vec::Vectorized<T>;
  const V m2(mean2), i2(invstd2), zero(T(0));
  sum_run<T, 8>(n, v, [&](int64_t j, int64_t c, V* acc) {
    const V du = V::loadu(du2 + j, c);  // tail lanes load 0
    const V xh = V::set(zero, (V::loadu(x2 + j, c) - m2) * i2, c);  // tail lanes zeroed
    acc[0] = acc[0] + du;
    acc[1] = at::vec::fmadd(du, xh, acc[1]);
    const V gs[2] = {V::loadu(g0 + j, c), V::loadu(g1 + j, c)};
    for (int k = 0; k < 2; ++k) {
      acc[2 + 3 * k] = at::vec::fmadd(gs[k], du, acc[2 + 3 * k]);
      acc[3 + 3 * k] = at::vec::fmadd(gs[k], xh, acc[3 + 3 * k]);
      acc[4 + 3 * k] = acc[4 + 3 * k] + gs[k];
    }
  });
}

// dz = BN_a backward of dA*, dy = BN3 backward of dz, on `rows` of every head. dattn: the stored
// dA* of the tile's batch element (H, N, N), read in place; y_rows: Y on the rows of head 0
// (the Y planes, or the forward's kept Y), heads y_ld apart.
template <typename T>
void grad_dz_dy(const Norms<T>& nm, const BnGrad<T>& g, const Packed& pk, const Dims& d,
                const T* dattn, const T* y_rows, int64_t y_ld, Planes<T>& ws, Range rows) {
  const int64_t pix = rows.size() * d.N;
  for (int64_t h = 0; h < d.H; ++h) {
    const int64_t a = pk.bna + h, c3 = pk.bn3 + h;
    const T s3 = nm.s[c3], t3 = nm.t[c3], ma = nm.mean[a], ia = nm.invstd[a];
    const T m3 = nm.mean[c3], i3 = nm.invstd[c3];
    // Locals and restrict: with the coefficients read through g's vectors inside the loop, GCC
    // could not rule out that the stores to dz, dy change them, and left the loop scalar.
    const T ka = g.k[a], cba = g.cb[a], cga = g.cg[a];
    const T k3 = g.k[c3], cb3 = g.cb[c3], cg3 = g.cg[c3];
    const T* __restrict y = y_rows + h * y_ld;
    const T* __restrict at = ws.a(h, rows.lo);
    const T* __restrict das = dattn + (h * d.N + rows.lo) * d.N;
    T* __restrict dz = ws.at(ws.dZ, h, rows.lo);
    T* __restrict dy = ws.at(ws.dY, h, rows.lo);
    for (int64_t j = 0; j < pix; ++j) {
      const T zhat = (s3 * y[j] + t3 + at[j] - ma) * ia;
      const T yhat = (y[j] - m3) * i3;
      const T dzj = ka * (das[j] - cba - zhat * cga);
      dz[j] = dzj;
      dy[j] = k3 * (dzj - cb3 - yhat * cg3);
    }
  }
}

// dx = k (du - cb - x_hat cg), x_hat = (x - mean) invstd, at one vector, for channel i (packed
// index) of a BatchNorm.
template <typename T>
inline at::vec::Vectorized<T> bn_backward_vec(const Norms<T>& nm, const BnGrad<T>& g, int64_t i,
                                              const at::vec::Vectorized<T>& du,
                                              const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  const V xhat = (x - V(nm.mean[i])) * V(nm.invstd[i]);
  return V(g.k[i]) * (du - V(g.cb[i]) - xhat * V(g.cg[i]));
}

// ... for one row of n values.
template <typename T>
void bn_backward_row(const Norms<T>& nm, const BnGrad<T>& g, int64_t i, T* dx, const T* du,
                     const T* x, int64_t n) {
  using V = at::vec::Vectorized<T>;
  for_each_vec<T>(n, [&](int64_t j, int64_t cnt) {
    bn_backward_vec(nm, g, i, V::loadu(du + j, cnt), V::loadu(x + j, cnt)).store(dx + j, cnt);
  });
}

// dF = W_r^T dy, then du2 = dF * ReLU6'(BN2(X2)), in the dF planes on `rows`: one output
// channel at a time, its H weights the same for the whole pass (6% faster over B3 than
// refiner_mix.h's mix_vec, which takes every output at each pixel vector).
template <typename T>
void grad_du2(const Params<T>& w, const Norms<T>& nm, const Packed& pk, const Dims& d,
              Planes<T>& ws, Range rows) {
  const int64_t ld = ws.ld();
  const T* dy = ws.at(ws.dY, 0, rows.lo);
  const T* x2 = ws.at(ws.X2, 0, rows.lo);
  T* df = ws.at(ws.dF, 0, rows.lo);
  using V = at::vec::Vectorized<T>;
  const int64_t pix = rows.size() * d.N;
  for (int64_t c = 0; c < d.C; ++c) {
    const T s2 = nm.s[pk.bn2 + c], t2 = nm.t[pk.bn2 + c];
    const T* x2c = x2 + c * ld;
    T* dfc = df + c * ld;
    for_each_vec<T>(pix, [&](int64_t j, int64_t cnt) {
      V acc(T(0));
      for (int64_t h = 0; h < d.H; ++h)  // column c of W_r
        acc = at::vec::fmadd(V::loadu(dy + h * ld + j, cnt), V(w.w_pro[h * d.C + c]), acc);
      relu6_grad_vec(acc, V::loadu(x2c + j, cnt), s2, t2).store(dfc + j, cnt);
    });
  }
}

// dx1 = BN1 backward of du1 = dE * ReLU6'(BN1(X1)), in the dE planes, then
// dA = W_e^T dx1 + dz (the residual) into the dA planes, on `rows`, in one pass.
template <typename T>
void grad_dx1_da(const Params<T>& w, const Norms<T>& nm, const BnGrad<T>& g, const Packed& pk,
                 const Dims& d, Planes<T>& ws, Range rows) {
  const int64_t ld = ws.ld();
  T* de = ws.at(ws.dE, 0, rows.lo);
  const T* x1 = ws.at(ws.X1, 0, rows.lo);
  const T* dz = ws.at(ws.dZ, 0, rows.lo);
  T* da = ws.at(ws.dA, 0, rows.lo);
  for_each_vec<T>(rows.size() * d.N, [&](int64_t j, int64_t cnt) {
    using V = at::vec::Vectorized<T>;
    for (int64_t c = 0; c < d.C; ++c) {
      const int64_t i = pk.bn1 + c;
      const V x = V::loadu(x1 + c * ld + j, cnt);
      const V du = relu6_grad_vec(V::loadu(de + c * ld + j, cnt), x, nm.s[i], nm.t[i]);
      bn_backward_vec(nm, g, i, du, x).store(de + c * ld + j, cnt);
    }
    mix_vec(w.w_exp, 1, d.H, d.H, d.C, static_cast<const T*>(de), ld, j, cnt,  // W_e^T
            [&](int64_t h, const V& v) {
              (v + V::loadu(dz + h * ld + j, cnt)).store(da + h * ld + j, cnt);
            });
  });
}

// Sums interleaved per channel (sum du, sum du x_hat, ...) or, with interleaved = false, all sums
// of du then all sums of du x_hat.
template <typename T>
void finish_bn(const std::vector<Sum>& sums, const Params<T>& w, const Norms<T>& nm,
               int64_t first, int64_t channels, bool frozen, double n, T* dgamma, T* dbeta,
               BnGrad<T>& g, bool interleaved = true) {
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t i = first + c;
    const Sum& sb = interleaved ? sums[2 * c] : sums[c];
    const Sum& sg = interleaved ? sums[2 * c + 1] : sums[channels + c];
    dbeta[i] = T(sb.v);
    dgamma[i] = T(sg.v);
    g.k[i] = T(double(w.gamma[i]) * double(nm.invstd[i]));
    g.cb[i] = frozen ? T(0) : T(sb.v / n);
    g.cg[i] = frozen ? T(0) : T(sg.v / n);
  }
}

// The chain and its gradient up to du2 on `x_rows` (dA* from the stored map). y_saved: the
// forward's kept Y or nullptr; with it and without need_f the chain stops at X2.
template <typename scalar_t, typename T>
void grad_to_du2(const Problem<scalar_t, T>& p, const Grads<scalar_t, T>& gr, const Norms<T>& nm,
                 const BnGrad<T>& g, const Packed& pk, Planes<T>& ws, int64_t b, Range x_rows,
                 const T* y_saved, bool need_f) {
  const Dims& d = p.d;
  const T* dattn = gr.dattn + b * d.H * d.N * d.N;
  if (y_saved && !need_f) {
    chain_to_x2(p, nm, pk, ws, b, x_rows);
    grad_dz_dy(nm, g, pk, d, dattn, y_saved + (b * d.H * d.N + x_rows.lo) * d.N, d.N * d.N, ws,
               x_rows);
  } else {
    chain_to_y(p, nm, pk, ws, b, x_rows);
    grad_dz_dy(nm, g, pk, d, dattn, ws.at(ws.Y, 0, x_rows.lo), ws.ld(), ws, x_rows);
  }
  grad_du2(p.w, nm, pk, p.d, ws, x_rows);
}

// B3's chain: dx2 on the tile's rows plus a halo (into the padded DX2 planes), then
// dE = W_d^T * dx2, du1 and dx1 on the rows (in the dE planes), and dA = W_e^T dx1 + dz.
template <typename scalar_t, typename T>
void grad_to_dx1(const Problem<scalar_t, T>& p, const Grads<scalar_t, T>& gr, const Norms<T>& nm,
                 const BnGrad<T>& g, const Packed& pk, const T* w_dw_flipped, Planes<T>& ws,
                 int64_t b, Range rows) {
  const Dims& d = p.d;
  const int64_t N = d.N;
  const Range x_rows = clip(rows.lo - d.halo(), rows.hi + d.halo(), N);
  grad_to_du2(p, gr, nm, g, pk, ws, b, x_rows, static_cast<const T*>(nullptr), /*need_f=*/true);
  for (int64_t c = 0; c < d.C; ++c)
    for (int64_t i = x_rows.lo; i < x_rows.hi; ++i)
      bn_backward_row(nm, g, pk.bn2 + c, ws.at_pad(ws.DX2, c, i), ws.at(ws.dF, c, i),
                      ws.at(ws.X2, c, i), N);
  // The transposed convolution is the convolution with the kernel rotated by 180 degrees.
  depthwise(w_dw_flipped, d, ws, ws.DX2, ws.dE, rows);
  grad_dx1_da(p.w, nm, g, pk, d, ws, rows);
}

// What the backward passes share besides the Passes: the forward's BatchNorm maps, the
// BatchNorm gradient factors each pass completes for the next, the flipped depthwise weights
// (the convolution's adjoint), whether the statistics were frozen (eval mode) and the forward's
// Y (B, H, N, N), or nullptr (recomputed).
template <typename T>
struct BackwardState {
  Norms<T> nm;
  BnGrad<T> g;
  std::vector<T> w_dw_flipped;  // (C, K, K)
  bool frozen;
  const T* y_saved;
  BackwardState(const Params<T>& w, const Dims& d, const Packed& pk,
                const std::vector<double>& mean, const std::vector<double>& var,
                const std::vector<double>& eps, bool frozen_stats, const T* y)
      : nm(w, mean, var, eps, pk), g(pk.total), w_dw_flipped(d.C * d.K * d.K),
        frozen(frozen_stats), y_saved(y) {
    const int64_t kk = d.K * d.K;
    for (int64_t c = 0; c < d.C; ++c)
      for (int64_t j = 0; j < kk; ++j) w_dw_flipped[c * kk + j] = w.w_dw[c * kk + (kk - 1 - j)];
  }
};

// B1: dA* = dout V^T + the maps' gradient (stored); per head the sums of dA*, dA* z_hat,
// dA* y_hat, z_hat y_hat, z_hat, y_hat. dz is affine in dA* given the forward, so BN3's sums
// follow from them too.
template <typename scalar_t, typename T>
void backward_bn_a_bn3_sums(Passes<scalar_t, T>& ps, const Grads<scalar_t, T>& gr,
                            BackwardState<T>& st) {
  const Problem<scalar_t, T>& p = ps.p;
  const Packed& pk = ps.pk;
  const int64_t H = ps.d.H, N = ps.d.N, D = ps.d.D;
  const double n = ps.n;
  const Norms<T>& nm = st.nm;
  BnGrad<T>& g = st.g;
  const bool frozen = st.frozen;
  const T* y_saved = st.y_saved;
  constexpr int W = 6;
  std::vector<Sum> parts(ps.tiles.count * H * W);
  PassTimer timer("B1 dA*, BN_a and BN3 sums");
  ps.for_each_tile([&](int64_t t, int64_t b, Range rows, Planes<T>& ws) {
    const int64_t m = rows.size();
    if (y_saved) {  // the forward's Y: only A is needed from the chain
      ws.lo = rows.lo;
      load_attn(p, ws, b, rows);
    } else {
      chain_to_y(p, nm, pk, ws, b, rows);
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      transpose(p.v + bh * N * D, N, D, ws.kt, ws.kld);
      const T* dO = tile_as_acc(gr.dout + (bh * N + rows.lo) * D, m * D, ws.qb);
      T* das = gr.dattn + (bh * N + rows.lo) * N;
      score_gemm_nn<T>(m, N, D, T(1), dO, D, ws.kt, ws.kld, das, N);
      if (gr.dmaps) add_maps_grad(ps.d, gr.export_kind, gr.dmaps, b, h, rows, das);
      const int64_t a = pk.bna + h, c3 = pk.bn3 + h;
      VecSum<T> v[W];  // over the tile's rows of head h: contiguous runs
      const T* y = y_saved ? y_saved + (bh * N + rows.lo) * N : ws.at(ws.Y, h, rows.lo);
      bn_a_bn3_run_sums(nm, a, c3, y, ws.a(h, rows.lo), das, m * N, v);
      Sum* acc = &parts[(t * H + h) * W];
      for (int k = 0; k < W; ++k) acc[k].v += v[k].total();
    }
  });
  const auto s = merge_in_order(parts, H * W);
  std::vector<Sum> adapt(2 * H), bn3(2 * H);
  for (int64_t h = 0; h < H; ++h) {
    adapt[2 * h] = s[h * W];
    adapt[2 * h + 1] = s[h * W + 1];
  }
  finish_bn(adapt, p.w, nm, pk.bna, H, frozen, n, gr.dgamma, gr.dbeta, g);
  for (int64_t h = 0; h < H; ++h) {
    // sum dz = k (sum dA* - n cb - cg sum z_hat);  sum dz y_hat likewise.
    const int64_t a = pk.bna + h;
    const double k = g.k[a], cb = g.cb[a], cg = g.cg[a];
    const Sum* sh = &s[h * W];
    bn3[2 * h].v = k * (sh[0].v - n * cb - cg * sh[4].v);
    bn3[2 * h + 1].v = k * (sh[2].v - cb * sh[5].v - cg * sh[3].v);
  }
  finish_bn(bn3, p.w, nm, pk.bn3, H, frozen, n, gr.dgamma, gr.dbeta, g);
}

// B2: du2 on the rows -> BN2's sums, and BN1's. Those need dx2 = k2 (du2 - cb2 - x_hat2 cg2),
// whose cb2, cg2 are BN2's very sums; but with G = W_d * mask1 (the forward convolution of
// BN1's ReLU6 mask, on the rows) the adjoint of the convolution gives
//   sum du1 = sum mask1 (W_d^T * dx2) = sum G dx2 = k2 (sum G du2 - cb2 sum G - cg2 sum G x_hat2)
// and likewise sum du1 x_hat1 with G' = W_d * (mask1 x_hat1). No halo rows of dx2 are needed.
template <typename scalar_t, typename T>
void backward_bn2_bn1_sums(Passes<scalar_t, T>& ps, const Grads<scalar_t, T>& gr,
                           BackwardState<T>& st) {
  const Problem<scalar_t, T>& p = ps.p;
  const Dims& d = ps.d;
  const Packed& pk = ps.pk;
  const int64_t C = d.C, N = d.N, hl = d.halo();
  const double n = ps.n;
  const Norms<T>& nm = st.nm;
  BnGrad<T>& g = st.g;
  const bool frozen = st.frozen;
  const int64_t wd = 8 * C;  // per channel: sum du2, du2 x_hat2, then G and G' with du2, x_hat2, 1
  std::vector<Sum> parts(ps.tiles.count * wd);
  PassTimer timer("B2 BN2 and BN1 sums");
  ps.for_each_tile([&](int64_t t, int64_t b, Range rows, Planes<T>& ws) {
    const Range e_rows = clip(rows.lo - hl, rows.hi + hl, N);
    grad_to_du2(p, gr, nm, g, pk, ws, b, rows, st.y_saved, /*need_f=*/false);
    // mask1 into the padded DX2 planes, mask1 x_hat1 into the padded E planes (E is spent).
    using V = at::vec::Vectorized<T>;
    for (int64_t c = 0; c < C; ++c) {
      const T s1 = nm.s[pk.bn1 + c], t1 = nm.t[pk.bn1 + c];
      const V m1(nm.mean[pk.bn1 + c]), i1(nm.invstd[pk.bn1 + c]), one(T(1));
      for (int64_t i = e_rows.lo; i < e_rows.hi; ++i) {
        const T* x1 = ws.at(ws.X1, c, i);
        T* mask = ws.at_pad(ws.DX2, c, i);
        T* mask_xhat = ws.at_pad(ws.E, c, i);
        for_each_vec<T>(N, [&](int64_t j, int64_t cnt) {  // only [0, N): the margins stay 0
          const V x = V::loadu(x1 + j, cnt);
          const V mk = relu6_grad_vec(one, x, s1, t1);
          mk.store(mask + j, cnt);
          (mk * ((x - m1) * i1)).store(mask_xhat + j, cnt);
        });
      }
    }
    depthwise(p.w.w_dw, d, ws, ws.DX2, ws.dE, rows);  // G
    depthwise(p.w.w_dw, d, ws, ws.E, ws.F, rows);     // G'
    Sum* acc = &parts[t * wd];
    for (int64_t c = 0; c < C; ++c) {
      VecSum<T> v[8];  // the 8 sums of this channel, in the layout of acc
      bn2_bn1_run_sums(nm.mean[pk.bn2 + c], nm.invstd[pk.bn2 + c], ws.at(ws.dF, c, rows.lo),
                       ws.at(ws.X2, c, rows.lo), ws.at(ws.dE, c, rows.lo),
                       ws.at(ws.F, c, rows.lo), rows.size() * N, v);
      for (int k = 0; k < 8; ++k) acc[k * C + c].v += v[k].total();
    }
  });
  const auto s = merge_in_order(parts, wd);
  finish_bn(std::vector<Sum>(s.begin(), s.begin() + 2 * C), p.w, nm, pk.bn2, C, frozen, n,
            gr.dgamma, gr.dbeta, g, /*interleaved=*/false);
  std::vector<Sum> bn1(2 * C);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t i = pk.bn2 + c;
    const double k = g.k[i], cb = g.cb[i], cg = g.cg[i];
    for (int w = 0; w < 2; ++w) {  // sum du1 (G), sum du1 x_hat1 (G')
      const double du2_g = s[(2 + 3 * w) * C + c].v, xhat_g = s[(3 + 3 * w) * C + c].v;
      bn1[w * C + c].v = k * (du2_g - cb * s[(4 + 3 * w) * C + c].v - cg * xhat_g);
    }
  }
  finish_bn(bn1, p.w, nm, pk.bn1, C, frozen, n, gr.dgamma, gr.dbeta, g, /*interleaved=*/false);
}

// The conv weights' gradients of one row block of batch element b, added to its slice
// (dW_e (C, H) | dW_d (C, K, K) | dW_r (H, C)): dW_e = dx1 A^T, dW_d from dx2 against the
// shifted E, dW_r = dy F^T. Reads the planes grad_to_dx1 left.
template <typename T>
void conv_weight_grads(const Dims& d, Planes<T>& ws, Range rows, T* dw) {
  const int64_t H = d.H, C = d.C, N = d.N, K = d.K, m = rows.size();
  T* dwe = dw;
  T* dwd = dwe + C * H;
  gemm_rm<T>(false, true, C, H, m * N, T(1), ws.at(ws.dE, 0, rows.lo), ws.ld(),
             ws.a(0, rows.lo), ws.a_ld(), T(1), dwe, H);
  for (int64_t c = 0; c < C; ++c) {  // dW_d: dx2 against the shifted E (zero margins)
    const auto e_row = [&](int64_t r) -> const T* {
      return (r < 0 || r >= N) ? ws.zero_row : ws.at_pad(ws.E, c, r);
    };
    const auto dx2_row = [&](int64_t i) -> const T* { return ws.at_pad(ws.DX2, c, i); };
    T* gc = dwd + c * K * K;
    with_fixed_k(K, [&](auto fixed) {
      depthwise_weight_grad_rows<decltype(fixed)::value>(gc, K, rows.lo, rows.hi, N, e_row,
                                                         dx2_row);
    });
  }
  // dW_r = dy F^T, F as chain_to_y left it (on x_rows, which contain rows; nothing since has
  // written the F planes).
  gemm_rm<T>(false, true, H, C, m * N, T(1), ws.at(ws.dY, 0, rows.lo), ws.ld(),
             ws.at(ws.F, 0, rows.lo), ws.ld(), T(1), dwd + C * K * K, C);
}

// B3's buffers of one batch element in the accumulation type, used where the inputs are
// converted (bf16): K of a head (N x D), dK and dV of every head (H x N x D), and Q, dO, dQ of
// a row block (cap x D each).
template <typename scalar_t, typename T>
struct ConvertedHeads {
  static constexpr bool kConvert = !std::is_same_v<T, scalar_t>;
  at::Tensor buf;
  T *K, *dK, *dV, *Q, *dO, *dQ;
  ConvertedHeads(const Dims& d, int64_t cap) {
    const int64_t hd = d.N * d.D;
    buf = scratch<T>(kConvert ? hd + 2 * d.H * hd + 3 * cap * d.D : 0);
    K = buf.data_ptr<T>();
    dK = K + hd;
    dV = dK + d.H * hd;
    Q = dV + d.H * hd;
    dO = Q + cap * d.D;
    dQ = dO + cap * d.D;
  }
};

// Head h of batch element b on a row block: dA (W_e^T dx1 + dz, from grad_dx1_da) through the
// dropout mask and the softmax, dS = scale P (dA - rowsum(P dA)) in place, then dQ = dS K,
// dK += dS^T Q, dV += A*^T dO (the first row block overwrites dK, dV).
template <typename scalar_t, typename T>
void attention_grads(const Problem<scalar_t, T>& p, const Grads<scalar_t, T>& gr, Planes<T>& ws,
                     int64_t b, int64_t h, Range rows, ConvertedHeads<scalar_t, T>& cv) {
  constexpr bool kConvert = ConvertedHeads<scalar_t, T>::kConvert;
  const int64_t H = p.d.H, N = p.d.N, D = p.d.D, m = rows.size(), bh = b * H + h;
  const bool accumulate = rows.lo > 0;
  T* dA = ws.at(ws.dA, h, rows.lo);
  if (p.keep) {  // through the dropout mask
    const bool* keep = p.keep + (bh * N + rows.lo) * N;
    for (int64_t j = 0; j < m * N; ++j) dA[j] = keep[j] ? dA[j] * p.drop_scale : T(0);
  }
  const T* P = p.probs + (bh * N + rows.lo) * N;
  for (int64_t i = 0; i < m; ++i) {  // dS = scale P (dP - rowsum(P dP)), in place
    const T delta = dot_row(P + i * N, dA + i * N, N);
    softmax_grad_from_p_row(P + i * N, dA + i * N, N, delta, p.scale);
  }
  const scalar_t* k_h = p.k + bh * N * D;
  const T* Kh = kConvert ? cv.K : reinterpret_cast<const T*>(k_h);
  if constexpr (kConvert) convert_row(cv.K, k_h, N * D);
  const T* Q = tile_as_acc(p.q + (bh * N + rows.lo) * D, m * D, cv.Q);
  const T* dO = tile_as_acc(gr.dout + (bh * N + rows.lo) * D, m * D, cv.dO);
  T* dQ = kernels::out_tile(gr.dq + (bh * N + rows.lo) * D, cv.dQ);
  T* dK = kernels::out_tile(gr.dk + bh * N * D, cv.dK + h * N * D);
  T* dV = kernels::out_tile(gr.dv + bh * N * D, cv.dV + h * N * D);
  score_gemm_nn<T>(m, D, N, T(1), dA, N, Kh, D, dQ, D);
  score_gemm_tn<T>(N, D, m, T(1), dA, N, Q, D, accumulate, dK, D);
  score_gemm_tn<T>(N, D, m, T(1), ws.at(ws.As, h, rows.lo), N, dO, D, accumulate, dV, D);
  store_tile(gr.dq + (bh * N + rows.lo) * D, dQ, m * D);
}

// B3, one task per batch element (dk, dv sum over its row blocks): dx1, dA, dS, dq, dk, dv
// and the conv weights' gradients (summed over the batch in order at the end).
template <typename scalar_t, typename T>
void backward_inputs_and_weights(Passes<scalar_t, T>& ps, const Grads<scalar_t, T>& gr,
                                 BackwardState<T>& st) {
  const Problem<scalar_t, T>& p = ps.p;
  const Dims& d = ps.d;
  const int64_t H = d.H, C = d.C, N = d.N, D = d.D, K = d.K;
  // Per batch element: dW_e (C, H), dW_d (C, K, K), dW_r (H, C).
  const int64_t ww = C * H + C * K * K + H * C;
  std::vector<T> wparts(d.B * ww, T(0));
  PassTimer timer("B3 dq, dk, dv, dW_e, dW_d, dW_r");
  for_each_task<T>(ps.pool, d.B, [&](int64_t b, Planes<T>& ws) {
    ConvertedHeads<scalar_t, T> cv(d, ws.cap);
    for (int64_t i0 = 0; i0 < N; i0 += p.block) {
      const Range rows{i0, std::min(N, i0 + p.block)};
      grad_to_dx1(p, gr, st.nm, st.g, ps.pk, st.w_dw_flipped.data(), ws, b, rows);
      conv_weight_grads(d, ws, rows, &wparts[b * ww]);
      refine(st.nm, ps.pk, d, ws, rows);
      for (int64_t h = 0; h < H; ++h) attention_grads(p, gr, ws, b, h, rows, cv);
    }
    if constexpr (ConvertedHeads<scalar_t, T>::kConvert) {
      store_tile(gr.dk + b * H * N * D, cv.dK, H * N * D);
      store_tile(gr.dv + b * H * N * D, cv.dV, H * N * D);
    }
  });
  for (int64_t j = 0; j < ww; ++j) {
    double s = 0;
    for (int64_t b = 0; b < d.B; ++b) s += double(wparts[b * ww + j]);
    T* dst = j < C * H ? gr.dw_exp + j
             : j < C * H + C * K * K ? gr.dw_dw + (j - C * H)
                                     : gr.dw_pro + (j - C * H - C * K * K);
    *dst = T(s);
  }
}

// Gradients of every input. mean/var: the statistics the forward used; frozen: eval mode (they
// were running statistics, constants for the backward). y_saved: the training forward's Y
// (B, H, N, N), or nullptr (recomputed).
template <typename scalar_t, typename T>
void backward_impl(const Problem<scalar_t, T>& p, const Grads<scalar_t, T>& gr, bool frozen,
                   const std::vector<double>& mean, const std::vector<double>& var,
                   const std::vector<double>& eps, const T* y_saved) {
  Passes<scalar_t, T> ps(p);
  BackwardState<T> st(p.w, ps.d, ps.pk, mean, var, eps, frozen, y_saved);
  backward_bn_a_bn3_sums(ps, gr, st);
  backward_bn2_bn1_sums(ps, gr, st);
  backward_inputs_and_weights(ps, gr, st);
}

}  // namespace fastattnreg::cpu::refiner
