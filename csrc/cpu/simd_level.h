// Which kernels the bf16 attention ops run, chosen at run time from what this build compiled,
// what the CPU reports and the environment variable FASTATTNREG_SIMD:
//   Amx         bf16 operands on the AMX tile unit through oneDNN's batch-reduce GEMM
//               micro-kernel (attention_amx.h);
//   Avx512Bf16  bf16 operands multiplied pairwise into float accumulators (VDPBF16PS,
//               attention_bf16.h);
//   Float32     the inputs converted to float and the float kernels (attention_kernels.h).
// FASTATTNREG_SIMD: "auto" (or unset) takes the fastest for this CPU: Amx where the CPU has AMX
// tiles (oneDNN decides: its ONEDNN_MAX_CPU_ISA cap and torch.backends.mkldnn.enabled = False
// both rule AMX out), else Float32. Float32 beats Avx512Bf16 on the one CPU with AVX512-BF16 and
// no AMX measured (the VDPBF16PS score kernel ran at half the float kernel's FLOP rate there).
// "amx" and "avx512_bf16" ask for those kernels (Float32 where the CPU or the build lacks them);
// "avx512", "avx2" and "default" keep Float32. setup.py reads the same variable to cap the
// compile flags. The variable is read on every call, so tests switch kernels in one process.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace fastattnreg::cpu {

enum class Bf16Kernels { Float32, Avx512Bf16, Amx };

// What FASTATTNREG_SIMD asks for: a kernel, or the fastest available (Auto).
enum class Bf16Request { Auto, Float32, Avx512Bf16, Amx };

inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has =
      __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

// Whether oneDNN runs bf16 products on AMX tiles now (it checks the CPU, asks the kernel for the
// tile state once, and honours ONEDNN_MAX_CPU_ISA and torch.backends.mkldnn.enabled).
inline bool cpu_has_amx() { return at::native::cpublas::could_pack(at::kBFloat16); }

// The request in FASTATTNREG_SIMD (a RuntimeError names a value it does not know).
inline Bf16Request bf16_kernels_requested() {
  const char* raw = std::getenv("FASTATTNREG_SIMD");
  const std::string v = raw ? raw : "auto";
  if (v == "auto" || v.empty()) return Bf16Request::Auto;
  if (v == "amx") return Bf16Request::Amx;
  if (v == "avx512_bf16") return Bf16Request::Avx512Bf16;
  if (v == "avx512" || v == "avx2" || v == "default") return Bf16Request::Float32;
  TORCH_CHECK(false, "FASTATTNREG_SIMD must be one of 'auto', 'amx', 'avx512_bf16', 'avx512', "
                     "'avx2', 'default'; got '", v, "'");
}

// The kernels a bf16 call runs now.
inline Bf16Kernels bf16_kernels() {
  const Bf16Request asked = bf16_kernels_requested();
#ifdef __AVX512BF16__
  if ((asked == Bf16Request::Auto || asked == Bf16Request::Amx) && cpu_has_amx())
    return Bf16Kernels::Amx;
  if (asked == Bf16Request::Avx512Bf16 && cpu_has_avx512_bf16()) return Bf16Kernels::Avx512Bf16;
#endif
  (void)asked;
  return Bf16Kernels::Float32;
}

}  // namespace fastattnreg::cpu
