// Unit tests of the fused Refiner kernels (csrc/cpu/refiner.cpp) against plain ATen in float64
// with ATen autograd: P = softmax(scale q k^T), A = P (dropout: P * keep * drop_scale),
//   E = relu6(bn1(conv1x1(A))), F = relu6(bn2(depthwise(E))), A* = bn_a(bn3(conv1x1(F)) + A),
//   out = A* v, BatchNorm statistics over (B, N, N) (batch in training, running in eval);
// the returned statistics, out, and the gradients of q, k, v and every weight.
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "check.h"
#include "cpu/refiner.h"

namespace {

using fastattnreg::test::str;
using Tensor = at::Tensor;

struct Case {
  int64_t B, H, N, D, expansion, K;
  bool training, dropout;
  std::string name() const {
    return str("B", B, "H", H, "N", N, "D", D, "e", expansion, "k", K,
               training ? "/train" : "/eval", dropout ? "/dropout" : "");
  }
};

const std::vector<Case> kCases = {
    {2, 3, 17, 16, 3, 3, true, false},  {2, 3, 17, 16, 3, 3, false, false},
    {1, 2, 65, 8, 2, 5, true, false},   {1, 2, 65, 8, 2, 5, false, false},
    {1, 2, 197, 8, 1, 3, true, false},  {2, 2, 9, 4, 4, 7, true, false},
    {2, 2, 17, 8, 3, 3, true, true},    {3, 1, 1, 4, 2, 3, true, false},
};

struct Weights {
  Tensor w_exp, w_dw, w_pro, gamma, beta, rmean, rvar;  // packed BatchNorms: bn1|bn2|bn3|adapt
};

Weights make_weights(const Case& c, at::ScalarType dt) {
  const int64_t C = c.expansion * c.H, P = 2 * C + 2 * c.H;
  const auto o = at::TensorOptions().dtype(dt);
  return {at::randn({C, c.H}, o) * 0.5, at::randn({C, c.K, c.K}, o) * 0.5,
          at::randn({c.H, C}, o) * 0.5, at::randn({P}, o) * 0.2 + 1, at::randn({P}, o) * 0.2,
          at::randn({P}, o) * 0.1, at::rand({P}, o) + 0.5};
}

void check_case(const Case& c, at::ScalarType dt) {
  const auto o = at::TensorOptions().dtype(dt);
  const Tensor q = at::randn({c.B, c.H, c.N, c.D}, o), k = at::randn({c.B, c.H, c.N, c.D}, o),
               v = at::randn({c.B, c.H, c.N, c.D}, o);
  const Weights w = make_weights(c, dt);
  const int64_t C = c.expansion * c.H;
  const std::vector<double> eps = {1e-5, 1e-4, 1e-5, 1e-3};
  const double scale = 1.0 / std::sqrt(double(c.D)), drop_scale = c.dropout ? 1.0 / 0.7 : 1.0;
  std::optional<Tensor> keep;
  if (c.dropout) keep = at::rand({c.B, c.H, c.N, c.N}) >= 0.3;
  auto [out, probs, y, mean, var, maps] = fastattnreg::cpu::refined_attention_fwd(
      q, k, v, w.w_exp, w.w_dw, w.w_pro, w.gamma, w.beta, w.rmean, w.rvar, keep, eps, scale,
      drop_scale, c.training, /*save_probs=*/true, "full");
  // Without an export: the same out, and an empty maps placeholder.
  const auto plain = fastattnreg::cpu::refined_attention_fwd(
      q, k, v, w.w_exp, w.w_dw, w.w_pro, w.gamma, w.beta, w.rmean, w.rvar, keep, eps, scale,
      drop_scale, c.training, /*save_probs=*/true);
  EXPECT(at::equal(std::get<0>(plain), out) && std::get<5>(plain).numel() == 0);

  // Reference, float64 with autograd.
  auto leaf = [](const Tensor& t) { return t.to(at::kDouble).requires_grad_(); };
  Tensor q64 = leaf(q), k64 = leaf(k), v64 = leaf(v), we = leaf(w.w_exp), wd = leaf(w.w_dw),
         wp = leaf(w.w_pro), g = leaf(w.gamma), b = leaf(w.beta);
  const Tensor rm = w.rmean.to(at::kDouble).clone(), rv = w.rvar.to(at::kDouble).clone();
  const std::vector<int64_t> sizes = {C, C, c.H, c.H};
  const auto gs = g.split_with_sizes(sizes), bs = b.split_with_sizes(sizes);
  const auto rms = rm.split_with_sizes(sizes), rvs = rv.split_with_sizes(sizes);
  std::vector<Tensor> batch_mean, batch_var;
  auto bn = [&](const Tensor& x, int i) {
    if (c.training) {
      batch_mean.push_back(x.mean({0, 2, 3}).detach());
      batch_var.push_back(x.var({0, 2, 3}, /*unbiased=*/false).detach());
    }
    return at::batch_norm(x, gs[i], bs[i], rms[i], rvs[i], c.training, 0.1, eps[i], false);
  };
  Tensor a = at::softmax(at::matmul(q64, k64.transpose(-2, -1)) * scale, -1);
  if (c.dropout) a = a * keep->to(at::kDouble) * drop_scale;
  Tensor e = at::clamp(bn(at::conv2d(a, we.view({C, c.H, 1, 1})), 0), 0, 6);
  Tensor f = at::clamp(
      bn(at::conv2d(e, wd.view({C, 1, c.K, c.K}), {}, 1, c.K / 2, 1, C), 1), 0, 6);
  Tensor refined = bn(bn(at::conv2d(f, wp.view({c.H, C, 1, 1})), 2) + a, 3);
  const Tensor ref_out = at::matmul(refined, v64);

  const double tol = dt == at::kDouble ? 1e-10 : 2e-4;
  EXPECT_CLOSE(out, ref_out, dt, tol, "out");
  EXPECT_CLOSE(maps, refined, dt, tol, "maps (A*)");
  if (c.training) {
    EXPECT_CLOSE(mean, at::cat(batch_mean), mean.scalar_type(), tol, "batch mean");
    EXPECT_CLOSE(var, at::cat(batch_var), var.scalar_type(), tol, "batch var");
  }
  const Tensor dout = at::randn_like(out), dmaps = at::randn_like(maps);
  EXPECT(y.numel() == (c.training ? c.B * c.H * c.N * c.N : 0));  // Y kept in training only
  auto [dq, dk, dv, dwe, dwd, dwp, dg, db] = fastattnreg::cpu::refined_attention_bwd(
      dout, q, k, v, w.w_exp, w.w_dw, w.w_pro, w.gamma, w.beta, probs, y, mean, var, keep, eps,
      scale, drop_scale, c.training, dmaps, "full");
  ((ref_out * dout.to(at::kDouble)).sum() + (refined * dmaps.to(at::kDouble)).sum()).backward();
  EXPECT_CLOSE(dq, q64.grad(), dt, tol, "dq");
  EXPECT_CLOSE(dk, k64.grad(), dt, tol, "dk");
  EXPECT_CLOSE(dv, v64.grad(), dt, tol, "dv");
  EXPECT_CLOSE(dwe, we.grad(), dt, tol, "dw_exp");
  EXPECT_CLOSE(dwd, wd.grad(), dt, tol, "dw_dw");
  EXPECT_CLOSE(dwp, wp.grad(), dt, tol, "dw_pro");
  EXPECT_CLOSE(dg, g.grad(), dt, tol, "dgamma");
  EXPECT_CLOSE(db, b.grad(), dt, tol, "dbeta");

  // A rerun is bitwise equal (per-task partials merged in task order), and so is one without
  // the kept Y (recomputed by the same tiles).
  for (const Tensor& y_given : {y, at::empty({0}, y.options())}) {
    auto again = fastattnreg::cpu::refined_attention_bwd(
        dout, q, k, v, w.w_exp, w.w_dw, w.w_pro, w.gamma, w.beta, probs, y_given, mean, var, keep,
        eps, scale, drop_scale, c.training, dmaps, "full");
    EXPECT(at::equal(std::get<0>(again), dq) && at::equal(std::get<3>(again), dwe) &&
           at::equal(std::get<6>(again), dg));
  }
}

void check_bad_input() {
  const Case c{1, 2, 5, 4, 2, 3, true, false};
  const Weights w = make_weights(c, at::kFloat);
  const Tensor q = at::randn({1, 2, 5, 4});
  const std::vector<double> eps(4, 1e-5);
  auto fwd = [&](const Tensor& we, const Tensor& wd, const Tensor& wp,
                 const std::vector<double>& e) {
    return fastattnreg::cpu::refined_attention_fwd(q, q, q, we, wd, wp, w.gamma, w.beta, w.rmean,
                                                   w.rvar, std::nullopt, e, 0.5, 1.0, true, false);
  };
  EXPECT_THROWS_WITH(fwd(w.w_exp, at::randn({4, 4, 4}), w.w_pro, eps), "must be odd", "got 4");
  EXPECT_THROWS_WITH(fwd(at::randn({4, 3}), w.w_dw, w.w_pro, eps), "w_exp must have shape");
  EXPECT_THROWS_WITH(fwd(w.w_exp, w.w_dw, at::randn({2, 5}), eps), "w_pro must have shape");
  EXPECT_THROWS_WITH(fwd(w.w_exp.to(at::kDouble), w.w_dw, w.w_pro, eps), "w_exp must have q's dtype");
  EXPECT_THROWS_WITH(fwd(w.w_exp, w.w_dw, w.w_pro, {1e-5}), "eps must hold 4 values");
  EXPECT_THROWS_WITH(
      fastattnreg::cpu::refined_attention_fwd(q, q, q, w.w_exp, w.w_dw, w.w_pro, w.gamma, w.beta,
                                              w.rmean, w.rvar, std::nullopt, eps, 0.5, 1.0, true,
                                              false, "rows"),
      "export must be one of", "got 'rows'");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  using fastattnreg::test::run_case;
  at::manual_seed(0);
  for (auto dt : {at::kDouble, at::kFloat})
    for (const auto& c : kCases) {
      // N = 1: the map is the constant 1, every BatchNorm variance is 0 and the gradients are
      // 0 up to rounding amplified by 1/sqrt(eps) per BatchNorm: meaningful in float64 only.
      if (c.N == 1 && dt == at::kFloat) continue;
      run_case(str("refiner/", dt == at::kDouble ? "float64" : "float32", "/", c.name()),
               [&] { check_case(c, dt); }, filter);
    }
  run_case("bad_input", check_bad_input, filter);
  return fastattnreg::test::finish();
}
