// The op schemas of the fastattnreg namespace. Device kernels register elsewhere:
// C++ CPU kernels in csrc/cpu/*.cpp, Triton CUDA kernels from Python (fastattnreg/triton).
#include <torch/library.h>

TORCH_LIBRARY(fastattnreg, m) {
  // out (B,H,N,D), lse (B,H,N) in float32 (float64 for float64 inputs), maps by `export`.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, float scale, str export) "
      "-> (Tensor out, Tensor lse, Tensor maps)");
  // dq, dk, dv from any of the gradients of out, lse and maps (None where unused).
  m.def(
      "attention_bwd(Tensor? dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor? dmaps, float scale, str export) -> (Tensor dq, Tensor dk, Tensor dv)");
}
