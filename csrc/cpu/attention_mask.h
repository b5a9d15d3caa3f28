// An attention mask as the kernels read it: SDPA's meaning (bool: true = the key takes part;
// floating: an additive bias on the scaled logits), broadcast to (B, H, N, N) through strides
// (0 along broadcast axes), so a key-padding (B, 1, 1, N) or shared (N, N) mask is never
// expanded in memory.
#pragma once

#include <cstdint>
#include <limits>

namespace fastattnreg::cpu {

template <typename scalar_t>
struct MaskView {
  const void* data = nullptr;  // nullptr: no mask
  bool is_bool = false;
  int64_t sB = 0, sH = 0, sI = 0, sJ = 0;  // element strides of the (B, H, N, N) view

  bool on() const { return data != nullptr; }

  // Row i of head (b, h) applied to the scaled logits s[0, n): bias added, or -inf where false.
  template <typename acc_t>
  void apply_row(acc_t* s, int64_t n, int64_t b, int64_t h, int64_t i) const {
    const int64_t at = b * sB + h * sH + i * sI;
    if (is_bool) {
      const bool* m = static_cast<const bool*>(data) + at;
      const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
      if (sJ == 1) {
        for (int64_t j = 0; j < n; ++j) s[j] = m[j] ? s[j] : neg_inf;
      } else {
        for (int64_t j = 0; j < n; ++j) s[j] = m[j * sJ] ? s[j] : neg_inf;
      }
    } else {
      const scalar_t* m = static_cast<const scalar_t*>(data) + at;
      if (sJ == 1) {
        for (int64_t j = 0; j < n; ++j) s[j] += static_cast<acc_t>(m[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) s[j] += static_cast<acc_t>(m[j * sJ]);
      }
    }
  }
};

}  // namespace fastattnreg::cpu
