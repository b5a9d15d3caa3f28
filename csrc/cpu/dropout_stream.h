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
#include <type_traits>

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

// Words DropoutStream::keep_bits needs for rows of n entries: the bits of ceil((n + 3) / 4)
// counters, plus one word that bit_window may read past them.
inline int64_t keep_bits_words(int64_t n) { return (n + 6) / 64 + 3; }

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

  // Keep bits of the entries e0 .. e0 + n - 1: entry e0 + j's bit is bit (e0 % 4) + j of
  // `bits` (64 per word, counter c_begin = e0 / 4 at bit 0). bits: keep_bits_words(n) words.
  void keep_bits(uint64_t e0, int64_t n, uint64_t* bits) const {
    const uint64_t c_begin = e0 >> 2;
    const int64_t count = int64_t(((e0 + uint64_t(n) + 3) >> 2) - c_begin);
    std::fill(bits, bits + keep_bits_words(n), uint64_t(0));
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c + 64 <= count; c += 64) keep_bits_16x<4>(c_begin + uint64_t(c), bits + c / 16);
    for (; c + 16 <= count; c += 16) keep_bits_16x<1>(c_begin + uint64_t(c), bits + c / 16);
#endif
    const uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (; c < count; ++c) {
      const uint64_t ctr = c_begin + uint64_t(c);
      uint32_t x[4] = {uint32_t(ctr), uint32_t(ctr >> 32), uint32_t(offset),
                       uint32_t(offset >> 32)};
      philox4x32(x, k0, k1);
      for (int w = 0; w < 4; ++w)
        if (x[w] >= threshold) bits[(4 * c + w) / 64] |= uint64_t(1) << ((4 * c + w) % 64);
    }
  }

  // In place: row[j] = keep ? row[j] / (1 - p) : 0 for j < n, keep = bit bit0 + j of `bits`.
  template <typename T>
  void apply(T* row, int64_t n, const uint64_t* bits, int64_t bit0) const {
    const T s = static_cast<T>(keep_scale);
    int64_t j = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      constexpr int64_t W = std::is_same_v<T, float> ? 16 : 8;
      for (; j < n; j += W) {
        const int64_t lanes = std::min<int64_t>(W, n - j);
        const uint64_t m = bit_window(bits, bit0 + j) & ((uint64_t(1) << lanes) - 1);
        if constexpr (std::is_same_v<T, float>) {
          const __mmask16 k = __mmask16(m), live = __mmask16((uint64_t(1) << lanes) - 1);
          const __m512 v = _mm512_maskz_loadu_ps(live, row + j);
          _mm512_mask_storeu_ps(row + j, live, _mm512_maskz_mul_ps(k, v, _mm512_set1_ps(s)));
        } else {
          const __mmask8 k = __mmask8(m), live = __mmask8((uint64_t(1) << lanes) - 1);
          const __m512d v = _mm512_maskz_loadu_pd(live, row + j);
          _mm512_mask_storeu_pd(row + j, live, _mm512_maskz_mul_pd(k, v, _mm512_set1_pd(s)));
        }
      }
      return;
    }
#endif
    for (; j < n; ++j) {
      const int64_t b = bit0 + j;
      row[j] = (bits[b / 64] >> (b % 64)) & 1 ? row[j] * s : T(0);
    }
  }

 private:
  // The 64 bits starting at bit b (the word after the one holding b supplies the rest).
  static uint64_t bit_window(const uint64_t* bits, int64_t b) {
    const int64_t w = b / 64, sh = b % 64;
    return sh == 0 ? bits[w] : (bits[w] >> sh) | (bits[w + 1] << (64 - sh));
  }

#if defined(__AVX512F__)
  // The keep bits of the 64 K entries of counters base .. base + 16 K - 1 into out[0, K):
  // Philox on K groups of 16 counters side by side (each round is a chain of dependent
  // multiplies; K independent chains keep the multiplier busy), one compare per output word,
  // and the four 16-bit masks of a group interleaved so that entry 4 l + w (counter l, word w)
  // lands on bit 4 l + w. The 32 x 32 -> 64-bit products go through _mm512_mul_epu32, which
  // multiplies the even 32-bit lanes; the odd lanes are shifted down and multiplied apart.
  template <int K>
  __attribute__((target("bmi2"))) void keep_bits_16x(uint64_t base, uint64_t* out) const {
    const __m512i ra = _mm512_set1_epi32(int(kPhiloxRoundA));
    const __m512i rb = _mm512_set1_epi32(int(kPhiloxRoundB));
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    auto mulhi = [](__m512i a, __m512i b) {
      const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, b), 32);
      const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
      return _mm512_mask_blend_epi32(0xAAAA, even, odd);
    };
    __m512i x0[K], x1[K], x2[K], x3[K];
    for (int g = 0; g < K; ++g) {
      // Counter words: low and high halves of the group's base + lane (the high half carries
      // on a wrap of the low one), then the offset.
      const uint64_t gb = base + 16 * uint64_t(g);
      const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(gb))), lane);
      const __m512i carry = _mm512_maskz_set1_epi32(
          _mm512_cmplt_epu32_mask(lo, _mm512_set1_epi32(int(uint32_t(gb)))), 1);
      x0[g] = lo;
      x1[g] = _mm512_add_epi32(_mm512_set1_epi32(int(uint32_t(gb >> 32))), carry);
      x2[g] = _mm512_set1_epi32(int(uint32_t(offset)));
      x3[g] = _mm512_set1_epi32(int(uint32_t(offset >> 32)));
    }
    uint32_t key0 = uint32_t(seed), key1 = uint32_t(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const __m512i k0v = _mm512_set1_epi32(int(key0)), k1v = _mm512_set1_epi32(int(key1));
      for (int g = 0; g < K; ++g) {
        const __m512i hb = mulhi(rb, x2[g]), ha = mulhi(ra, x0[g]);
        const __m512i lb = _mm512_mullo_epi32(rb, x2[g]), la = _mm512_mullo_epi32(ra, x0[g]);
        x0[g] = _mm512_xor_si512(_mm512_xor_si512(hb, x1[g]), k0v);
        x2[g] = _mm512_xor_si512(_mm512_xor_si512(ha, x3[g]), k1v);
        x1[g] = lb;
        x3[g] = la;
      }
      key0 += kPhiloxKeyA;
      key1 += kPhiloxKeyB;
    }
    const __m512i t = _mm512_set1_epi32(int(threshold));
    for (int g = 0; g < K; ++g) {
      const uint64_t m0 = _mm512_cmpge_epu32_mask(x0[g], t);
      const uint64_t m1 = _mm512_cmpge_epu32_mask(x1[g], t);
      const uint64_t m2 = _mm512_cmpge_epu32_mask(x2[g], t);
      const uint64_t m3 = _mm512_cmpge_epu32_mask(x3[g], t);
      out[g] = _pdep_u64(m0, 0x1111111111111111ull) | _pdep_u64(m1, 0x2222222222222222ull) |
               _pdep_u64(m2, 0x4444444444444444ull) | _pdep_u64(m3, 0x8888888888888888ull);
    }
  }
#endif
};


}  // namespace fastattnreg::cpu
