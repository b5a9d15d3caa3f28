// Unit tests of the CPU attention kernels (csrc/cpu/attention.cpp) against plain ATen math in
// float64, with libtorch autograd for the gradients:
//   S = scale q k^T, P = softmax(S), out = P v, lse = logsumexp(S),
//   maps: full = P, head_mean = P.mean over heads, cls = P[:, :, 0, :].
// Run by ctest (CMakeLists.txt); `test_attention <substring>` runs the matching cases only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "cpu/attention.h"

namespace {

using fastattnreg::test::note;
using fastattnreg::test::sci;
using fastattnreg::test::str;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

struct Shape {
  int64_t B, H, N, D;
  double scale;  // NaN: the usual D^-0.5
  double get_scale() const { return std::isnan(scale) ? 1.0 / std::sqrt(double(D)) : scale; }
  std::string name() const {
    return str("B", B, "H", H, "N", N, "D", D, std::isnan(scale) ? "" : str("s", scale));
  }
};

constexpr double kDefault = std::numeric_limits<double>::quiet_NaN();

// N = 1, 17, 197 and the multi-block path (N > ~286 splits queries into several blocks, so dK and
// dV accumulate over blocks and "cls" lives in block 0 only); D = 16, 48, 80; B*H > 1 mostly.
const std::vector<Shape> kShapes = {
    {1, 1, 1, 16, kDefault},  {2, 3, 1, 48, kDefault},    {2, 3, 17, 48, kDefault},
    {1, 2, 17, 80, kDefault}, {3, 1, 17, 16, 1.0},        {2, 2, 197, 16, kDefault},
    {1, 3, 197, 80, kDefault}, {2, 2, 197, 48, 0.37},     {1, 2, 577, 48, kDefault},
    {2, 1, 1025, 16, kDefault},
};
const std::vector<Shape> kShapesBf16 = {
    {2, 3, 17, 48, kDefault}, {1, 3, 197, 80, kDefault}, {1, 2, 577, 48, kDefault}};

const std::vector<std::string> kExports = {"none", "full", "head_mean", "cls"};

at::ScalarType lse_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

double tolerance(at::ScalarType t) { return t == at::kDouble ? 1e-10 : 1e-5; }

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "float64";
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

std::vector<int64_t> maps_shape(const Shape& s, const std::string& kind) {
  if (kind == "full") return {s.B, s.H, s.N, s.N};
  if (kind == "head_mean") return {s.B, s.N, s.N};
  if (kind == "cls") return {s.B, s.H, s.N};
  return {0};
}

Tensor randn(at::IntArrayRef shape, at::ScalarType dtype) {
  return at::randn(shape, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

struct Inputs {
  Tensor q, k, v;
};

Inputs make_inputs(const Shape& s, at::ScalarType dtype) {
  return {randn({s.B, s.H, s.N, s.D}, dtype), randn({s.B, s.H, s.N, s.D}, dtype),
          randn({s.B, s.H, s.N, s.D}, dtype)};
}

struct Ref {
  Tensor out, lse, maps, dq, dk, dv;
};

// The reference in `dtype` (float64 for the truth; the input dtype for the bf16 error budget).
// Gradients are those of sum(out*dout) + sum(lse*dlse) + sum(maps*dmaps) by autograd.
Ref reference(const Inputs& in, double scale, const std::string& kind, at::ScalarType dtype,
              const OptTensor& dout = {}, const OptTensor& dlse = {},
              const OptTensor& dmaps = {}) {
  auto leaf = [&](const Tensor& t) { return t.detach().to(dtype).requires_grad_(true); };
  Tensor q = leaf(in.q), k = leaf(in.k), v = leaf(in.v);
  Tensor s = at::matmul(q, k.transpose(-2, -1)) * scale;
  Tensor p = at::softmax(s, -1);
  Tensor out = at::matmul(p, v);
  Tensor lse = at::logsumexp(s, {-1});
  Tensor maps;
  if (kind == "full") {
    maps = p;
  } else if (kind == "head_mean") {
    maps = p.mean(1);
  } else if (kind == "cls") {
    maps = p.select(2, 0);
  } else {
    maps = at::empty({0}, q.options());
  }
  Ref r{out.detach(), lse.detach(), maps.detach(), {}, {}, {}};
  Tensor loss;
  auto add = [&](const Tensor& term) { loss = loss.defined() ? loss + term : term; };
  if (dout) add((out * dout->to(dtype)).sum());
  if (dlse) add((lse * dlse->to(dtype)).sum());
  if (dmaps) add((maps * dmaps->to(dtype)).sum());
  if (loss.defined()) {
    loss.backward();
    auto grad = [](const Tensor& t) {
      return t.grad().defined() ? t.grad().detach() : at::zeros_like(t).detach();
    };
    r.dq = grad(q);
    r.dk = grad(k);
    r.dv = grad(v);
  }
  return r;
}

// ------------------------------------------------------------------------------------------
// Forward

void check_forward(const Shape& s, at::ScalarType dtype, const std::string& kind) {
  const Inputs in = make_inputs(s, dtype);
  const double scale = s.get_scale();
  auto [out, lse, maps] = fastattnreg::cpu::attention_fwd(in.q, in.k, in.v, std::nullopt, std::nullopt, scale, kind, 0.0);
  const Ref r = reference(in, scale, kind, at::kDouble);
  const double tol = tolerance(dtype);
  EXPECT_CLOSE(out, r.out, dtype, tol, "out");
  EXPECT_CLOSE(lse, r.lse, lse_dtype(dtype), tol, "lse");
  EXPECT_MSG(maps.sizes() == at::IntArrayRef(maps_shape(s, kind)), "maps shape ", maps.sizes());
  if (kind != "none") {
    EXPECT_CLOSE(maps, r.maps, dtype, tol, "maps");
    // Exact probabilities: rows of "full" / "head_mean" and "cls" rows sum to 1.
    const auto row_sums = maps.to(at::kDouble).sum(-1);
    EXPECT_MSG(fastattnreg::test::max_abs_diff(row_sums, at::ones_like(row_sums)) <= 10 * tol,
              "map rows do not sum to 1");
  }
}

// ------------------------------------------------------------------------------------------
// Backward

struct GradCase {
  std::string name;
  std::string kind;  // export
  bool dout, dlse, dmaps;
};

const std::vector<GradCase> kGradCases = {
    {"dout", "none", true, false, false},
    {"dout+dlse", "none", true, true, false},
    {"dlse", "none", false, true, false},
    {"dout/export=full-no-dmaps", "full", true, false, false},
    {"dout+dmaps/full", "full", true, false, true},
    {"dmaps/full", "full", false, false, true},
    {"dout+dlse+dmaps/full", "full", true, true, true},
    {"dout+dmaps/head_mean", "head_mean", true, false, true},
    {"dmaps/head_mean", "head_mean", false, false, true},
    {"dout+dlse+dmaps/head_mean", "head_mean", true, true, true},
    {"dout+dmaps/cls", "cls", true, false, true},
    {"dmaps/cls", "cls", false, false, true},
    {"dout+dlse+dmaps/cls", "cls", true, true, true},
};

struct GradInputs {
  OptTensor dout, dlse, dmaps;
};

GradInputs make_grads(const Shape& s, at::ScalarType dtype, const GradCase& c) {
  GradInputs g;
  if (c.dout) g.dout = randn({s.B, s.H, s.N, s.D}, dtype);
  if (c.dlse) g.dlse = randn({s.B, s.H, s.N}, lse_dtype(dtype));
  if (c.dmaps) g.dmaps = randn(maps_shape(s, c.kind), dtype);
  return g;
}

void check_backward(const Shape& s, at::ScalarType dtype, const GradCase& c) {
  const Inputs in = make_inputs(s, dtype);
  const GradInputs g = make_grads(s, dtype, c);
  const double scale = s.get_scale();
  auto [out, lse, maps] = fastattnreg::cpu::attention_fwd(in.q, in.k, in.v, std::nullopt, std::nullopt, scale, c.kind, 0.0);
  auto [dq, dk, dv, dmask] = fastattnreg::cpu::attention_bwd(g.dout, in.q, in.k, in.v, out, lse, g.dlse,
                                                      g.dmaps, std::nullopt, std::nullopt, scale, c.kind, 0.0, false);
  const Ref r = reference(in, scale, c.kind, at::kDouble, g.dout, g.dlse, g.dmaps);
  const double tol = tolerance(dtype);
  EXPECT_CLOSE(dq, r.dq, dtype, tol, "dq");
  EXPECT_CLOSE(dk, r.dk, dtype, tol, "dk");
  EXPECT_CLOSE(dv, r.dv, dtype, tol, "dv");
}

// ------------------------------------------------------------------------------------------
// bfloat16: the kernel's error against the float64 truth must stay within twice the error of
// the same reference run in bfloat16 (FlashAttention's rule), plus a small floor.

void check_bf16_within(const Tensor& actual, const Tensor& truth, const Tensor& ref_low,
                       const char* what) {
  const double err = fastattnreg::test::max_abs_diff(actual, truth);
  const double ref_err = fastattnreg::test::max_abs_diff(ref_low, truth);
  const double bound = 2 * ref_err + 1e-3 * std::max(fastattnreg::test::max_abs(truth), 1.0);
  EXPECT_MSG(err <= bound, what, ": bf16 error ", err, " > bound ", bound,
            " (bf16 reference error ", ref_err, ")");
  note(str(what, " ", sci(err), "/", sci(ref_err)));
}

void check_bf16(const Shape& s, const GradCase& c) {
  const auto dtype = at::kBFloat16;
  const Inputs in = make_inputs(s, dtype);
  const GradInputs g = make_grads(s, dtype, c);
  const double scale = s.get_scale();
  auto [out, lse, maps] = fastattnreg::cpu::attention_fwd(in.q, in.k, in.v, std::nullopt, std::nullopt, scale, c.kind, 0.0);
  EXPECT(out.scalar_type() == dtype);
  EXPECT(lse.scalar_type() == at::kFloat);
  EXPECT(maps.scalar_type() == dtype);
  auto [dq, dk, dv, dmask] = fastattnreg::cpu::attention_bwd(g.dout, in.q, in.k, in.v, out, lse, g.dlse,
                                                      g.dmaps, std::nullopt, std::nullopt, scale, c.kind, 0.0, false);
  EXPECT(dq.scalar_type() == dtype && dk.scalar_type() == dtype && dv.scalar_type() == dtype);
  const Ref truth = reference(in, scale, c.kind, at::kDouble, g.dout, g.dlse, g.dmaps);
  const Ref low = reference(in, scale, c.kind, dtype, g.dout, g.dlse, g.dmaps);
  check_bf16_within(out, truth.out, low.out, "out");
  check_bf16_within(lse, truth.lse, low.lse, "lse");
  if (c.kind != "none") check_bf16_within(maps, truth.maps, low.maps, "maps");
  check_bf16_within(dq, truth.dq, low.dq, "dq");
  check_bf16_within(dk, truth.dk, low.dk, "dk");
  check_bf16_within(dv, truth.dv, low.dv, "dv");
}

// ------------------------------------------------------------------------------------------
// Layout, repeatability, the dispatcher

void check_non_contiguous() {
  // (B, N, H, D) storage viewed as (B, H, N, D), as a fused qkv projection produces it.
  const Shape s{2, 3, 17, 48, kDefault};
  auto view = [&] { return randn({s.B, s.N, s.H, s.D}, at::kDouble).transpose(1, 2); };
  const Inputs in{view(), view(), view()};
  EXPECT(!in.q.is_contiguous());
  const OptTensor dout = view(), dmaps = randn({s.B, s.N, s.N}, at::kDouble).transpose(1, 2);
  const OptTensor dlse = randn({s.B, s.N, s.H}, at::kDouble).transpose(1, 2);
  const double scale = s.get_scale();
  auto [out, lse, maps] = fastattnreg::cpu::attention_fwd(in.q, in.k, in.v, std::nullopt, std::nullopt, scale, "head_mean", 0.0);
  auto [dq, dk, dv, dmask] = fastattnreg::cpu::attention_bwd(dout, in.q, in.k, in.v, out, lse, dlse,
                                                      dmaps, std::nullopt, std::nullopt, scale, "head_mean", 0.0, false);
  const Ref r = reference(in, scale, "head_mean", at::kDouble, dout, dlse, dmaps);
  EXPECT_CLOSE(out, r.out, at::kDouble, 1e-10, "out");
  EXPECT_CLOSE(lse, r.lse, at::kDouble, 1e-10, "lse");
  EXPECT_CLOSE(maps, r.maps, at::kDouble, 1e-10, "maps");
  EXPECT_CLOSE(dq, r.dq, at::kDouble, 1e-10, "dq");
  EXPECT_CLOSE(dk, r.dk, at::kDouble, 1e-10, "dk");
  EXPECT_CLOSE(dv, r.dv, at::kDouble, 1e-10, "dv");
}

void check_repeatable(at::ScalarType dtype, const std::string& kind) {
  const Shape s{2, 3, 577, 48, kDefault};
  const Inputs in = make_inputs(s, dtype);
  const GradInputs g = make_grads(s, dtype, {"", kind, true, true, kind != "none"});
  const double scale = s.get_scale();
  auto run = [&] {
    auto [out, lse, maps] = fastattnreg::cpu::attention_fwd(in.q, in.k, in.v, std::nullopt, std::nullopt, scale, kind, 0.0);
    auto [dq, dk, dv, dmask] = fastattnreg::cpu::attention_bwd(g.dout, in.q, in.k, in.v, out, lse,
                                                        g.dlse, g.dmaps, std::nullopt, std::nullopt, scale, kind, 0.0, false);
    return std::vector<Tensor>{out, lse, maps, dq, dk, dv};
  };
  const auto a = run(), b = run();
  const char* names[] = {"out", "lse", "maps", "dq", "dk", "dv"};
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_MSG(at::equal(a[i], b[i]), names[i], " differs between two identical runs");
}

using FwdFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                 const OptTensor&, const OptTensor&, double,
                                                 c10::string_view, double);
using BwdFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double,
    c10::string_view, double, bool);

void check_dispatcher() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto fwd_handle = dispatcher.findSchemaOrThrow("fastattnreg::attention_fwd", "");
  const auto bwd_handle = dispatcher.findSchemaOrThrow("fastattnreg::attention_bwd", "");
  EXPECT(fwd_handle.hasKernelForDispatchKey(c10::DispatchKey::CPU));
  EXPECT(bwd_handle.hasKernelForDispatchKey(c10::DispatchKey::CPU));
  const auto fwd = fwd_handle.typed<FwdFn>();
  const auto bwd = bwd_handle.typed<BwdFn>();

