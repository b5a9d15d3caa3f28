// Unit tests of the score GEMMs (csrc/cpu/score_gemm.h), S = alpha X Y and S (+)= alpha X^T Y,
// against float64 ATen: every panel split and row remainder of the AVX-512 kernel (n from 1 to
// 577, m from 1 to 197), inner dims on both sides of kScoreGemmMaxK (the kernel, then BLAS, for
// wide products), aligned and unaligned Y rows, accumulation into S, columns of S past n left
// untouched, and a one-row product equal bitwise to the same row of an m-row product
// (attention_match's CLS-row loss relies on it). This target is compiled with the
// kernel flags (CMakeLists.txt), so it tests the same code path as the extension.
#include <ATen/ATen.h>

#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "cpu/bf16_pack.h"
#include "cpu/score_gemm.h"
#include "cpu/simd_level.h"

namespace {

using fastattnreg::test::str;
using Tensor = at::Tensor;

constexpr float kGuard = 12345.0f;  // written into S's padding columns; must survive

// S = alpha X Y with X (m x k, ldx = k), Y (k x n, leading dim ldy), S (m x n, lds = n + 3);
// with trans, S = alpha X^T Y + S0 for X stored k x m (ldx = m) and S0 random.
template <typename T>
void check_product(int64_t m, int64_t n, int64_t k, int64_t ldy, bool trans = false) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const Tensor x_store = trans ? at::randn({k, m}, opts) : at::randn({m, k}, opts);
  const Tensor x = trans ? x_store.t() : x_store;  // m x k either way
  const Tensor y_store = at::randn({k, ldy}, opts);
  const Tensor y = y_store.narrow(1, 0, n);
  const int64_t lds = n + 3;
  Tensor s_store = at::full({m, lds}, kGuard, opts);
  const Tensor s0 = at::randn({m, n}, opts);
  const T alpha = T(0.37);
  if (trans) {
    s_store.narrow(1, 0, n).copy_(s0);
    fastattnreg::cpu::score_gemm_tn<T>(m, n, k, alpha, x_store.const_data_ptr<T>(), m,
                                       y_store.const_data_ptr<T>(), ldy, /*accumulate=*/true,
                                       s_store.data_ptr<T>(), lds);
  } else {
    fastattnreg::cpu::score_gemm_nn<T>(m, n, k, alpha, x_store.const_data_ptr<T>(), k,
                                       y_store.const_data_ptr<T>(), ldy, s_store.data_ptr<T>(),
                                       lds);
  }
  Tensor expected = at::matmul(x.to(at::kDouble), y.to(at::kDouble)) * double(alpha);
  if (trans) expected = expected + s0.to(at::kDouble);
  const double tol = std::is_same_v<T, double> ? 1e-12 : 2e-6 * std::sqrt(double(k));
  EXPECT_CLOSE(s_store.narrow(1, 0, n), expected.to(opts.dtype()), opts.dtype().toScalarType(), tol,
               "S");
  EXPECT_MSG(at::all(s_store.narrow(1, n, 3) == kGuard).item<bool>(),
             "columns of S past n were written");
}

#ifdef FASTATTNREG_SCORE_GEMM_AVX512
// Row i of an m-row product, bitwise, against the one-row product of X's row i alone.
void check_rows_independent(int64_t m, int64_t n, int64_t k) {
  const Tensor x = at::randn({m, k}), y = at::randn({k, n});
  Tensor full = at::empty({m, n}), one = at::empty({1, n});
  fastattnreg::cpu::score_gemm_nn<float>(m, n, k, 0.125f, x.const_data_ptr<float>(), k,
                                         y.const_data_ptr<float>(), n, full.data_ptr<float>(), n);
  for (int64_t i : {int64_t(0), m / 2, m - 1}) {
    fastattnreg::cpu::score_gemm_nn<float>(1, n, k, 0.125f, x.const_data_ptr<float>() + i * k, k,
                                           y.const_data_ptr<float>(), n, one.data_ptr<float>(), n);
    EXPECT_MSG(std::memcmp(one.const_data_ptr<float>(), full.const_data_ptr<float>() + i * n,
                           n * sizeof(float)) == 0,
               "row ", i, " of the ", m, "-row product differs from the one-row product");
  }
}
#endif

