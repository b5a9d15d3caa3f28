// Inputs of the CPU kernels, contiguous and 64-byte aligned.
//
// MKL's GEMMs round differently depending on where their operands start: a float64 head read
// 8 bytes off a cache line gave outputs 1 ulp apart from the same values stored aligned
// (tests/test_determinism.py). The kernels hand BLAS pointers into q, k, v (and out, dout,
// the teacher's q and k) directly, so an input that is a view at a misaligned storage offset is
// copied into a fresh tensor (torch's CPU allocator aligns to 64 bytes): the same values then
// give the same bits wherever the caller stores them. Aligned contiguous inputs are used as
// they are; the copy costs one pass over a misaligned input.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace fastattnreg::cpu {

constexpr std::uintptr_t kInputAlignment = 64;

inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && reinterpret_cast<std::uintptr_t>(c.const_data_ptr()) % kInputAlignment != 0)
    c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

}  // namespace fastattnreg::cpu
