// Row math of the fused attention-matching loss: for one matched query row, the divergence between
// the student's and the teacher's attention and its gradient with respect to the student's scaled
// logits. Rows are given as scaled logits (ss: student, st: teacher, length n) plus each one's
// log-sum-exp over the same n keys, so probabilities are exp(s - lse) and log-probabilities
// s - lse: no log of a probability is ever taken. Vectorised like rowops.h.
// Masked keys (attention masks) come as logits of -inf in both rows: they take no part in any
// divergence (their terms are set to 0 where -inf - (-inf) would give NaN). A row whose every
// key is masked has an LSE of -inf; its callers give it loss 0 and no gradient.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "rowops.h"

namespace fastattnreg::cpu {

enum class MatchKind { KL, MseProbs, MseLogits };

// log sum_j exp(s[j]), j < n; -inf when every s[j] is -inf
template <typename T>
FASTATTNREG_ROW_PASS
T logsumexp_row(const T* s, int64_t n) {
  using V = Vectorized<T>;
  const T mx = max_row(s, n);
  if (mx == -std::numeric_limits<T>::infinity()) return mx;
  const V vm(mx);
  V vsum(T(0));
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    vsum = vsum + V::set(V(T(0)), vexp(V::loadu(s + j, c) - vm), c);
  });
  return mx + std::log(hsum(vsum));
}

// The row's divergence:
//   KL          sum_j pt_j (log pt_j - log ps_j)          KL(teacher || student)
//   MseProbs    sum_j (ps_j - pt_j)^2
//   MseLogits   sum_j (ss_j - st_j)^2                      (GTA's form)
template <typename T>
FASTATTNREG_ROW_PASS
T match_loss_row(MatchKind kind, const T* ss, T slse, const T* st, T tlse, int64_t n) {
  using V = Vectorized<T>;
  const V vs(slse), vt(tlse), zero(T(0)), neg_inf(-std::numeric_limits<T>::infinity());
  V acc = zero;
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V a = V::loadu(ss + j, c), b = V::loadu(st + j, c);
    V term;
    if (kind == MatchKind::KL) {
      const V log_pt = b - vt;
      term = V::blendv(vexp(log_pt) * (log_pt - (a - vs)), zero, b == neg_inf);
    } else if (kind == MatchKind::MseProbs) {
      const V diff = vexp(a - vs) - vexp(b - vt);
      term = diff * diff;
    } else {
      const V diff = V::blendv(a - b, zero, b == neg_inf);
      term = diff * diff;
    }
    acc = acc + V::set(zero, term, c);  // tail lanes hold exp(0 - lse) garbage: drop them
  });
  return hsum(acc);
}

// In place: st <- g * d(loss row)/d(ss), the gradient with respect to the student's scaled logits
// (the teacher's logits are consumed). g is the upstream gradient of this row's loss.
//   KL          g (ps - pt)
//   MseProbs    softmax backward of G = 2 g (ps - pt):  ps (G - sum_k ps_k G_k)
//   MseLogits   2 g (ss - st)
template <typename T>
FASTATTNREG_ROW_PASS
void match_grad_row(MatchKind kind, const T* ss, T slse, T* st, T tlse, int64_t n, T g) {
  using V = Vectorized<T>;
  const V vs(slse), vt(tlse), vg(g), two_g(T(2) * g), zero(T(0));
  const V neg_inf(-std::numeric_limits<T>::infinity());
  if (kind == MatchKind::KL) {
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      const V d = vexp(V::loadu(ss + j, c) - vs) - vexp(V::loadu(st + j, c) - vt);
      (vg * d).store(st + j, c);
    });
  } else if (kind == MatchKind::MseLogits) {
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      const V t = V::loadu(st + j, c);
      (two_g * V::blendv(V::loadu(ss + j, c) - t, zero, t == neg_inf)).store(st + j, c);
    });
  } else {
    V vc = zero;  // sum_k ps_k G_k
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      const V ps = vexp(V::loadu(ss + j, c) - vs);
      const V G = two_g * (ps - vexp(V::loadu(st + j, c) - vt));
      G.store(st + j, c);
      vc = vc + V::set(zero, ps * G, c);
    });
    const V cc(hsum(vc));
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      const V ps = vexp(V::loadu(ss + j, c) - vs);
      (ps * (V::loadu(st + j, c) - cc)).store(st + j, c);
    });
  }
}

// The fused forms for every-row matching (rows = "all"), where the matched row is the whole score
// row: each makes one pass over the row where the general functions above take two or three.

