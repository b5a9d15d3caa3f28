// Which kernels the bf16 attention ops run, chosen at run time from what this build compiled,
// what the CPU reports (CPUID) and the environment variable FASTATTNREG_SIMD:
//   Avx512Bf16  bf16 operands multiplied pairwise into float accumulators (VDPBF16PS,
//               attention_bf16.h);
//   Float32     the inputs converted to float and the float kernels (attention_kernels.h).
// FASTATTNREG_SIMD: "auto" (or unset) takes the faster of the two for this CPU, which is Float32
// on every CPU measured so far: on the Xeon with AVX512-BF16 and no AMX that this project runs
// on, the VDPBF16PS score kernel runs at half the float kernel's FLOP rate (31 against 62
// GFLOP/s on a 197 x 197 x 64 tile, one thread), and torch's own bf16 matmul at 0.57x its float
// one. "avx512_bf16" asks for the bf16 kernels (Float32 where the CPU or the build lacks
// them); "avx512", "avx2" and "default" keep Float32. setup.py reads the same variable to cap
// the compile flags. The variable is read on every call, so tests switch kernels in one process.
// AMX tiles have no kernel here: "amx" is refused rather than silently run as something else.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace fastattnreg::cpu {

enum class Bf16Kernels { Float32, Avx512Bf16 };

inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has =
      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

// The kernels FASTATTNREG_SIMD asks for (a RuntimeError names a value it does not know).
inline Bf16Kernels bf16_kernels_requested() {
  const char* raw = std::getenv("FASTATTNREG_SIMD");
  const std::string v = raw ? raw : "auto";
  if (v == "avx512_bf16") return Bf16Kernels::Avx512Bf16;
  if (v == "auto" || v.empty() || v == "avx512" || v == "avx2" || v == "default")
    return Bf16Kernels::Float32;
  TORCH_CHECK(false, "FASTATTNREG_SIMD must be one of 'auto', 'avx512_bf16', 'avx512', 'avx2', "
                     "'default' (this build has no AMX kernels); got '", v, "'");
}

// The kernels a bf16 call runs now.
inline Bf16Kernels bf16_kernels() {
  const Bf16Kernels asked = bf16_kernels_requested();
#ifdef __AVX512BF16__
  if (asked == Bf16Kernels::Avx512Bf16 && cpu_has_avx512_bf16()) return Bf16Kernels::Avx512Bf16;
#endif
  return Bf16Kernels::Float32;
}

}  // namespace fastattnreg::cpu
