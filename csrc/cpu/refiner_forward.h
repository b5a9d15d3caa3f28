// The forward passes of the fused Refiner attention (see refiner_kernels.h for the plan).
#pragma once

#include <vector>

#include "refiner_kernels.h"

namespace fastattnreg::cpu::refiner {

// Tasks of the row-tiled passes: (batch b, block of query rows).
struct Tiles {
  int64_t N, block, per_batch, count;
  Tiles(const Dims& d, int64_t blk)
      : N(d.N), block(blk), per_batch((d.N + blk - 1) / blk), count(d.B * per_batch) {}
  int64_t batch(int64_t t) const { return t / per_batch; }
  Range rows(int64_t t) const {
    const int64_t i0 = (t % per_batch) * block;
    return {i0, std::min(N, i0 + block)};
  }
};

// Sums per-task partials (tasks x width, task-major) in task order, so reruns are bitwise equal.
template <typename P>
std::vector<P> merge_in_order(const std::vector<P>& parts, int64_t width) {
  std::vector<P> total(parts.begin(), parts.begin() + width);
  for (size_t t = 1; t * width < parts.size(); ++t)
    for (int64_t c = 0; c < width; ++c) total[c].merge(parts[t * width + c]);
  return total;
}

struct Sum {
  double v = 0;
  void merge(const Sum& o) { v += o.v; }
};

// mean, var: in eval mode the running statistics (read); in training mode the batch statistics
// (written: biased variance, packed bn1 | bn2 | bn3 | adapt). y_out (training): Y = W_r F
// (B, H, N, N), written by F3 for F4 and kept for the backward. maps: the exported A*, written
// by the pass that forms A* (the eval pass, or F4).
template <typename scalar_t, typename T>
void forward_impl(const Problem<scalar_t, T>& p, bool training, std::vector<double>& mean,
                  std::vector<double>& var, const std::vector<double>& eps, scalar_t* out,
                  T* y_out, const MapsOut<scalar_t>& maps = {}) {
  const Dims& d = p.d;
  const Packed pk(d);
  const Tiles tiles(d, p.block);
  const int64_t H = d.H, C = d.C, N = d.N;
  const double n = d.count();
  PlanesPool<T> pool(d, p.block);

  if (!training) {
    const Norms<T> nm(p.w, mean, var, eps, pk);
    PassTimer timer("eval forward");
    for_each_task<T>(pool, tiles.count, [&](int64_t t, Planes<T>& ws) {
      const int64_t b = tiles.batch(t);
      const Range rows = tiles.rows(t);
      chain_to_y(p, nm, pk, ws, b, rows, /*from_probs=*/false);
      refine(nm, pk, d, ws, rows);
      export_maps(d, ws, b, rows, maps);
      attend(p, ws, b, rows, out);
    });
    return;
  }

  // Each batch statistic is rounded to the accumulation type as soon as it is known, as the op
  // returns it: the passes after it, and the backward's (which rebuild the maps from the
  // returned statistics), then apply the very same BatchNorm maps, so the Y the backward
  // recomputes is bitwise the forward's.
  const auto as_acc = [](double x) { return double(T(x)); };

  // F1: P stored; the sums and the Gram matrix of A - 1/N per head (rows of P sum to 1, so
  // centring at 1/N keeps the Gram free of cancellation).
  const T c0 = T(1) / T(N);
  std::vector<Sum> gram_parts(tiles.count * (H + H * H));
  {
  PassTimer timer1("F1 softmax, Gram");
  for_each_task<T>(pool, tiles.count, [&](int64_t t, Planes<T>& ws) {
    const int64_t b = tiles.batch(t);
    const Range rows = tiles.rows(t);
    ws.lo = rows.lo;
    softmax_rows(p, ws, b, rows, p.probs);
    Sum* acc = &gram_parts[t * (H + H * H)];
    const int64_t len = rows.size() * N;  // the tile's rows of a head: one contiguous run
    for (int64_t h = 0; h < H; ++h) {
      acc[h].v = shifted_sum_run(ws.a(h, rows.lo), c0, len);
      for (int64_t g = h; g < H; ++g)
        acc[H + h * H + g].v = shifted_dot_run(ws.a(h, rows.lo), ws.a(g, rows.lo), c0, len);
    }
  });
  }
  const auto gram = merge_in_order(gram_parts, H + H * H);
  for (int64_t c = 0; c < C; ++c) {
    const T* wc = p.w.w_exp + c * H;
    double m = 0, v = 0;
    for (int64_t h = 0; h < H; ++h) {
      m += double(wc[h]) * (gram[h].v / n + double(c0));
      for (int64_t g = 0; g < H; ++g) {
        const double cov = gram[H + std::min(h, g) * H + std::max(h, g)].v / n -
                           (gram[h].v / n) * (gram[g].v / n);
        v += double(wc[h]) * double(wc[g]) * cov;
      }
    }
    mean[pk.bn1 + c] = as_acc(m);
    var[pk.bn1 + c] = as_acc(std::max(v, 0.0));
  }

  // Y = W_r F (B, H, N, N), written by F3 for F4 (one pass over the C-channel chain less) and
  // kept for the backward.
  TORCH_CHECK(y_out != nullptr, "refined_attention: the training forward needs the Y buffer");
  T* ybuf = y_out;

  // F2: X2 = W_d * E -> BN2 statistics.
  {
    const Norms<T> nm(p.w, mean, var, eps, pk);
    std::vector<Moments> parts(tiles.count * C);
    PassTimer timer("F2 BN2 statistics");
    for_each_task<T>(pool, tiles.count, [&](int64_t t, Planes<T>& ws) {
      const int64_t b = tiles.batch(t);
      const Range rows = tiles.rows(t);
      chain_to_x2(p, nm, pk, ws, b, rows);
      for (int64_t c = 0; c < C; ++c)  // the tile's rows of a channel: one contiguous run
        parts[t * C + c].add(ws.at(ws.X2, c, rows.lo), rows.size() * N);
    });
    const auto mom = merge_in_order(parts, C);
    for (int64_t c = 0; c < C; ++c) {
      mean[pk.bn2 + c] = as_acc(mom[c].mean);
      var[pk.bn2 + c] = as_acc(mom[c].m2 / n);
    }
  }

  // F3: Y = W_r F and A -> BN3 statistics, and BN_a's from the co-moments:
  //   z = s3 Y + t3 + A,  mean z = beta3 + mean A,  var z = s3^2 var Y + 2 s3 cov(Y, A) + var A.
  {
    const Norms<T> nm(p.w, mean, var, eps, pk);
    std::vector<CoMoments> parts(tiles.count * H);
    PassTimer timer("F3 BN3, BN_a statistics");
    for_each_task<T>(pool, tiles.count, [&](int64_t t, Planes<T>& ws) {
      const int64_t b = tiles.batch(t);
      const Range rows = tiles.rows(t);
      chain_to_y(p, nm, pk, ws, b, rows);
      store_rows(ybuf, d, ws, ws.Y, b, rows);
      for (int64_t h = 0; h < H; ++h)  // the tile's rows of a head: one contiguous run
        parts[t * H + h].add(ws.at(ws.Y, h, rows.lo), ws.a(h, rows.lo), rows.size() * N);
    });
    const auto mom = merge_in_order(parts, H);
    for (int64_t h = 0; h < H; ++h) {
      const double var_y = as_acc(mom[h].m2y / n);
      const double s3 = double(p.w.gamma[pk.bn3 + h]) / std::sqrt(var_y + eps[2]);
      mean[pk.bn3 + h] = as_acc(mom[h].my);
      var[pk.bn3 + h] = var_y;
      mean[pk.bna + h] = as_acc(double(p.w.beta[pk.bn3 + h]) + mom[h].ma);
      var[pk.bna + h] = as_acc(
          std::max(0.0, (s3 * s3 * mom[h].m2y + 2 * s3 * mom[h].cya + mom[h].m2a) / n));
    }
  }

  // F4: A* and out.
  const Norms<T> nm(p.w, mean, var, eps, pk);
  PassTimer timer4("F4 output");
  for_each_task<T>(pool, tiles.count, [&](int64_t t, Planes<T>& ws) {
    const int64_t b = tiles.batch(t);
    const Range rows = tiles.rows(t);
    ws.lo = rows.lo;
    load_attn(p, ws, b, rows);
    load_rows(ybuf, d, ws, ws.Y, b, rows);
    refine(nm, pk, d, ws, rows);
    export_maps(d, ws, b, rows, maps);
    attend(p, ws, b, rows, out);
  });
}

}  // namespace fastattnreg::cpu::refiner
