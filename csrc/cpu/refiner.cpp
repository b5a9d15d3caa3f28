// The Refiner ops' CPU entry points: argument checks, conversion of the (small) weights to the
// accumulation type, output allocation, dtype dispatch into refiner_forward.h /
// refiner_backward.h, and their registration for the CPU dispatch key.
#include "refiner.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string>
#include <vector>

#include "../checks.h"
#include "aligned.h"
#include "refiner_backward.h"
#include "refiner_forward.h"

namespace fastattnreg::cpu {
namespace {

// Largest depthwise kernel: the halo rows grow with it; Refiner uses 3, 5 is its ablation.
constexpr int64_t kMaxKernelSize = 15;

void check_param(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                 const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, " (from q's H = ",
                    q.size(1), " heads and the expanded channels); got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ",
                    q.scalar_type(), "; got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cpu(), name, " must be a CPU tensor; got ", t.device());
}

// Checks every argument; returns the dims.
refiner::Dims check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& w_exp, const at::Tensor& w_dw, const at::Tensor& w_pro,
                         const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                         const std::optional<at::Tensor>& keep, at::ArrayRef<double> eps,
                         double scale, double drop_scale) {
  check_qkv_cpu(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(w_exp.dim() == 2 && w_exp.size(0) >= 1,
                    "w_exp must be 2-D (C, H) with C = expansion * H >= 1 expanded channels; got "
                    "shape ", w_exp.sizes());
  const int64_t C = w_exp.size(0);
  check_param(w_exp, "w_exp", {C, H}, q);
  TORCH_CHECK_VALUE(w_dw.dim() == 3, "w_dw must be 3-D (C, K, K); got shape ", w_dw.sizes());
  const int64_t K = w_dw.size(2);
  TORCH_CHECK_VALUE(K % 2 == 1 && K >= 1 && K <= kMaxKernelSize,
                    "the depthwise kernel size K must be odd and in [1, ", kMaxKernelSize,
                    "] (zero 'same' padding needs an odd kernel); got ", K);
  check_param(w_dw, "w_dw", {C, K, K}, q);
  check_param(w_pro, "w_pro", {H, C}, q);
  check_param(bn_weight, "bn_weight", {2 * C + 2 * H}, q);
  check_param(bn_bias, "bn_bias", {2 * C + 2 * H}, q);
  TORCH_CHECK_VALUE(eps.size() == 4, "eps must hold 4 values (bn1, bn2, bn3, adapt); got ",
                    eps.size());
  for (double e : eps)
    TORCH_CHECK_VALUE(std::isfinite(e) && e > 0, "eps must be finite and > 0 (it keeps ",
                      "1 / sqrt(var + eps) finite for a zero variance); got ", e);
  check_scale(scale, q.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(drop_scale) && drop_scale >= 1,
                    "drop_scale = 1 / (1 - attn_drop) must be finite and >= 1; got ", drop_scale);
  if (keep.has_value()) {
    TORCH_CHECK_VALUE(keep->sizes() == at::IntArrayRef({B, H, N, N}) &&
                          keep->scalar_type() == at::kBool && keep->is_cpu(),
                      "keep (the dropout mask) must be a CPU bool tensor of shape ",
                      at::IntArrayRef({B, H, N, N}), "; got ", keep->scalar_type(), " ",
                      keep->sizes(), " on ", keep->device());
  }
  return {B, H, N, D, C, K};
}

std::vector<double> to_doubles(const at::Tensor& t) {
  const auto c = t.detach().to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

// The packed running statistics (2C + 2H, bn1 | bn2 | bn3 | adapt): q's dtype or the accumulation
// type (float32 statistics of a bfloat16 layer are read unrounded), every mean finite and every
// variance finite and >= 0. Both modes check them: eval reads them, and training would carry a
// NaN or a negative variance on into every later eval step.
void check_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                         const refiner::Dims& d, const at::Tensor& q) {
  const std::vector<int64_t> shape{2 * d.C + 2 * d.H};
  const auto acc = acc_dtype(q.scalar_type());
  for (const auto* t : {&running_mean, &running_var}) {
    const char* name = t == &running_mean ? "running_mean" : "running_var";
    TORCH_CHECK_VALUE(t->sizes() == shape, name, " must have shape ", shape, " (bn1 | bn2 | bn3 | ",
                      "adapt_bn packed); got ", t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type() || t->scalar_type() == acc, name,
                      " must have q's dtype ", q.scalar_type(), " or ", acc, "; got ",
                      t->scalar_type());
    TORCH_CHECK_VALUE(t->is_cpu(), name, " must be a CPU tensor; got ", t->device());
  }
  const std::vector<double> mean = to_doubles(running_mean), var = to_doubles(running_var);
  static const char* bn_names[] = {"bn1", "bn2", "bn3", "adapt_bn"};
  const int64_t ends[] = {d.C, 2 * d.C, 2 * d.C + d.H, 2 * d.C + 2 * d.H};
  for (size_t i = 0; i < mean.size(); ++i) {
    const int64_t bn = std::upper_bound(std::begin(ends), std::end(ends), int64_t(i)) - ends;
    const int64_t ch = bn == 0 ? int64_t(i) : int64_t(i) - ends[bn - 1];
    TORCH_CHECK_VALUE(std::isfinite(mean[i]), "running_mean of ", bn_names[bn], " channel ", ch,
                      " must be finite; got ", mean[i]);
    TORCH_CHECK_VALUE(std::isfinite(var[i]) && var[i] >= 0, "running_var of ", bn_names[bn],
                      " channel ", ch, " must be finite and >= 0; got ", var[i]);
  }
}

at::Tensor acc_copy(const at::Tensor& t) {
  return aligned_contiguous(t.to(acc_dtype(t.scalar_type())));
}

// The exports refined attention offers (a subset of what checks.h's parse_export knows, which
// other ops may extend): anything else is refused here, naming the four.
ExportKind parse_refiner_export(c10::string_view s) {
  TORCH_CHECK_VALUE(s == "none" || s == "full" || s == "head_mean" || s == "cls",
                    "export must be one of 'none', 'full', 'head_mean', 'cls'; got '",
                    std::string(s), "'");
  return parse_export(s);
}

// The inputs every pass reads: q, k, v contiguous, the weights in the accumulation type, the
// dropout mask (training only).
struct Inputs {
  at::Tensor q, k, v, w_exp, w_dw, w_pro, gamma, beta, keep;
  Inputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
         const at::Tensor& w_exp_, const at::Tensor& w_dw_, const at::Tensor& w_pro_,
         const at::Tensor& bn_weight, const at::Tensor& bn_bias,
         const std::optional<at::Tensor>& keep_, bool training)
      : q(aligned_contiguous(q_)), k(aligned_contiguous(k_)), v(aligned_contiguous(v_)),
        w_exp(acc_copy(w_exp_)),
        w_dw(acc_copy(w_dw_)), w_pro(acc_copy(w_pro_)), gamma(acc_copy(bn_weight)),
        beta(acc_copy(bn_bias)),
        keep(training && keep_.has_value() ? aligned_contiguous(*keep_) : at::Tensor()) {}

  template <typename scalar_t, typename T>
  refiner::Problem<scalar_t, T> problem(const refiner::Dims& d, double scale, double drop_scale,
                                        T* probs) const {
    return {d, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
            v.const_data_ptr<scalar_t>(), static_cast<T>(scale),
            keep.defined() ? keep.const_data_ptr<bool>() : nullptr, static_cast<T>(drop_scale),
            {w_exp.const_data_ptr<T>(), w_dw.const_data_ptr<T>(), w_pro.const_data_ptr<T>(),
             gamma.const_data_ptr<T>(), beta.const_data_ptr<T>()},
            probs, refiner::tile_rows(d)};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
refined_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& w_exp, const at::Tensor& w_dw, const at::Tensor& w_pro,
                      const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                      const at::Tensor& running_mean, const at::Tensor& running_var,
                      const std::optional<at::Tensor>& keep, at::ArrayRef<double> eps,
                      double scale, double drop_scale, bool training, bool save_probs,
                      c10::string_view export_kind) {
  const ExportKind kind = parse_refiner_export(export_kind);
  const refiner::Dims d =
      check_args(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, eps, scale, drop_scale);
  check_running_stats(running_mean, running_var, d, q);
  const auto acc = acc_dtype(q.scalar_type());
  const Inputs in(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, training);
  auto out = at::empty_like(in.q, at::MemoryFormat::Contiguous);
  auto probs = (training || save_probs) ? at::empty({d.B, d.H, d.N, d.N}, q.options().dtype(acc))
                                        : at::empty({0}, q.options().dtype(acc));
  // Y for the backward (training only): one map more between forward and backward, the whole
  // refinement chain less in the backward's first pass (our choice; extra memory stays P + Y).
  auto y = training ? at::empty({d.B, d.H, d.N, d.N}, q.options().dtype(acc))
                    : at::empty({0}, q.options().dtype(acc));
  // Every entry is written by the pass that forms A* (export_maps); none: an empty placeholder.
  auto maps = at::empty(maps_shape(q, kind), q.options());
  std::vector<double> mean = to_doubles(running_mean), var = to_doubles(running_var);
  const std::vector<double> eps_v(eps.begin(), eps.end());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "refined_attention_fwd", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto p = in.problem<scalar_t, T>(d, scale, drop_scale,
                                           probs.numel() ? probs.data_ptr<T>() : nullptr);
    const refiner::MapsOut<scalar_t> maps_out{
        kind, kind == ExportKind::None ? nullptr : maps.data_ptr<scalar_t>()};
    refiner::forward_impl(p, training, mean, var, eps_v, out.data_ptr<scalar_t>(),
                          y.numel() ? y.data_ptr<T>() : nullptr, maps_out);
  });
  auto stats_opts = q.options().dtype(at::kDouble);
  auto mean_t = at::tensor(mean, stats_opts).to(acc), var_t = at::tensor(var, stats_opts).to(acc);
  return {out, probs, y, mean_t, var_t, maps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
refined_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& w_exp, const at::Tensor& w_dw,
                      const at::Tensor& w_pro, const at::Tensor& bn_weight,
                      const at::Tensor& bn_bias, const at::Tensor& probs, const at::Tensor& y,
                      const at::Tensor& mean, const at::Tensor& var,
                      const std::optional<at::Tensor>& keep,
                      at::ArrayRef<double> eps, double scale, double drop_scale, bool training,
                      const std::optional<at::Tensor>& dmaps, c10::string_view export_kind) {
  const ExportKind kind = parse_refiner_export(export_kind);
  const refiner::Dims d =
      check_args(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, eps, scale, drop_scale);
  const auto acc = acc_dtype(q.scalar_type());
  check_like(dout, "dout", q.sizes(), q.scalar_type());
  at::Tensor dmaps_c;
  if (dmaps.has_value()) {
    TORCH_CHECK_VALUE(kind != ExportKind::None,
                      "dmaps was given but export is 'none' (no maps were exported); pass "
                      "dmaps=None or the export the forward used");
    check_like(*dmaps, "dmaps", maps_shape(q, kind), q.scalar_type());
    dmaps_c = aligned_contiguous(*dmaps);
  }
  // An eval-mode forward that did not save P (save_probs = false): recompute it here.
  TORCH_CHECK_VALUE(probs.numel() > 0 || !training,
                    "probs must be the (B, H, N, N) P saved by a training-mode forward; got shape ",
                    probs.sizes());
  const at::Tensor probs_full =
      probs.numel() > 0
          ? probs
          : at::softmax(at::matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale, -1);
  check_like(probs_full, "probs", {d.B, d.H, d.N, d.N}, acc);
  if (y.numel() > 0) check_like(y, "y", {d.B, d.H, d.N, d.N}, acc);
  check_like(mean, "mean", {2 * d.C + 2 * d.H}, acc);
  check_like(var, "var", {2 * d.C + 2 * d.H}, acc);
  const Inputs in(q, k, v, w_exp, w_dw, w_pro, bn_weight, bn_bias, keep, training);
  const auto dout_c = aligned_contiguous(dout), probs_c = aligned_contiguous(probs_full);
  const auto y_c = y.numel() > 0 ? aligned_contiguous(y) : y;
  auto dq = at::empty_like(in.q, at::MemoryFormat::Contiguous);
  auto dk = at::empty_like(in.k, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(in.v, at::MemoryFormat::Contiguous);
  auto dwe = at::empty_like(in.w_exp), dwd = at::empty_like(in.w_dw), dwp = at::empty_like(in.w_pro);
  auto dgamma = at::empty_like(in.gamma), dbeta = at::empty_like(in.beta);
  const std::vector<double> mean_v = to_doubles(mean), var_v = to_doubles(var);
  const std::vector<double> eps_v(eps.begin(), eps.end());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "refined_attention_bwd", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto p = in.problem<scalar_t, T>(d, scale, drop_scale,
                                           const_cast<T*>(probs_c.const_data_ptr<T>()));
    const refiner::KeptMap<T> dattn(d.B * d.H * d.N * d.N);  // dA*, B1 to B3
    const refiner::Grads<scalar_t, T> g{
        dout_c.const_data_ptr<scalar_t>(), dattn.data(), dq.data_ptr<scalar_t>(),
        dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), dwe.data_ptr<T>(), dwd.data_ptr<T>(),
        dwp.data_ptr<T>(), dgamma.data_ptr<T>(), dbeta.data_ptr<T>(),
        dmaps_c.defined() ? dmaps_c.const_data_ptr<scalar_t>() : nullptr, kind};
    refiner::backward_impl(p, g, /*frozen=*/!training, mean_v, var_v, eps_v,
                           y_c.numel() > 0 ? y_c.const_data_ptr<T>() : nullptr);
  });
  const auto dt = q.scalar_type();
  return {dq, dk, dv, dwe.to(dt), dwd.to(dt), dwp.to(dt), dgamma.to(dt), dbeta.to(dt)};
}

TORCH_LIBRARY_IMPL(fastattnreg, CPU, m) {
  m.impl("refined_attention_fwd", &refined_attention_fwd);
  m.impl("refined_attention_bwd", &refined_attention_bwd);
}

}  // namespace fastattnreg::cpu