// KL forward of a matched row, fused with the student's softmax. Given the raw scaled logits s
// (student) and st (teacher): in place s <- exp(s - max s), unnormalised, as exp_row does, with
// *s_max and *s_sum set as exp_row sets them; *tlse = log sum_j exp(st_j); returns
//   sum_j pt_j (st_j - s_j),  so that  KL(pt || ps) = returned - tlse + lse.
// Two passes over the pair of rows (both maxima, then both exps) where a student softmax and a
// separate teacher pass took four. The teacher's sum of exp runs the student's operations in the
// same lane order, so a teacher that copies the student gets tlse == lse bitwise, a returned 0
// (every st_j - s_j is 0) and a loss of exactly 0. A fully masked row (every s_j and st_j -inf)
// becomes 0 with *s_sum = 0, *tlse = -inf and returns 0.
template <typename T>
FASTATTNREG_ROW_PASS
T kl_softmax_row(T* s, const T* st, int64_t n, T* s_max, T* s_sum, T* tlse) {
  using V = Vectorized<T>;
  const V neg_inf(-std::numeric_limits<T>::infinity()), zero(T(0));
  V vms = neg_inf, vmt = neg_inf;
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    vms = at::vec::maximum(vms, V::set(neg_inf, V::loadu(s + j, c), c));
    vmt = at::vec::maximum(vmt, V::set(neg_inf, V::loadu(st + j, c), c));
  });
  auto vmax = [](V& a, V& b) { return at::vec::maximum(a, b); };
  const T ms = at::vec::vec_reduce_all<T>(vmax, vms), mt = at::vec::vec_reduce_all<T>(vmax, vmt);
  if (ms == -std::numeric_limits<T>::infinity()) {
    std::fill(s, s + n, T(0));
    *s_max = ms;
    *s_sum = T(0);
    *tlse = mt;
    return T(0);
  }
  const V vs(ms), vt(mt);
  V ssum = zero, tsum = zero, vdot = zero;
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V a = V::loadu(s + j, c), t = V::loadu(st + j, c);
    const V es = V::set(zero, vexp(a - vs), c);
    const V et = V::set(zero, vexp(t - vt), c);
    es.store(s + j, c);
    ssum = ssum + es;
    tsum = tsum + et;
    // tail lanes: et = 0; masked keys: et = 0 and t - a = NaN, so the term is set to 0
    vdot = at::vec::fmadd(et, V::blendv(t - a, zero, t == neg_inf), vdot);
  });
  *s_max = ms;
  *s_sum = hsum(ssum);
  const T t_sum = hsum(tsum);
  *tlse = mt + std::log(t_sum);
  return hsum(vdot) / t_sum;
}

// KL backward of a matched row, fused with the softmax backward. In place:
//   s  <- p = exp(s - lse)                 (s: the student's scaled logits)
//   dp <- scale * (p (dp - delta) + g (p - pt)),   pt = exp(st - tlse)
// g (p - pt) is the KL's gradient with respect to the student's logits; it is exactly 0 when the
// teacher copies the student (st == s, tlse == lse bitwise), so that gradient is exactly 0 too.
template <typename T>
FASTATTNREG_ROW_PASS
void softmax_grad_kl_row(T* s, T* dp, const T* st, int64_t n, T lse, T delta, T scale, T tlse,
                         T g) {
  using V = Vectorized<T>;
  const V vl(lse), vd(delta), vs(scale), vtl(tlse), vg(g);
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V p = vexp(V::loadu(s + j, c) - vl);
    const V pt = vexp(V::loadu(st + j, c) - vtl);
    p.store(s + j, c);
    (vs * at::vec::fmadd(p, V::loadu(dp + j, c) - vd, vg * (p - pt))).store(dp + j, c);
  });
}

// MseLogits backward of a matched row, fused likewise: dp <- scale (p (dp - delta) + 2 g (s - st))
// with s the raw logits read before p overwrites them.
template <typename T>
FASTATTNREG_ROW_PASS
void softmax_grad_mse_logits_row(T* s, T* dp, const T* st, int64_t n, T lse, T delta, T scale,
                                 T g) {
  using V = Vectorized<T>;
  const V vl(lse), vd(delta), vs(scale), two_g(T(2) * g), zero(T(0));
  const V neg_inf(-std::numeric_limits<T>::infinity());
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V x = V::loadu(s + j, c), t = V::loadu(st + j, c);
    const V p = vexp(x - vl);
    p.store(s + j, c);
    (vs * at::vec::fmadd(p, V::loadu(dp + j, c) - vd, two_g * V::blendv(x - t, zero, t == neg_inf)))
        .store(dp + j, c);
  });
}

}  // namespace fastattnreg::cpu
