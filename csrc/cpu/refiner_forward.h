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

// What every pass of one call shares: the problem, the packed BatchNorm layout, the row tiles
// and the workers' planes.
template <typename scalar_t, typename T>
struct Passes {
  const Problem<scalar_t, T>& p;
  const Dims& d;
  const Packed pk;
  const Tiles tiles;
  const double n;  // elements each statistic runs over (B N N)
  PlanesPool<T> pool;
  explicit Passes(const Problem<scalar_t, T>& problem)
      : p(problem), d(problem.d), pk(d), tiles(d, p.block), n(d.count()), pool(d, p.block) {}
  // Runs body(task, b, rows, planes) on every row tile: batch element b, query rows `rows`.
  template <typename Body>
  void for_each_tile(const Body& body) {
    for_each_task<T>(pool, tiles.count, [&](int64_t t, Planes<T>& ws) {
      body(t, tiles.batch(t), tiles.rows(t), ws);
    });
  }
};

// Each batch statistic is rounded to the accumulation type as soon as it is known, as the op
// returns it: the passes after it, and the backward's (which rebuild the maps from the returned
// statistics), then apply the very same BatchNorm maps, so the Y the backward recomputes is
// bitwise the forward's.
template <typename T>
double round_to_acc(double x) {
  return double(T(x));
}

// Eval mode: one pass per tile from the logits to the output, with the running statistics.
template <typename scalar_t, typename T>
void forward_eval(Passes<scalar_t, T>& ps, const Norms<T>& nm, scalar_t* out,
                  const MapsOut<scalar_t>& maps) {
  PassTimer timer("eval forward");
  ps.for_each_tile([&](int64_t, int64_t b, Range rows, Planes<T>& ws) {
    chain_to_y(ps.p, nm, ps.pk, ws, b, rows, /*from_probs=*/false);
    refine(nm, ps.pk, ps.d, ws, rows);
    export_maps(ps.d, ws, b, rows, maps);
    attend(ps.p, ws, b, rows, out);
  });
}