  const Shape s{2, 3, 17, 48, kDefault};
  const Inputs in = make_inputs(s, at::kFloat);
  const double scale = s.get_scale();
  const OptTensor dout = randn({s.B, s.H, s.N, s.D}, at::kFloat);
  const OptTensor dmaps = randn({s.B, s.H, s.N}, at::kFloat);
  auto [out, lse, maps] = fwd.call(in.q, in.k, in.v, std::nullopt, std::nullopt, scale, "cls", 0.0);
  auto [dq, dk, dv, dmask] = bwd.call(dout, in.q, in.k, in.v, out, lse, std::nullopt, dmaps,
                                      std::nullopt, std::nullopt, scale, "cls", 0.0, false);
  // The dispatcher reaches the same kernel: bitwise equal to the direct call.
  auto [out2, lse2, maps2] = fastattnreg::cpu::attention_fwd(in.q, in.k, in.v, std::nullopt, std::nullopt, scale, "cls", 0.0);
  auto [dq2, dk2, dv2, dmask2] = fastattnreg::cpu::attention_bwd(dout, in.q, in.k, in.v, out, lse,
                                                         std::nullopt, dmaps, std::nullopt, std::nullopt, scale, "cls", 0.0, false);
  EXPECT(at::equal(out, out2) && at::equal(lse, lse2) && at::equal(maps, maps2));
  EXPECT(at::equal(dq, dq2) && at::equal(dk, dk2) && at::equal(dv, dv2));
  const Ref r = reference(in, scale, "cls", at::kDouble, dout, std::nullopt, dmaps);
  EXPECT_CLOSE(maps, r.maps, at::kFloat, 1e-5, "maps");
  EXPECT_CLOSE(dq, r.dq, at::kFloat, 1e-5, "dq");
  // Errors come back through the dispatcher as c10::Error too.
  EXPECT_THROWS_WITH(fwd.call(in.q, in.k, in.v, std::nullopt, std::nullopt, scale, "rows", 0.0),
                     "export", "rows");
}