#ifdef FASTATTNREG_AVX512_BF16
// The bf16 products of the AVX512-BF16 kernels (Bf16PairDot) on the operands bf16_pack.h makes,
// against float64 ATen on the same bf16 values: S = alpha X Y^T from X's rows and Y^T's column
// pairs (the score tile), S = alpha P V from float rows rounded to bf16 and V's column pairs,
// and S (+)= alpha X^T Y from column pairs over the shared rows (dV, dK). Odd inner dims take
// the zero-padded last pair.
void check_bf16_products(int64_t m, int64_t n, int64_t k) {
  using fastattnreg::cpu::bf16::pairs;
  namespace bf16 = fastattnreg::cpu::bf16;
  namespace sg = fastattnreg::cpu::score_gemm_detail;
  const auto bf = at::TensorOptions().dtype(at::kBFloat16);
  const auto words = [](int64_t count) { return at::zeros({std::max<int64_t>(count, 1)}, at::kInt); };
  const auto w = [](at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); };
  const auto cw = [](const at::Tensor& t) {
    return reinterpret_cast<const uint32_t*>(t.const_data_ptr<int32_t>());
  };
  const float alpha = 0.37f;
  const int64_t kp = pairs(k), ld = (n + 15) / 16 * 16;
  // S = alpha X Y^T: X (m x k) rows, Y (n x k) rows.
  const Tensor x = at::randn({m, k}).to(at::kBFloat16), y = at::randn({n, k}).to(at::kBFloat16);
  Tensor pad = words(std::max(m, n) * kp), yt = words(kp * ld), s = at::empty({m, n});
  bf16::transposed_column_pairs(y.const_data_ptr<c10::BFloat16>(), n, k, w(yt), ld, w(pad));
  Tensor xpad = words(m * kp);
  const uint32_t* xr = bf16::row_pairs(x.const_data_ptr<c10::BFloat16>(), m, k, w(xpad));
  sg::gemm_panels<sg::Bf16PairDot, false>(m, n, kp, alpha, xr, kp, cw(yt), ld,
                                          s.data_ptr<float>(), n, false);
  const double tol = 1e-5 * std::sqrt(double(k)) * 8;
  EXPECT_CLOSE(s, (at::matmul(x.to(at::kDouble), y.to(at::kDouble).t()) * alpha).to(at::kFloat),
               at::kFloat, tol, "S = X Y^T");
  // S = alpha P V: P (m x k) float rounded to bf16 rows, V (k x n) bf16 rows.
  const Tensor p = at::rand({m, k}), v = at::randn({k, n}).to(at::kBFloat16);
  Tensor pr = words(m * kp), vp = words(kp * n), pv = at::empty({m, n});
  bf16::row_pairs(p.const_data_ptr<float>(), m, k, k, w(pr));
  bf16::column_pairs(v.const_data_ptr<c10::BFloat16>(), k, n, n, w(vp), n);
  sg::gemm_panels<sg::Bf16PairDot, false>(m, n, kp, alpha, cw(pr), kp, cw(vp), n,
                                          pv.data_ptr<float>(), n, false);
  const Tensor p16 = p.to(at::kBFloat16).to(at::kDouble);
  EXPECT_CLOSE(pv, (at::matmul(p16, v.to(at::kDouble)) * alpha).to(at::kFloat), at::kFloat, tol,
               "S = P V");
  // S = S0 + alpha A^T B: A (k x m) float rows, B (k x n) bf16 rows, pairs over the k rows.
  const Tensor a = at::randn({k, m}), b = at::randn({k, n}).to(at::kBFloat16);
  const Tensor s0 = at::randn({m, n});
  Tensor ac = words(kp * m), bc = words(kp * n), st = s0.clone();
  bf16::column_pairs(a.const_data_ptr<float>(), k, m, m, w(ac), m);
  bf16::column_pairs(b.const_data_ptr<c10::BFloat16>(), k, n, n, w(bc), n);
  sg::gemm_panels<sg::Bf16PairDot, true>(m, n, kp, alpha, cw(ac), m, cw(bc), n,
                                         st.data_ptr<float>(), n, true);
  const Tensor a16 = a.to(at::kBFloat16).to(at::kDouble);
  EXPECT_CLOSE(st, (s0.to(at::kDouble) + at::matmul(a16.t(), b.to(at::kDouble)) * alpha)
                       .to(at::kFloat),
               at::kFloat, tol, "S += A^T B");
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  using fastattnreg::test::run_case;
  at::manual_seed(0);
#ifdef FASTATTNREG_SCORE_GEMM_AVX512
  std::printf("score GEMM: the AVX-512 kernel for float, k <= %lld\n",
              static_cast<long long>(fastattnreg::cpu::kScoreGemmMaxK));
#else
  std::printf("score GEMM: BLAS only (this build has no AVX-512)\n");
#endif
  // n covers one to ten panels with every tail width class; m every row remainder (m % 6).
  const std::vector<int64_t> ms = {1, 2, 5, 6, 7, 13, 65, 197};
  const std::vector<int64_t> ns = {1, 5, 16, 17, 33, 48, 49, 64, 65, 80, 113, 197, 577};
  const std::vector<int64_t> ks = {1, 16, 48, 64, 80, 128, 129};
  for (int64_t k : ks)
    for (int64_t m : ms)
      run_case(str("float32/k", k, "/m", m), [&] {
        for (int64_t n : ns) {
          check_product<float>(m, n, k, n);                    // rows unaligned
          check_product<float>(m, n, k, (n + 15) / 16 * 16);   // rows 64-byte aligned
          check_product<float>(m, n, k, n, /*trans=*/true);
        }
      }, filter);
  run_case("float64/blas", [] {
    for (int64_t n : {int64_t(17), int64_t(197)}) {
      check_product<double>(65, n, 64, n);
      check_product<double>(65, n, 64, n, /*trans=*/true);
    }
  }, filter);
#ifdef FASTATTNREG_SCORE_GEMM_AVX512
  // The AVX-512 kernel's promise; BLAS (every other build) makes none.
  for (int64_t k : {int64_t(16), int64_t(64), int64_t(128)})
    run_case(str("rows_independent/k", k), [&] {
      for (int64_t n : {int64_t(17), int64_t(65), int64_t(197)}) check_rows_independent(197, n, k);
    }, filter);
#endif
#ifdef FASTATTNREG_AVX512_BF16
  if (fastattnreg::cpu::cpu_has_avx512_bf16()) {
    for (int64_t k : {int64_t(1), int64_t(16), int64_t(33), int64_t(64), int64_t(197)})
      run_case(str("bf16_pairs/k", k), [&] {
        for (int64_t m : {int64_t(1), int64_t(7), int64_t(65)})
          for (int64_t n : {int64_t(1), int64_t(17), int64_t(64), int64_t(197)})
            check_bf16_products(m, n, k);
      }, filter);
  } else {
    std::printf("bf16 products: this CPU has no AVX512-BF16; the kernels are not run\n");
  }
#else
  std::printf("bf16 products: this build has no AVX512-BF16 kernels\n");
#endif
  return fastattnreg::test::finish();
}
