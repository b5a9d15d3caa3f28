// Page-faulting an output buffer in one system call before a parallel kernel writes it.
//
// PyTorch's CPU allocator caches nothing, and glibc returns large freed blocks to the OS, so an
// output of map or q/k/v size (3.2 MB at (64, 3, 65, 64)) is usually fresh memory: the kernel's
// first write to each 4 KiB page traps, ~800 traps per buffer, taken by both threads at once
// and contending in the kernel. madvise(MADV_POPULATE_WRITE) (Linux 5.14) maps all of those
// pages in one call instead (at (64, 3, 65, 64): the backward's last pass 4.05 ms instead of
// 4.9-5.4, a training step ~0.3 ms faster; the pages are still zeroed, now by one thread).
// Advice only: where it is unavailable or refused nothing changes but the speed.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastattnreg::cpu {

inline void prefault_for_write(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kPage = 4096;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kPage - 1) & ~(kPage - 1);
  const uintptr_t hi = (begin + uintptr_t(t.nbytes())) & ~(kPage - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_POPULATE_WRITE);
#else
  (void)t;
#endif
}

// at::empty, its pages mapped in one call (see above).
inline at::Tensor empty_prefaulted(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  prefault_for_write(t);
  return t;
}

}  // namespace fastattnreg::cpu
