// Argument checks shared by every CPU op, and the facts about arguments they share (the export
// kinds, the exported maps' shapes, the accumulation dtype). Each message names the argument,
// the value it had and the limit it broke, so a user can fix the call without reading this file.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace fastattnreg {

// Largest head dim the CPU kernels take: per-thread scratch holds a few (N x D) tiles, and every
// ViT in use has D <= 128; 256 leaves room without letting a typo allocate gigabytes.
constexpr int64_t kMaxHeadDimCpu = 256;

// What the caller asked to export besides the output, parsed once from the schema's string.
enum class ExportKind { None, Full, HeadMean, Cls, KeyMean };

inline ExportKind parse_export(c10::string_view s) {
  if (s == "none") return ExportKind::None;
  if (s == "full") return ExportKind::Full;
  if (s == "head_mean") return ExportKind::HeadMean;
  if (s == "cls") return ExportKind::Cls;
  if (s == "key_mean") return ExportKind::KeyMean;
  TORCH_CHECK_VALUE(false, "export must be one of 'none', 'full', 'head_mean', 'cls', 'key_mean'; got '",
                    std::string(s), "'");
}

// Shape of the exported maps for q (B, H, N, D): full (B, H, N, N), head_mean (B, N, N), cls and
// key_mean (B, H, N); none (0,), an empty placeholder output.
inline std::vector<int64_t> maps_shape(const at::Tensor& q, ExportKind kind) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  switch (kind) {
    case ExportKind::Full: return {B, H, N, N};
    case ExportKind::HeadMean: return {B, N, N};
    case ExportKind::Cls:
    case ExportKind::KeyMean: return {B, H, N};
    default: return {0};
  }
}

// The dtype the kernels accumulate in, and return the LSE in: float64 for float64 inputs, else
// float32 (bf16 inputs included).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (B, H, N, D); got ", t.dim(),
                    "-D with shape ", t.sizes());
}

// q, k, v: (B, H, N, D), one dtype, CPU, non-empty, head dim within the CPU limit.
inline void check_qkv_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_4d(q, "q");
  check_4d(k, "k");
  check_4d(v, "v");
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), "; got ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == q.sizes(), "v must have the shape of q ", q.sizes(), "; got ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                    "q, k, v must share one dtype; got ", q.scalar_type(), ", ", k.scalar_type(),
                    ", ", v.scalar_type());
  TORCH_CHECK_VALUE(q.is_cpu() && k.is_cpu() && v.is_cpu(),
                    "the C++ kernels take CPU tensors; got q on ", q.device(), ", k on ",
                    k.device(), ", v on ", v.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
                    "q dtype must be float32, float64 or bfloat16 for the C++ kernels; got ", dt);
  for (int i = 0; i < 3; ++i) {
    static const char* axes[] = {"batch B", "heads H", "tokens N"};
    TORCH_CHECK_VALUE(q.size(i) > 0, "q ", axes[i], " must be at least 1; got shape ", q.sizes());
  }
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= kMaxHeadDimCpu,
                    "head dim D must be in [1, ", kMaxHeadDimCpu, "] for the C++ kernels; got ",
                    q.size(3));
}

// The logit scale of a call whose inputs have dtype `dtype`: 0, or a number whose magnitude is a
// normal value of the accumulation type (float32; float64 for float64 inputs) no larger than the
// square root of that type's largest value. Below the smallest normal value the kernels' copy of
// the scale would lose bits or become 0; above the square root a logit scale * (q . k) overflows
// to inf as soon as |q . k| passes the same bound, so the limit splits the type's range evenly
// between the scale and the dot product. ops/checks.py applies the same rule, word for word.
inline void check_scale(double scale, at::ScalarType dtype, const char* name = "scale") {
  const bool dbl = dtype == at::kDouble;
  const double tiny = dbl ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  const double top = std::sqrt(dbl ? std::numeric_limits<double>::max()
                                   : static_cast<double>(std::numeric_limits<float>::max()));
  const double mag = std::fabs(scale);
  TORCH_CHECK_VALUE(std::isfinite(scale), name, " must be a finite number; got ", scale);
  TORCH_CHECK_VALUE(scale == 0.0 || (mag >= tiny && mag <= top), name,
                    " must be 0 or have a magnitude in [", tiny, ", ", top, "] (a normal ",
                    dbl ? "float64" : "float32", " number whose square is finite; the kernels "
                    "compute in that type); got ", scale);
}

// A tensor that must have a given shape and dtype (saved LSE, incoming gradients).
inline void check_like(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                       at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, "; got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, "; got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cpu(), name, " must be a CPU tensor; got ", t.device());
}

}  // namespace fastattnreg
