// The attention_match ops' CPU entry points: the student's attention and the divergence of its
// attention from a teacher's, in one fused pass (attention_kernels.h with a Teacher; bf16 with an
// every-row teacher on AMX tiles, attention_amx.h), never materialising either model's (B, H, N,
// N) maps. Checks, allocation, dispatch, registration.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "aligned.h"
#include "attention_bf16.h"
#include "attention_kernels.h"
#include "attention_mask.h"
#include "match.h"

namespace fastattnreg::cpu {
namespace {

using kernels::AttentionCall;
using kernels::AttentionExtras;
using kernels::Dims;
using kernels::ForwardTensors;
using kernels::Teacher;

MatchKind parse_kind(c10::string_view s) {
  if (s == "kl") return MatchKind::KL;
  if (s == "mse_probs") return MatchKind::MseProbs;
  if (s == "mse_logits") return MatchKind::MseLogits;
  TORCH_CHECK_VALUE(false, "kind must be one of 'kl', 'mse_probs', 'mse_logits'; got '",
                    std::string(s), "'");
}

bool parse_cls_rows(c10::string_view s) {
  if (s == "all") return false;
  if (s == "cls") return true;
  TORCH_CHECK_VALUE(false, "rows must be 'all' or 'cls'; got '", std::string(s), "'");
}

// Teacher q, k: (B, H, N, Dt) with the student's B, H, N, dtype and device; Dt may differ.
void check_teacher(const at::Tensor& q, const at::Tensor& tq, const at::Tensor& tk, bool cls) {
  check_4d(tq, "teacher_q");
  check_4d(tk, "teacher_k");
  TORCH_CHECK_VALUE(tk.sizes() == tq.sizes(), "teacher_k must have the shape of teacher_q ",
                    tq.sizes(), "; got ", tk.sizes());
  for (int i = 0; i < 3; ++i) {
    static const char* axes[] = {"batch B", "heads H", "tokens N"};
    TORCH_CHECK_VALUE(tq.size(i) == q.size(i), "teacher_q ", axes[i], " must equal the student's ",
                      q.size(i), "; got teacher shape ", tq.sizes(), " and student shape ",
                      q.sizes());
  }
  TORCH_CHECK_VALUE(tq.scalar_type() == q.scalar_type() && tk.scalar_type() == q.scalar_type(),
                    "teacher_q and teacher_k must have the student's dtype ", q.scalar_type(),
                    "; got ", tq.scalar_type(), " and ", tk.scalar_type());
  TORCH_CHECK_VALUE(tq.is_cpu() && tk.is_cpu(), "teacher_q and teacher_k must be CPU tensors");
  TORCH_CHECK_VALUE(tq.size(3) >= 1 && tq.size(3) <= kMaxHeadDimCpu,
                    "teacher head dim must be in [1, ", kMaxHeadDimCpu, "]; got ", tq.size(3));
  TORCH_CHECK_VALUE(!cls || q.size(2) >= 2,
                    "rows='cls' matches query 0 over keys 1..N-1 and needs N >= 2; got N = ",
                    q.size(2));
}

// The checked arguments shared by the forward and the backward.
struct MatchArgs {
  MatchKind kind;
  bool cls_rows;
  at::Tensor mask;
};

MatchArgs match_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& teacher_q, const at::Tensor& teacher_k,
                     const std::optional<at::Tensor>& attn_mask, double scale,
                     double teacher_scale, c10::string_view kind, c10::string_view rows) {
  check_qkv_cpu(q, k, v);
  const MatchKind mk = parse_kind(kind);
  const bool cls = parse_cls_rows(rows);
  check_teacher(q, teacher_q, teacher_k, cls);
  at::Tensor mask = mask_view(attn_mask, q);
  check_scale(scale, q.scalar_type());
  check_scale(teacher_scale, q.scalar_type(), "teacher_scale");
  return {mk, cls, std::move(mask)};
}

}  // namespace

