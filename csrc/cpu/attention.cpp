// The attention ops' CPU entry points: argument checks, output allocation, dtype dispatch into
// the kernels of attention_kernels.h, and their registration for the CPU dispatch key.
#include "attention.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "attention_kernels.h"

namespace fastattnreg::cpu {
namespace {

using kernels::backward_impl;
using kernels::Dims;
using kernels::forward_impl;

// Shape of the exported maps for q of shape (B, H, N, D).
std::vector<int64_t> maps_shape(const at::Tensor& q, ExportKind kind) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  switch (kind) {
    case ExportKind::Full: return {B, H, N, N};
    case ExportKind::HeadMean: return {B, N, N};
    case ExportKind::Cls: return {B, H, N};
    default: return {0};
  }
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const std::optional<at::Tensor>& attn_mask,
                                                             const std::optional<at::Tensor>& rng,
                                                             double scale,
                                                             c10::string_view export_kind,
                                                             double dropout_p) {
  check_qkv_cpu(q, k, v);
  TORCH_CHECK(!attn_mask.has_value() && dropout_p == 0.0 && !rng.has_value(),
              "attn_mask and dropout are not implemented in the C++ kernels yet");
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number; got ", scale);
  const ExportKind kind = parse_export(export_kind);
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  auto out = at::empty_like(qc, at::MemoryFormat::Contiguous);
  auto lse = at::empty({d.B, d.H, d.N}, q.options().dtype(acc_dtype(q.scalar_type())));
  auto maps = at::empty(maps_shape(q, kind), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_impl<scalar_t, acc_t>(qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
                                  vc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                  lse.data_ptr<acc_t>(), maps.data_ptr<scalar_t>(), d,
                                  static_cast<acc_t>(scale), kind);
  });
  return {out, lse, maps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const std::optional<at::Tensor>& dout, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& dlse, const std::optional<at::Tensor>& dmaps,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& rng, double scale,
    c10::string_view export_kind, double dropout_p, bool mask_grad) {
  check_qkv_cpu(q, k, v);
  TORCH_CHECK(!attn_mask.has_value() && dropout_p == 0.0 && !rng.has_value(),
              "attn_mask and dropout are not implemented in the C++ kernels yet");
  check_like(out, "out", q.sizes(), q.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number; got ", scale);
  const ExportKind kind = parse_export(export_kind);
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  const auto acc = acc_dtype(q.scalar_type());
  check_like(lse, "lse", {d.B, d.H, d.N}, acc);
  at::Tensor dout_c, dlse_c, dmaps_c;
  if (dout.has_value()) {
    check_like(*dout, "dout", q.sizes(), q.scalar_type());
    dout_c = dout->contiguous();
  }
  if (dlse.has_value()) {
    check_like(*dlse, "dlse", {d.B, d.H, d.N}, acc);
    dlse_c = dlse->contiguous();
  }
  if (dmaps.has_value()) {
    TORCH_CHECK_VALUE(kind != ExportKind::None, "dmaps was given but export is 'none'");
    check_like(*dmaps, "dmaps", maps_shape(q, kind), q.scalar_type());
    dmaps_c = dmaps->contiguous();
  }
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto lse_c = lse.contiguous(), out_c = out.contiguous();
  auto dq = at::empty_like(qc, at::MemoryFormat::Contiguous);
  auto dk = at::empty_like(kc, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(vc, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t, acc_t>(
        dout_c.defined() ? dout_c.const_data_ptr<scalar_t>() : nullptr,
        qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
        vc.const_data_ptr<scalar_t>(), out_c.const_data_ptr<scalar_t>(),
        lse_c.const_data_ptr<acc_t>(),
        dlse_c.defined() ? dlse_c.const_data_ptr<acc_t>() : nullptr,
        dmaps_c.defined() ? dmaps_c.const_data_ptr<scalar_t>() : nullptr, dq.data_ptr<scalar_t>(),
        dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), d, static_cast<acc_t>(scale), kind);
  });
  return {dq, dk, dv, at::empty({0}, q.options())};
}

TORCH_LIBRARY_IMPL(fastattnreg, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace fastattnreg::cpu
