// CPU attention kernels with exact map export. Declared here so the op registration and the C++
// unit tests (csrc/tests) call the same functions.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattnreg::cpu {

// q, k, v: (B, H, N, D). Returns
//   out  (B, H, N, D), dtype of q
//   lse  (B, H, N), float32 (float64 for float64 inputs): log-sum-exp of the scaled logits
//   maps by `export`: "none" -> empty (0,); "full" -> (B, H, N, N); "head_mean" -> (B, N, N);
//        "cls" -> (B, H, N), the softmax row of query 0. Dtype of q.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,  // (B, H, N, D)
    const std::optional<at::Tensor>& attn_mask,  // bool or additive, broadcast to (B, H, N, N)
    const std::optional<at::Tensor>& rng,        // int64 (seed, offset): dropout_p > 0 only
    double scale, c10::string_view export_kind, double dropout_p);

// Gradients of q, k, v given any of: dout (B,H,N,D), dlse (B,H,N), dmaps (shape of the export).
// P is recomputed from q, k and lse; the map and LSE gradients are folded into dS:
//   dP = dout V^T + G(dmaps),  delta_i = dout_i . out_i + sum_j P_ij G_ij - dlse_i,
//   dS = scale P (dP - delta).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const std::optional<at::Tensor>& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& dmaps,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& rng, double scale,
    c10::string_view export_kind, double dropout_p, bool mask_grad);

}  // namespace fastattnreg::cpu
