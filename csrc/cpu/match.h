// CPU entry points of the fused attention-matching loss (match.cpp), declared for the op
// registration and the C++ unit tests.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattnreg::cpu {

// q, k, v (B,H,N,D); teacher_q, teacher_k (B,H,N,Dt). kind: "kl" | "mse_probs" | "mse_logits";
// rows: "all" (R = N) | "cls" (R = 1: query 0 over keys 1..N-1, softmaxes renormalised there).
// Returns out (B,H,N,D), lse (B,H,N), teacher_lse (B,H,R; zeros for "mse_logits", which needs
// none), row_loss (B,H,R). attn_mask (attention_fwd's meaning) applies to both models' logits:
// masked keys take no part in a row's divergence; a row with every key masked has loss 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_match_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& teacher_q,
    const at::Tensor& teacher_k, const std::optional<at::Tensor>& attn_mask, double scale,
    double teacher_scale, c10::string_view kind, c10::string_view rows);

// dq, dk, dv from the gradients of out, lse and the per-row losses (each optional).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_match_bwd(
    const std::optional<at::Tensor>& dout, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& drow_loss, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& teacher_q,
    const at::Tensor& teacher_k, const at::Tensor& teacher_lse,
    const std::optional<at::Tensor>& attn_mask, double scale, double teacher_scale,
    c10::string_view kind, c10::string_view rows);

}  // namespace fastattnreg::cpu
