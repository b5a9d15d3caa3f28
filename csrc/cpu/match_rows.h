// Row math of the fused attention-matching loss: for one matched query row, the divergence between
// the student's and the teacher's attention and its gradient with respect to the student's scaled
// logits. Rows are given as scaled logits (ss: student, st: teacher, length n) plus each one's
// log-sum-exp over the same n keys, so probabilities are exp(s - lse) and log-probabilities
// s - lse: no log of a probability is ever taken. Vectorised like rowops.h.
#pragma once

#include <cmath>
#include <limits>

#include "rowops.h"

namespace fastattnreg::cpu {

enum class MatchKind { KL, MseProbs, MseLogits };

// log sum_j exp(s[j]), j < n
template <typename T>
FASTATTNREG_ROW_PASS
T logsumexp_row(const T* s, int64_t n) {
  using V = Vectorized<T>;
  const T mx = max_row(s, n);
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
  const V vs(slse), vt(tlse), zero(T(0));
  V acc = zero;
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V a = V::loadu(ss + j, c), b = V::loadu(st + j, c);
    V term;
    if (kind == MatchKind::KL) {
      const V log_pt = b - vt;
      term = vexp(log_pt) * (log_pt - (a - vs));
    } else if (kind == MatchKind::MseProbs) {
      const V diff = vexp(a - vs) - vexp(b - vt);
      term = diff * diff;
    } else {
      const V diff = a - b;
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
  if (kind == MatchKind::KL) {
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      const V d = vexp(V::loadu(ss + j, c) - vs) - vexp(V::loadu(st + j, c) - vt);
      (vg * d).store(st + j, c);
    });
  } else if (kind == MatchKind::MseLogits) {
    for_each_vec<T>(n, [&](int64_t j, int64_t c) {
      (two_g * (V::loadu(ss + j, c) - V::loadu(st + j, c))).store(st + j, c);
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

// KL forward, teacher side, run on the raw logits before the student's softmax overwrites ss:
// returns sum_j pt_j (st_j - ss_j) and sets *tlse = log sum_j exp(st_j). The row's
//   KL(pt || ps) = sum_j pt_j ((st_j - tlse) - (ss_j - slse)) = returned - tlse + slse
// is completed once the student's slse is known. One exp per element (the two-pass form takes
// two). The sum of exp runs exactly as exp_row's does on the student (same max, same operations in
// the same lane order), so a teacher that copies the student gets tlse == slse bitwise, a
// returned 0 (every st_j - ss_j is 0) and a loss of exactly 0.
template <typename T>
FASTATTNREG_ROW_PASS
T kl_teacher_row(const T* ss, const T* st, int64_t n, T* tlse) {
  using V = Vectorized<T>;
  const T mx = max_row(st, n);
  const V vm(mx), zero(T(0));
  V vsum = zero, vdot = zero;
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V t = V::loadu(st + j, c);
    const V e = V::set(zero, vexp(t - vm), c);
    vsum = vsum + e;
    vdot = at::vec::fmadd(e, t - V::loadu(ss + j, c), vdot);  // tail lanes: e = 0
  });
  const T sum = hsum(vsum);
  *tlse = mx + std::log(sum);
  return hsum(vdot) / sum;
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
  const V vl(lse), vd(delta), vs(scale), two_g(T(2) * g);
  for_each_vec<T>(n, [&](int64_t j, int64_t c) {
    const V x = V::loadu(s + j, c);
    const V p = vexp(x - vl);
    p.store(s + j, c);
    (vs * at::vec::fmadd(p, V::loadu(dp + j, c) - vd, two_g * (x - V::loadu(st + j, c))))
        .store(dp + j, c);
  });
}

}  // namespace fastattnreg::cpu
