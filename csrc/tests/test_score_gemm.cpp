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
#include "cpu/score_gemm.h"

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
  for (int64_t k : {int64_t(16), int64_t(64), int64_t(128)})
    run_case(str("rows_independent/k", k), [&] {
      for (int64_t n : {int64_t(17), int64_t(65), int64_t(197)}) check_rows_independent(197, n, k);
    }, filter);
  return fastattnreg::test::finish();
}