// Returns out (B,H,N,D), lse (B,H,N), teacher_lse (B,H,R) and row_loss (B,H,R), R = N or 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_match_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& teacher_q,
    const at::Tensor& teacher_k, const std::optional<at::Tensor>& attn_mask, double scale,
    double teacher_scale, c10::string_view kind, c10::string_view rows) {
  const MatchArgs args =
      match_args(q, k, v, teacher_q, teacher_k, attn_mask, scale, teacher_scale, kind, rows);
  const auto qc = aligned_contiguous(q), kc = aligned_contiguous(k);
  const auto vc = aligned_contiguous(v);
  const auto tqc = aligned_contiguous(teacher_q), tkc = aligned_contiguous(teacher_k);
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  const int64_t R = args.cls_rows ? 1 : d.N;
  const auto acc_opts = q.options().dtype(acc_dtype(q.scalar_type()));
  auto out = at::empty_like(qc, at::MemoryFormat::Contiguous);
  auto lse = at::empty({d.B, d.H, d.N}, acc_opts);
  auto teacher_lse = at::empty({d.B, d.H, R}, acc_opts);
  auto row_loss = at::empty({d.B, d.H, R}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_match_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Teacher<scalar_t, acc_t> t{tqc.const_data_ptr<scalar_t>(), tkc.const_data_ptr<scalar_t>(),
                               teacher_q.size(3), static_cast<acc_t>(teacher_scale), args.kind,
                               args.cls_rows, teacher_lse.data_ptr<acc_t>(),
                               row_loss.data_ptr<acc_t>(), nullptr};
    const ForwardTensors<scalar_t, acc_t> tensors{
        qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(),      lse.data_ptr<acc_t>(),         nullptr};
    const AttentionExtras<scalar_t> extras{make_mask_view<scalar_t>(args.mask)};
    const AttentionCall<scalar_t, acc_t> call{d, static_cast<acc_t>(scale), ExportKind::None,
                                              extras, &t};
    if (!kernels::forward_bf16(tensors, call)) kernels::forward_impl(tensors, call);
  });
  return {out, lse, teacher_lse, row_loss};
}

// dq, dk, dv from the gradients of out (B,H,N,D), lse (B,H,N) and the per-row losses (B,H,R).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_match_bwd(
    const std::optional<at::Tensor>& dout, const std::optional<at::Tensor>& dlse,
    const std::optional<at::Tensor>& drow_loss,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& teacher_q, const at::Tensor& teacher_k,
    const at::Tensor& teacher_lse, const std::optional<at::Tensor>& attn_mask, double scale,
    double teacher_scale, c10::string_view kind, c10::string_view rows) {
  const MatchArgs args =
      match_args(q, k, v, teacher_q, teacher_k, attn_mask, scale, teacher_scale, kind, rows);
  const Dims d{q.size(0), q.size(1), q.size(2), q.size(3)};
  const int64_t R = args.cls_rows ? 1 : d.N;
  const auto acc = acc_dtype(q.scalar_type());
  check_like(out, "out", q.sizes(), q.scalar_type());
  check_like(lse, "lse", {d.B, d.H, d.N}, acc);
  check_like(teacher_lse, "teacher_lse", {d.B, d.H, R}, acc);
  at::Tensor dout_c, dlse_c, drow_c;
  if (dlse.has_value()) {
    check_like(*dlse, "dlse", {d.B, d.H, d.N}, acc);
    dlse_c = aligned_contiguous(*dlse);
  }
  if (dout.has_value()) {
    check_like(*dout, "dout", q.sizes(), q.scalar_type());
    dout_c = aligned_contiguous(*dout);
  }
  if (drow_loss.has_value()) {
    check_like(*drow_loss, "drow_loss", {d.B, d.H, R}, acc);
    drow_c = aligned_contiguous(*drow_loss);
  }
  const auto qc = aligned_contiguous(q), kc = aligned_contiguous(k);
  const auto vc = aligned_contiguous(v);
  const auto tqc = aligned_contiguous(teacher_q), tkc = aligned_contiguous(teacher_k);
  const auto out_c = aligned_contiguous(out), lse_c = aligned_contiguous(lse);
  const auto tlse_c = aligned_contiguous(teacher_lse);
  auto dq = at::empty_like(qc, at::MemoryFormat::Contiguous);
  auto dk = at::empty_like(kc, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(vc, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "attention_match_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Teacher<scalar_t, acc_t> t{tqc.const_data_ptr<scalar_t>(), tkc.const_data_ptr<scalar_t>(),
                               teacher_q.size(3), static_cast<acc_t>(teacher_scale), args.kind,
                               args.cls_rows, const_cast<acc_t*>(tlse_c.const_data_ptr<acc_t>()),
                               nullptr, kernels::data_or_null<acc_t>(drow_c)};
    const auto tensors = kernels::backward_tensors<scalar_t, acc_t>(
        dout_c, qc, kc, vc, out_c, lse_c, dlse_c, at::Tensor(), dq, dk, dv);
    const AttentionExtras<scalar_t> extras{make_mask_view<scalar_t>(args.mask)};
    const AttentionCall<scalar_t, acc_t> call{d, static_cast<acc_t>(scale), ExportKind::None,
                                              extras, &t};
    if (!kernels::backward_bf16(tensors, call)) kernels::backward_impl(tensors, call);
  });
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(fastattnreg, CPU, m) {
  m.impl("attention_match_fwd", &attention_match_fwd);
  m.impl("attention_match_bwd", &attention_match_bwd);
}

}  // namespace fastattnreg::cpu
