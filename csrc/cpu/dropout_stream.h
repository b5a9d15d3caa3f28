// Attention dropout's counter-based random stream (Philox4x32-10), the same bits as the
// Python reference fastattnreg/ops/dropout.py and the Triton kernels:
//   e = ((b * H + h) * N + i) * N + j, the linear index of P[b, h, i, j]
//   u = word (e % 4) of Philox4x32-10(counter (lo(e/4), hi(e/4), lo(offset), hi(offset)),
//                                      key (lo(seed), hi(seed)))
//   keep = u >= threshold, threshold = min(floor(p * 2^32), 2^32 - 1); kept entries * 1/(1-p).
// Nothing is stored: the backward regenerates each row's mask from (seed, offset, e).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastattnreg::cpu {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// The four 32-bit output words for counter (c0, c1, c2, c3) and key (k0, k1).
inline void philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t pb = uint64_t(kPhiloxRoundB) * c[2];
    const uint64_t pa = uint64_t(kPhiloxRoundA) * c[0];
    const uint32_t n0 = uint32_t(pb >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = uint32_t(pa >> 32) ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = uint32_t(pb);
    c[2] = n2;
    c[3] = uint32_t(pa);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// The stream of one call: seed, offset and the keep threshold; off when p == 0.
struct DropoutStream {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p)

  static DropoutStream make(double p, int64_t seed, int64_t offset) {
    DropoutStream s;
    s.on = p > 0.0;
    s.seed = static_cast<uint64_t>(seed);
    s.offset = static_cast<uint64_t>(offset);
    const double t = p * 4294967296.0;
    s.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
    s.keep_scale = 1.0 / (1.0 - p);
    return s;
  }

  // words[w] for w in [0, 4 * count): the output words of counters c_begin .. c_begin+count-1,
  // counter c's four words at 4 (c - c_begin) .. 4 (c - c_begin) + 3.
  void words(uint64_t c_begin, int64_t count, uint32_t* out) const {
    const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    const uint32_t o0 = uint32_t(offset), o1 = uint32_t(offset >> 32);
    int64_t c = 0;
#if defined(__AVX512F__)
    // 16 counters at a time. The 32 x 32 -> 64-bit products go through _mm512_mul_epu32, which
    // multiplies the even 32-bit lanes; the odd lanes are shifted down and multiplied apart.
    const __m512i ra = _mm512_set1_epi32(int(kPhiloxRoundA));
    const __m512i rb = _mm512_set1_epi32(int(kPhiloxRoundB));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    auto mulhi = [](__m512i a, __m512i b) {
      const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, b), 32);
      const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
      return _mm512_mask_blend_epi32(0xAAAA, even, odd);
    };
    alignas(64) uint32_t lanes[4][16];
    for (; c + 16 <= count; c += 16) {
      const uint64_t base = c_begin + uint64_t(c);
      // Counter words: low and high halves of base + lane (the high half carries on a wrap of
      // the low one), then the offset.
      const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(base))), lane);
      const __m512i carry = _mm512_maskz_set1_epi32(
          _mm512_cmplt_epu32_mask(lo, _mm512_set1_epi32(int(uint32_t(base)))), 1);
      __m512i x0 = lo;
      __m512i x1 = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(base >> 32))), carry);
      __m512i x2 = _mm512_set1_epi32(int(o0));
      __m512i x3 = _mm512_set1_epi32(int(o1));
      uint32_t key0 = k0, key1 = k1;
      for (int r = 0; r < kPhiloxRounds; ++r) {
        const __m512i hb = mulhi(rb, x2), ha = mulhi(ra, x0);
        const __m512i lb = _mm512_mullo_epi32(rb, x2), la = _mm512_mullo_epi32(ra, x0);
        x0 = _mm512_xor_si512(_mm512_xor_si512(hb, x1), _mm512_set1_epi32(int(key0)));
        x2 = _mm512_xor_si512(_mm512_xor_si512(ha, x3), _mm512_set1_epi32(int(key1)));
        x1 = lb;
        x3 = la;
        key0 += kPhiloxKeyA;
        key1 += kPhiloxKeyB;
      }
      _mm512_store_si512(lanes[0], x0);
      _mm512_store_si512(lanes[1], x1);
      _mm512_store_si512(lanes[2], x2);
      _mm512_store_si512(lanes[3], x3);
      uint32_t* o = out + 4 * c;
      for (int l = 0; l < 16; ++l)
        for (int w = 0; w < 4; ++w) o[4 * l + w] = lanes[w][l];
    }
#endif
    for (; c < count; ++c) {
      const uint64_t ctr = c_begin + uint64_t(c);
      uint32_t x[4] = {uint32_t(ctr), uint32_t(ctr >> 32), o0, o1};
      philox4x32(x, k0, k1);
      std::copy(x, x + 4, out + 4 * c);
    }
  }

  // mult[j] = keep(e0 + j) ? 1/(1-p) : 0 for j in [0, n); words_buf has room for n + 8 words.
  template <typename T>
  void row_multipliers(uint64_t e0, int64_t n, uint32_t* words_buf, T* mult) const {
    const uint64_t c_begin = e0 >> 2;
    const int64_t count = int64_t(((e0 + uint64_t(n) + 3) >> 2) - c_begin);
    words(c_begin, count, words_buf);
    const uint32_t* u = words_buf + (e0 & 3);
    const T s = static_cast<T>(keep_scale);
    for (int64_t j = 0; j < n; ++j) mult[j] = u[j] >= threshold ? s : T(0);
  }
};

// Room row_multipliers needs in its words buffer for rows of n entries.
inline int64_t dropout_words_elems(int64_t n) { return n + 8; }

}  // namespace fastattnreg::cpu