// F1: P stored; the sums and the Gram matrix of A - 1/N per head (rows of P sum to 1, so
// centring at 1/N keeps the Gram free of cancellation) -> BN1's statistics, those of W_e A.
template <typename scalar_t, typename T>
void forward_bn1_statistics(Passes<scalar_t, T>& ps, std::vector<double>& mean,
                            std::vector<double>& var) {
  const Problem<scalar_t, T>& p = ps.p;
  const int64_t H = ps.d.H, C = ps.d.C, N = ps.d.N;
  const T c0 = T(1) / T(N);
  std::vector<Sum> gram_parts(ps.tiles.count * (H + H * H));
  {
    PassTimer timer("F1 softmax, Gram");
    ps.for_each_tile([&](int64_t t, int64_t b, Range rows, Planes<T>& ws) {
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
  const double n = ps.n;
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
    mean[ps.pk.bn1 + c] = round_to_acc<T>(m);
    var[ps.pk.bn1 + c] = round_to_acc<T>(std::max(v, 0.0));
  }
}

// F2: X2 = W_d * E -> BN2's statistics.
template <typename scalar_t, typename T>
void forward_bn2_statistics(Passes<scalar_t, T>& ps, std::vector<double>& mean,
                            std::vector<double>& var, const std::vector<double>& eps) {
  const int64_t C = ps.d.C, N = ps.d.N;
  const Norms<T> nm(ps.p.w, mean, var, eps, ps.pk);
  std::vector<Moments> parts(ps.tiles.count * C);
  {
    PassTimer timer("F2 BN2 statistics");
    ps.for_each_tile([&](int64_t t, int64_t b, Range rows, Planes<T>& ws) {
      chain_to_x2(ps.p, nm, ps.pk, ws, b, rows);
      for (int64_t c = 0; c < C; ++c)  // the tile's rows of a channel: one contiguous run
        parts[t * C + c].add(ws.at(ws.X2, c, rows.lo), rows.size() * N);
    });
  }
  const auto mom = merge_in_order(parts, C);
  for (int64_t c = 0; c < C; ++c) {
    mean[ps.pk.bn2 + c] = round_to_acc<T>(mom[c].mean);
    var[ps.pk.bn2 + c] = round_to_acc<T>(mom[c].m2 / ps.n);
  }
}

// F3: Y = W_r F (into y_out, B x H x N x N) and A -> BN3's statistics, and BN_a's from the
// co-moments: z = s3 Y + t3 + A, mean z = beta3 + mean A,
// var z = s3^2 var Y + 2 s3 cov(Y, A) + var A.
template <typename scalar_t, typename T>
void forward_bn3_statistics(Passes<scalar_t, T>& ps, std::vector<double>& mean,
                            std::vector<double>& var, const std::vector<double>& eps, T* y_out) {
  const Problem<scalar_t, T>& p = ps.p;
  const int64_t H = ps.d.H, N = ps.d.N;
  const Norms<T> nm(p.w, mean, var, eps, ps.pk);
  std::vector<CoMoments> parts(ps.tiles.count * H);
  {
    PassTimer timer("F3 BN3, BN_a statistics");
    ps.for_each_tile([&](int64_t t, int64_t b, Range rows, Planes<T>& ws) {
      chain_to_y(p, nm, ps.pk, ws, b, rows);
      store_rows(y_out, ps.d, ws, ws.Y, b, rows);
      for (int64_t h = 0; h < H; ++h)  // the tile's rows of a head: one contiguous run
        parts[t * H + h].add(ws.at(ws.Y, h, rows.lo), ws.a(h, rows.lo), rows.size() * N);
    });
  }
  const auto mom = merge_in_order(parts, H);
  const double n = ps.n;
  const Packed& pk = ps.pk;
  for (int64_t h = 0; h < H; ++h) {
    const double var_y = round_to_acc<T>(mom[h].m2y / n);
    const double s3 = double(p.w.gamma[pk.bn3 + h]) / std::sqrt(var_y + eps[2]);
    mean[pk.bn3 + h] = round_to_acc<T>(mom[h].my);
    var[pk.bn3 + h] = var_y;
    mean[pk.bna + h] = round_to_acc<T>(double(p.w.beta[pk.bn3 + h]) + mom[h].ma);
    var[pk.bna + h] = round_to_acc<T>(
        std::max(0.0, (s3 * s3 * mom[h].m2y + 2 * s3 * mom[h].cya + mom[h].m2a) / n));
  }
}

// F4: A* from the stored P and Y, the maps and out.
template <typename scalar_t, typename T>
void forward_output(Passes<scalar_t, T>& ps, const Norms<T>& nm, const T* y, scalar_t* out,
                    const MapsOut<scalar_t>& maps) {
  PassTimer timer("F4 output");
  ps.for_each_tile([&](int64_t, int64_t b, Range rows, Planes<T>& ws) {
    ws.lo = rows.lo;
    load_attn(ps.p, ws, b, rows);
    load_rows(y, ps.d, ws, ws.Y, b, rows);
    refine(nm, ps.pk, ps.d, ws, rows);
    export_maps(ps.d, ws, b, rows, maps);
    attend(ps.p, ws, b, rows, out);
  });
}

// mean, var: in eval mode the running statistics (read); in training mode the batch statistics
// (written: biased variance, packed bn1 | bn2 | bn3 | adapt). y_out (training): Y = W_r F
// (B, H, N, N), written by F3 for F4 and kept for the backward. maps: the exported A*, written
// by the pass that forms A* (the eval pass, or F4).
template <typename scalar_t, typename T>
void forward_impl(const Problem<scalar_t, T>& p, bool training, std::vector<double>& mean,
                  std::vector<double>& var, const std::vector<double>& eps, scalar_t* out,
                  T* y_out, const MapsOut<scalar_t>& maps = {}) {
  Passes<scalar_t, T> ps(p);
  if (!training) {
    forward_eval(ps, Norms<T>(p.w, mean, var, eps, ps.pk), out, maps);
    return;
  }
  TORCH_CHECK(y_out != nullptr, "refined_attention: the training forward needs the Y buffer");
  forward_bn1_statistics(ps, mean, var);
  forward_bn2_statistics(ps, mean, var, eps);
  forward_bn3_statistics(ps, mean, var, eps, y_out);
  forward_output(ps, Norms<T>(p.w, mean, var, eps, ps.pk), y_out, out, maps);
}

}  // namespace fastattnreg::cpu::refiner
