// The fused Refiner attention on the CPU (DeepViT's Refiner). Declared here so the op registration
// and the C++ unit tests (csrc/tests) call the same functions.
//
// Shapes, with C = expansion * H expanded channels and K the (odd) depthwise kernel size:
//   q, k, v (B, H, N, D); w_exp (C, H); w_dw (C, K, K); w_pro (H, C);
//   bn_weight, bn_bias, running_mean, running_var: the four BatchNorms packed, (2C + 2H) =
//   bn1 (C) | bn2 (C) | bn3 (H) | adapt (H); keep: optional (B, H, N, N) bool dropout mask
//   (kept entries scaled by drop_scale); eps: four values, one per BatchNorm.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastattnreg::cpu {

// Returns
//   out   (B, H, N, D), dtype of q
//   probs (B, H, N, N) P = softmax(scale q k^T) in the accumulation type (float32, float64 for
//         float64), kept for the backward; stored when training or save_probs, else empty (0,)
//   y     (B, H, N, N) Y = W_r F in the accumulation type, kept for the backward (its first pass
//         then skips the refinement chain); stored when training, else empty (0,)
//   mean, var (2C + 2H), accumulation type: the statistics each BatchNorm used; in training the
//         batch mean and biased variance over (B, N, N), in eval a copy of the running ones.
//   maps  the refined attention A* (what meets V) by export_kind, q's dtype: "full" (B, H, N, N),
//         "head_mean" (B, N, N) (mean over heads), "cls" (B, H, N) (row 0 of each head);
//         "none": empty (0,), nothing computed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
refined_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,  // (B, H, N, D)
    const at::Tensor& w_exp, const at::Tensor& w_dw, const at::Tensor& w_pro,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias,        // packed (2C + 2H)
    const at::Tensor& running_mean, const at::Tensor& running_var,  // packed (2C + 2H)
    const std::optional<at::Tensor>& keep, at::ArrayRef<double> eps, double scale,
    double drop_scale, bool training, bool save_probs, c10::string_view export_kind = "none");

// Gradients of q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias from dout and (optionally) dmaps,
// the gradient of the maps the forward exported with export_kind (its shape, q's dtype), given
// what the forward returned (probs, y, mean, var). training = false: the statistics were
// constants (eval mode); then probs may be empty (an eval forward with save_probs = false) and is
// recomputed. y may be empty (recomputed where needed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
refined_attention_bwd(
    const at::Tensor& dout,                                          // (B, H, N, D)
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,  // (B, H, N, D)
    const at::Tensor& w_exp, const at::Tensor& w_dw, const at::Tensor& w_pro,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias,  // packed (2C + 2H)
    const at::Tensor& probs, const at::Tensor& y,            // (B, H, N, N) or empty
    const at::Tensor& mean, const at::Tensor& var,           // packed (2C + 2H)
    const std::optional<at::Tensor>& keep, at::ArrayRef<double> eps, double scale,
    double drop_scale, bool training, const std::optional<at::Tensor>& dmaps = std::nullopt,
    c10::string_view export_kind = "none");

}  // namespace fastattnreg::cpu
