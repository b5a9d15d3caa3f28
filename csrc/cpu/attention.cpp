// The attention ops' CPU entry points: argument checks, output allocation, dtype dispatch into
// the kernels of attention_kernels.h, and their registration for the CPU dispatch key.
#include "attention.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "aligned.h"
#include "attention_bf16.h"
#include "attention_kernels.h"

namespace fastattnreg::cpu {
namespace {

using kernels::AttentionCall;
using kernels::AttentionExtras;
using kernels::backward_impl;
using kernels::Dims;
using kernels::forward_impl;
using kernels::ForwardTensors;

// The dropout stream of a call: p in [0, 1); rng = int64 (seed, offset) when p > 0.
DropoutStream dropout_stream(double p, const std::optional<at::Tensor>& rng) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1); got ", p);
  if (p == 0.0) return {};
  TORCH_CHECK_VALUE(rng.has_value(), "dropout_p = ", p, " needs rng, the (seed, offset) tensor");
  TORCH_CHECK_VALUE(rng->scalar_type() == at::kLong && rng->dim() == 1 && rng->numel() == 2 &&
                        rng->is_cpu(),
                    "rng must be a CPU int64 tensor of shape [2] (seed, offset); got ",
                    rng->scalar_type(), " of shape ", rng->sizes(), " on ", rng->device());
  const at::Tensor r = rng->contiguous();
  const int64_t* sd = r.const_data_ptr<int64_t>();
  return DropoutStream::make(p, sd[0], sd[1]);
}

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
  check_scale(scale, q.scalar_type());
  const ExportKind kind = parse_export(export_kind);
  const at::Tensor mask = mask_view(attn_mask, q);
  const DropoutStream drop = dropout_stream(dropout_p, rng);
  const auto qc = aligned_contiguous(q), kc = aligned_contiguous(k);
  const auto vc = aligned_contiguous(v);
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  auto out = at::empty_like(qc, at::MemoryFormat::Contiguous);
  auto lse = at::empty({d.B, d.H, d.N}, q.options().dtype(acc_dtype(q.scalar_type())));
  auto maps = at::empty(maps_shape(q, kind), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AttentionExtras<scalar_t> extras{make_mask_view<scalar_t>(mask), drop};
    const ForwardTensors<scalar_t, acc_t> t{
        qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(),      lse.data_ptr<acc_t>(),         maps.data_ptr<scalar_t>()};
    const AttentionCall<scalar_t, acc_t> call{d, static_cast<acc_t>(scale), kind, extras, nullptr};
    if (!kernels::forward_bf16(t, call)) forward_impl(t, call);
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
  check_like(out, "out", q.sizes(), q.scalar_type());
  check_scale(scale, q.scalar_type());
  const ExportKind kind = parse_export(export_kind);
  const at::Tensor mask = mask_view(attn_mask, q);
  const DropoutStream drop = dropout_stream(dropout_p, rng);
  TORCH_CHECK_VALUE(!mask_grad || (mask.defined() && mask.scalar_type() != at::kBool),
                    "mask_grad needs a floating attn_mask (a bool mask has no gradient)");
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  const auto acc = acc_dtype(q.scalar_type());
  check_like(lse, "lse", {d.B, d.H, d.N}, acc);
  at::Tensor dout_c, dlse_c, dmaps_c;
  if (dout.has_value()) {
    check_like(*dout, "dout", q.sizes(), q.scalar_type());
    dout_c = aligned_contiguous(*dout);
  }
  if (dlse.has_value()) {
    check_like(*dlse, "dlse", {d.B, d.H, d.N}, acc);
    dlse_c = aligned_contiguous(*dlse);
  }
  if (dmaps.has_value()) {
    TORCH_CHECK_VALUE(kind != ExportKind::None, "dmaps was given but export is 'none'");
    check_like(*dmaps, "dmaps", maps_shape(q, kind), q.scalar_type());
    dmaps_c = aligned_contiguous(*dmaps);
  }
  const auto qc = aligned_contiguous(q), kc = aligned_contiguous(k);
  const auto vc = aligned_contiguous(v);
  const auto lse_c = aligned_contiguous(lse), out_c = aligned_contiguous(out);
  auto dq = at::empty_like(qc, at::MemoryFormat::Contiguous);
  auto dk = at::empty_like(kc, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(vc, at::MemoryFormat::Contiguous);
  // The float mask's gradient over the broadcast (B, H, N, N); summed to its shape by autograd.
  auto dmask = at::empty(mask_grad ? std::vector<int64_t>{d.B, d.H, d.N, d.N}
                                   : std::vector<int64_t>{0},
                         q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AttentionExtras<scalar_t> extras{make_mask_view<scalar_t>(mask), drop,
                                           mask_grad ? dmask.data_ptr<scalar_t>() : nullptr};
    const auto t = kernels::backward_tensors<scalar_t, acc_t>(dout_c, qc, kc, vc, out_c, lse_c,
                                                              dlse_c, dmaps_c, dq, dk, dv);
    const AttentionCall<scalar_t, acc_t> call{d, static_cast<acc_t>(scale), kind, extras, nullptr};
    if (!kernels::backward_bf16(t, call)) backward_impl(t, call);
  });
  return {dq, dk, dv, dmask};
}

TORCH_LIBRARY_IMPL(fastattnreg, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace fastattnreg::cpu
