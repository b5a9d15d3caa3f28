// Unit tests of the fused attention-matching kernels (csrc/cpu/match.cpp) against plain ATen in
// float64 with ATen autograd: per-row divergence between student and teacher attention,
//   kl: sum_j pt_j (log pt_j - log ps_j), mse_probs: sum_j (ps_j - pt_j)^2,
//   mse_logits: sum_j (ss_j - st_j)^2, over every row, or over query 0 and keys 1..N-1 with both
//   softmaxes renormalised there; and the gradients of out and of those row losses.
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "check.h"
#include "cpu/match.h"

namespace {

using fastattnreg::test::str;
using Tensor = at::Tensor;

struct Shape {
  int64_t B, H, N, D, Dt;
  std::string name() const { return str("B", B, "H", H, "N", N, "D", D, "Dt", Dt); }
};

const std::vector<Shape> kShapes = {{1, 1, 2, 16, 16}, {2, 3, 17, 48, 16}, {1, 2, 197, 64, 80},
                                    {1, 2, 577, 16, 48}};
const std::vector<std::string> kKinds = {"kl", "mse_probs", "mse_logits"};
const std::vector<std::string> kRows = {"all", "cls"};

// Per-row losses (B, H, R) of the reference, from materialised float64 logits.
Tensor ref_row_loss(const Tensor& ss_full, const Tensor& st_full, const std::string& kind,
                    const std::string& rows) {
  Tensor ss = ss_full, st = st_full;
  if (rows == "cls") {
    ss = ss.narrow(2, 0, 1).narrow(3, 1, ss.size(3) - 1);
    st = st.narrow(2, 0, 1).narrow(3, 1, st.size(3) - 1);
  }
  if (kind == "mse_logits") return (ss - st).pow(2).sum(-1);
  const Tensor lps = at::log_softmax(ss, -1), lpt = at::log_softmax(st, -1);
  if (kind == "kl") return (lpt.exp() * (lpt - lps)).sum(-1);
  return (lps.exp() - lpt.exp()).pow(2).sum(-1);
}

void check_match(const Shape& s, at::ScalarType dtype, const std::string& kind,
                 const std::string& rows) {
  const auto opts = at::TensorOptions().dtype(dtype);
  const Tensor q = at::randn({s.B, s.H, s.N, s.D}, opts), k = at::randn({s.B, s.H, s.N, s.D}, opts),
               v = at::randn({s.B, s.H, s.N, s.D}, opts);
  const Tensor tq = at::randn({s.B, s.H, s.N, s.Dt}, opts), tk = at::randn({s.B, s.H, s.N, s.Dt}, opts);
  const double scale = 1.0 / std::sqrt(double(s.D)), tscale = 1.0 / std::sqrt(double(s.Dt));
  auto [out, lse, tlse, row_loss] =
      fastattnreg::cpu::attention_match_fwd(q, k, v, tq, tk, std::nullopt, scale, tscale, kind, rows);

  // Reference with autograd in float64.
  auto q64 = q.to(at::kDouble).requires_grad_(), k64 = k.to(at::kDouble).requires_grad_(),
       v64 = v.to(at::kDouble).requires_grad_();
  const Tensor ss = at::matmul(q64, k64.transpose(-2, -1)) * scale;
  const Tensor st = at::matmul(tq.to(at::kDouble), tk.to(at::kDouble).transpose(-2, -1)) * tscale;
  const Tensor ref_out = at::matmul(at::softmax(ss, -1), v64);
  const Tensor ref_loss = ref_row_loss(ss, st, kind, rows);
  const double tol = dtype == at::kDouble ? 1e-10 : 1e-5;
  EXPECT_CLOSE(out, ref_out, dtype, tol, "out");
  EXPECT_CLOSE(row_loss, ref_loss, dtype == at::kDouble ? at::kDouble : at::kFloat, tol, "row_loss");

  const Tensor dout = at::randn_like(out), drow = at::randn_like(row_loss);
  auto [dq, dk, dv] = fastattnreg::cpu::attention_match_bwd(
      dout, std::nullopt, drow, q, k, v, out, lse, tq, tk, tlse, std::nullopt, scale, tscale,
      kind, rows);
  ((ref_out * dout.to(at::kDouble)).sum() + (ref_loss * drow.to(at::kDouble)).sum()).backward();
  EXPECT_CLOSE(dq, q64.grad(), dtype, tol, "dq");
  EXPECT_CLOSE(dk, k64.grad(), dtype, tol, "dk");
  EXPECT_CLOSE(dv, v64.grad(), dtype, tol, "dv");
}

void check_teacher_copy_is_exactly_zero(const std::string& kind, const std::string& rows) {
  const Tensor q = at::randn({2, 3, 65, 48}), k = at::randn({2, 3, 65, 48}), v = at::randn({2, 3, 65, 48});
  auto [out, lse, tlse, row_loss] =
      fastattnreg::cpu::attention_match_fwd(q, k, v, q.clone(), k.clone(), std::nullopt, 0.2, 0.2, kind, rows);
  EXPECT_MSG(row_loss.abs().max().item<double>() == 0.0, "row loss ", row_loss.abs().max().item<double>());
  auto [dq, dk, dv] = fastattnreg::cpu::attention_match_bwd(
      std::nullopt, std::nullopt, at::ones_like(row_loss), q, k, v, out, lse, q.clone(),
      k.clone(), tlse, std::nullopt, 0.2, 0.2, kind, rows);
  EXPECT_MSG(dq.abs().max().item<double>() == 0.0 && dk.abs().max().item<double>() == 0.0,
             "gradient of a zero loss is not zero");
}

void check_bad_input() {
  const Tensor q = at::randn({1, 2, 5, 8});
  EXPECT_THROWS_WITH(fastattnreg::cpu::attention_match_fwd(q, q, q, at::randn({1, 2, 6, 8}),
                                                           at::randn({1, 2, 6, 8}), std::nullopt, 0.3, 0.3, "kl", "all"),
                     "teacher_q tokens N must equal");
  EXPECT_THROWS_WITH(fastattnreg::cpu::attention_match_fwd(q, q, q, q, q, std::nullopt, 0.3, 0.3, "js", "all"),
                     "kind must be one of");
  EXPECT_THROWS_WITH(fastattnreg::cpu::attention_match_fwd(q, q, q, q, q, std::nullopt, 0.3, 0.3, "kl", "row"),
                     "rows must be 'all' or 'cls'");
  const Tensor one = at::randn({1, 1, 1, 8});
  EXPECT_THROWS_WITH(fastattnreg::cpu::attention_match_fwd(one, one, one, one, one, std::nullopt, 0.3, 0.3, "kl", "cls"),
                     "needs N >= 2");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  using fastattnreg::test::run_case;
  at::manual_seed(0);
  for (auto dtype : {at::kDouble, at::kFloat})
    for (const auto& s : kShapes)
      for (const auto& kind : kKinds)
        for (const auto& rows : kRows)
          run_case(str("match/", dtype == at::kDouble ? "float64" : "float32", "/", s.name(), "/",
                       kind, "/", rows),
                   [&] { check_match(s, dtype, kind, rows); }, filter);
  for (const auto& kind : kKinds)
    for (const auto& rows : kRows)
      run_case(str("teacher_copy/", kind, "/", rows),
               [&] { check_teacher_copy_is_exactly_zero(kind, rows); }, filter);
  run_case("bad_input", check_bad_input, filter);
  return fastattnreg::test::finish();
}