// ------------------------------------------------------------------------------------------
// Bad input: c10::Error (ValueError) naming the argument, the value and the limit.

void check_bad_input() {
  // The unmasked, dropout-free forms of the two entry points.
  auto attention_fwd = [](const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                          c10::string_view kind) {
    return fastattnreg::cpu::attention_fwd(q, k, v, std::nullopt, std::nullopt, scale, kind, 0.0);
  };
  auto attention_bwd = [](const OptTensor& dout, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& out, const Tensor& lse,
                          const OptTensor& dlse, const OptTensor& dmaps, double scale,
                          c10::string_view kind) {
    return fastattnreg::cpu::attention_bwd(dout, q, k, v, out, lse, dlse, dmaps, std::nullopt,
                                           std::nullopt, scale, kind, 0.0, false);
  };
  const auto f32 = at::kFloat;
  const Tensor q = randn({2, 3, 17, 16}, f32), k = randn({2, 3, 17, 16}, f32),
               v = randn({2, 3, 17, 16}, f32);
  const double sc = 0.25;

  EXPECT_THROWS_WITH(attention_fwd(randn({2, 17, 16}, f32), k, v, sc, "none"), "q must be 4-D",
                    "3-D");
  EXPECT_THROWS_WITH(attention_fwd(q, randn({2, 3, 16}, f32), v, sc, "none"), "k must be 4-D");
  EXPECT_THROWS_WITH(attention_fwd(q, randn({2, 3, 18, 16}, f32), v, sc, "none"), "k must have",
                    "[2, 3, 17, 16]", "[2, 3, 18, 16]");
  EXPECT_THROWS_WITH(attention_fwd(q, k, randn({2, 3, 17, 8}, f32), sc, "none"), "v must have",
                    "[2, 3, 17, 8]");
  EXPECT_THROWS_WITH(attention_fwd(q, k.to(at::kDouble), v, sc, "none"), "dtype");
  EXPECT_THROWS_WITH(
      attention_fwd(q.to(at::kHalf), k.to(at::kHalf), v.to(at::kHalf), sc, "none"), "q dtype",
      "Half");
  const Tensor big = randn({1, 1, 4, 300}, f32);
  EXPECT_THROWS_WITH(attention_fwd(big, big, big, sc, "none"), "head dim", "300", "256");
  EXPECT_THROWS_WITH(attention_fwd(q, k, v, sc, "maps"), "export", "'maps'");
  EXPECT_THROWS_WITH(attention_fwd(q, k, v, std::nan(""), "none"), "scale");
  const Tensor empty = randn({0, 3, 17, 16}, f32);
  EXPECT_THROWS_WITH(attention_fwd(empty, empty, empty, sc, "none"), "batch");

  // Backward: the saved tensors and incoming gradients are checked too.
  auto [out, lse, maps] = attention_fwd(q, k, v, sc, "full");
  const OptTensor dout = randn({2, 3, 17, 16}, f32);
  EXPECT_THROWS_WITH(attention_bwd(dout, q, k, v, out, lse.to(at::kDouble), std::nullopt,
                                  std::nullopt, sc, "none"),
                    "lse");
  EXPECT_THROWS_WITH(attention_bwd(dout, q, k, v, out, lse.select(2, 0), std::nullopt,
                                  std::nullopt, sc, "none"),
                    "lse must have shape");
  EXPECT_THROWS_WITH(attention_bwd(randn({2, 3, 16, 16}, f32), q, k, v, out, lse, std::nullopt,
                                  std::nullopt, sc, "none"),
                    "dout");
  EXPECT_THROWS_WITH(attention_bwd(dout, q, k, v, out, lse, randn({2, 3, 16}, f32), std::nullopt,
                                  sc, "none"),
                    "dlse");
  EXPECT_THROWS_WITH(
      attention_bwd(dout, q, k, v, out, lse, std::nullopt, maps, sc, "none"), "dmaps", "none");
  EXPECT_THROWS_WITH(attention_bwd(dout, q, k, v, out, lse, std::nullopt,
                                  randn({2, 17, 17}, f32), sc, "full"),
                    "dmaps must have shape");
  EXPECT_THROWS_WITH(attention_bwd(dout, q, k, v, out, lse, std::nullopt, std::nullopt, sc, "x"),
                    "export");

  // The errors are ValueErrors (Python raises ValueError for them).
  try {
    attention_fwd(q, k, v, sc, "maps");
  } catch (const c10::ValueError&) {
  } catch (const c10::Error& e) {
    EXPECT_MSG(false, "expected c10::ValueError, got another c10::Error: ",
              e.what_without_backtrace());
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  using fastattnreg::test::run_case;
  at::manual_seed(0);
  std::printf("at::get_num_threads() = %d\n", at::get_num_threads());

  for (auto dtype : {at::kDouble, at::kFloat})
    for (const auto& s : kShapes)
      for (const auto& kind : kExports)
        run_case(str("fwd/", dtype_name(dtype), "/", s.name(), "/export=", kind),
                 [&] { check_forward(s, dtype, kind); }, filter);

  for (auto dtype : {at::kDouble, at::kFloat})
    for (const auto& s : kShapes)
      for (const auto& c : kGradCases)
        run_case(str("bwd/", dtype_name(dtype), "/", s.name(), "/", c.name),
                 [&] { check_backward(s, dtype, c); }, filter);

  for (const auto& s : kShapesBf16)
    for (const auto& c : {kGradCases[0], kGradCases[6], kGradCases[9], kGradCases[12]})
      run_case(str("bf16/", s.name(), "/", c.name), [&] { check_bf16(s, c); }, filter);

  run_case("non_contiguous/float64", check_non_contiguous, filter);
  for (auto dtype : {at::kDouble, at::kFloat, at::kBFloat16})
    for (const auto& kind : {"none", "head_mean", "cls"})
      run_case(str("repeatable/", dtype_name(dtype), "/export=", kind),
               [&] { check_repeatable(dtype, kind); }, filter);
  run_case("dispatcher", check_dispatcher, filter);
  run_case("bad_input", check_bad_input, filter);
  return fastattnreg::test::finish();
}
