// An attention mask as the kernels read it: SDPA's meaning (bool: true = the key takes part;
// floating: an additive bias on the scaled logits), broadcast to (B, H, N, N) through strides
// (0 along broadcast axes), so a key-padding (B, 1, 1, N) or shared (N, N) mask is never
// expanded in memory.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

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
#if defined(__AVX512BW__) && defined(__AVX512VL__)
      // 16 mask bytes -> a lane mask in one test; GCC leaves the byte-select loop scalar.
      if constexpr (std::is_same_v<acc_t, float>) {
        if (sJ == 1) {
          const __m512 vinf = _mm512_set1_ps(neg_inf);
          for (int64_t j = 0; j < n; j += 16) {
            const int64_t lanes = std::min<int64_t>(16, n - j);
            const __mmask16 live = __mmask16((uint32_t(1) << lanes) - 1);
            const __m128i bytes = _mm_maskz_loadu_epi8(live, m + j);
            const __mmask16 keep = _mm_test_epi8_mask(bytes, bytes);
            const __m512 v = _mm512_maskz_loadu_ps(live, s + j);
            _mm512_mask_storeu_ps(s + j, live, _mm512_mask_blend_ps(keep, vinf, v));
          }
          return;
        }
      }
#endif
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

// The mask broadcast to (B, H, N, N) as a view (strides 0 along broadcast axes): checked, never
// copied. Returns an undefined tensor for no mask.
inline at::Tensor mask_view(const std::optional<at::Tensor>& attn_mask, const at::Tensor& q) {
  if (!attn_mask.has_value()) return {};
  const at::Tensor& m = *attn_mask;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  TORCH_CHECK_VALUE(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
                    "attn_mask must be bool (True = takes part) or q's dtype ", q.scalar_type(),
                    " (an additive bias); got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() >= 2 && m.dim() <= 4, "attn_mask must have 2 to 4 dims and ",
                    "broadcast to (B, H, N, N) = [", B, ", ", H, ", ", N, ", ", N, "]; got shape ",
                    m.sizes());
  const int64_t target[4] = {B, H, N, N};
  for (int64_t i = 0; i < m.dim(); ++i) {
    const int64_t s = m.size(i), t = target[4 - m.dim() + i];
    TORCH_CHECK_VALUE(s == 1 || s == t, "attn_mask of shape ", m.sizes(),
                      " does not broadcast to (B, H, N, N) = [", B, ", ", H, ", ", N, ", ", N,
                      "]");
  }
  TORCH_CHECK_VALUE(m.is_cpu(), "attn_mask must be a CPU tensor like q; got ", m.device());
  return m.expand({B, H, N, N});
}

template <typename scalar_t>
MaskView<scalar_t> make_mask_view(const at::Tensor& view) {
  MaskView<scalar_t> mv;
  if (!view.defined()) return mv;
  mv.data = view.const_data_ptr();
  mv.is_bool = view.scalar_type() == at::kBool;
  mv.sB = view.stride(0), mv.sH = view.stride(1), mv.sI = view.stride(2), mv.sJ = view.stride(3);
  return mv;
}

}  // namespace fastattnreg::cpu
