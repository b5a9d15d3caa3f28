// Row-major GEMM for the per-head tiles of the CPU kernels:
//   C (M x N, leading dim ldc) = alpha * op(A) * op(B) + beta * C,  op(X) = X or X^T.
// The kernels call this from inside at::parallel_for on small tiles (e.g. 197 x 64), so the call
// must be cheap and single-threaded. With MKL (the x86-64 torch wheels link it into
// libtorch_cpu and export the Fortran symbols) it goes straight to sgemm_/dgemm_; MKL sees it is
// inside an OpenMP region and stays on one thread. Elsewhere it uses at::addmm_out on views.
#pragma once

#include <ATen/ATen.h>

#ifdef FASTATTNREG_MKL_BLAS
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
int MKL_Set_Num_Threads_Local(int nt);  // the C entry; the lowercase one is Fortran (int*)
}
#endif

namespace fastattnreg::cpu {

#ifdef FASTATTNREG_MKL_BLAS
// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                      int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
#endif

// Held by each worker of an at::parallel_for that calls gemm_rm: MKL otherwise starts its own
// threads inside the region (measured: 2 x 2 threads on 2 cores, 1.5x slower than 2 x 1).
class SingleThreadedBlas {
 public:
#ifdef FASTATTNREG_MKL_BLAS
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local(1)) {}
  ~SingleThreadedBlas() { MKL_Set_Num_Threads_Local(previous_); }

 private:
  int previous_;
#endif
};

template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
             int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
#ifdef FASTATTNREG_MKL_BLAS
  blas_gemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', static_cast<int>(m), static_cast<int>(n),
            static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta,
            c, static_cast<int>(ldc));
#else
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // Stored shapes: A is (m x k) or (k x m) when transposed; likewise B.
  auto A = at::from_blob(const_cast<T*>(a), {trans_a ? k : m, trans_a ? m : k}, {lda, 1}, opts);
  auto B = at::from_blob(const_cast<T*>(b), {trans_b ? n : k, trans_b ? k : n}, {ldb, 1}, opts);
  auto C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(C, C, trans_a ? A.t() : A, trans_b ? B.t() : B, beta, alpha);
#endif
}

}  // namespace fastattnreg::cpu
