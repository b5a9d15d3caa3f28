// A minimal test harness for the C++ unit tests (no gtest here): EXPECT* check macros that count
// failures (not named CHECK: c10/util/Logging.h already defines a fatal CHECK), named test cases
// that print one line each, and a main() helper whose exit status is non-zero when anything
// failed. A test binary takes an optional substring filter:
//   ./test_attention bwd/float32
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace fastattnreg::test {

struct State {
  int case_failures = 0;   // failed checks in the running case
  int failed_cases = 0;
  int passed_cases = 0;
  int skipped_cases = 0;   // filtered out
  std::string note;        // appended to the case's PASS/FAIL line (e.g. the max error)
};

inline State& state() {
  static State s;
  return s;
}

inline void report_failure(const char* file, int line, const std::string& what) {
  ++state().case_failures;
  std::fprintf(stderr, "    check failed at %s:%d: %s\n", file, line, what.c_str());
}

// Adds to the note printed on the case's result line ("max err 3e-16").
inline void note(const std::string& s) {
  auto& n = state().note;
  if (!n.empty()) n += ", ";
  n += s;
}

template <typename... Args>
std::string str(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

#define EXPECT(cond)                                                                               \
  do {                                                                                             \
    if (!(cond)) ::fastattnreg::test::report_failure(__FILE__, __LINE__, #cond);                   \
  } while (0)

#define EXPECT_MSG(cond, ...)                                                                      \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      ::fastattnreg::test::report_failure(                                                         \
          __FILE__, __LINE__, std::string(#cond) + ": " + ::fastattnreg::test::str(__VA_ARGS__));  \
  } while (0)

// Runs `stmt`, expects a c10::Error whose message contains every one of the given substrings.
#define EXPECT_THROWS_WITH(stmt, ...)                                                              \
  do {                                                                                             \
    bool threw_ = false;                                                                           \
    try {                                                                                          \
      (void)(stmt);                                                                                \
    } catch (const c10::Error& e_) {                                                               \
      threw_ = true;                                                                               \
      const std::string msg_ = e_.what_without_backtrace();                                        \
      for (const std::string& want_ : std::vector<std::string>{__VA_ARGS__})                       \
        EXPECT_MSG(msg_.find(want_) != std::string::npos, "message '", msg_,                       \
                  "' does not contain '", want_, "'");                                             \
    } catch (const std::exception& e_) {                                                           \
      threw_ = true;                                                                               \
      ::fastattnreg::test::report_failure(                                                         \
          __FILE__, __LINE__,                                                                      \
          std::string(#stmt) + " threw a non-c10::Error exception: " + e_.what());                 \
    }                                                                                              \
    if (!threw_)                                                                                   \
      ::fastattnreg::test::report_failure(__FILE__, __LINE__,                                      \
                                          std::string(#stmt) + " did not throw");                  \
  } while (0)

// Runs one named case unless a filter excludes it; prints "PASS name (note, time)" or FAIL.
// An exception escaping the case counts as a failure.
inline void run_case(const std::string& name, const std::function<void()>& body,
                     const std::string& filter) {
  auto& s = state();
  if (!filter.empty() && name.find(filter) == std::string::npos) {
    ++s.skipped_cases;
    return;
  }
  s.case_failures = 0;
  s.note.clear();
  const auto t0 = std::chrono::steady_clock::now();
  try {
    body();
  } catch (const c10::Error& e) {
    report_failure(__FILE__, __LINE__,
                   std::string("unexpected c10::Error: ") + e.what_without_backtrace());
  } catch (const std::exception& e) {
    report_failure(__FILE__, __LINE__, std::string("unexpected exception: ") + e.what());
  }
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const bool ok = s.case_failures == 0;
  (ok ? s.passed_cases : s.failed_cases) += 1;
  std::printf("%s %s (%s%s%.0f ms)\n", ok ? "PASS" : "FAIL", name.c_str(), s.note.c_str(),
              s.note.empty() ? "" : ", ", ms);
  std::fflush(stdout);
  std::fflush(stderr);
}

// Prints the summary line; returns the process exit status.
inline int finish() {
  const auto& s = state();
  std::printf("%d passed, %d failed", s.passed_cases, s.failed_cases);
  if (s.skipped_cases) std::printf(", %d filtered out", s.skipped_cases);
  std::printf("\n");
  if (s.passed_cases + s.failed_cases == 0) {
    std::printf("no test case ran (filter matched nothing)\n");
    return 1;
  }
  return s.failed_cases == 0 ? 0 : 1;
}

// Maximum absolute difference of two tensors, in float64; +inf when either holds NaN where the
// other does not (so NaN never passes a `<=` bound silently).
inline double max_abs_diff(const at::Tensor& actual, const at::Tensor& expected) {
  const auto a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  if (a.numel() == 0) return 0.0;
  const auto d = (a - e).abs();
  if (d.isnan().any().item<bool>()) return std::numeric_limits<double>::infinity();
  return d.max().item<double>();
}

inline std::string sci(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1e", x);
  return buf;
}

inline double max_abs(const at::Tensor& t) {
  return t.numel() == 0 ? 0.0 : t.to(at::kDouble).abs().max().item<double>();
}

// Error of `actual` against `expected`, relative to the larger of max|expected| and 1.
inline double rel_err(const at::Tensor& actual, const at::Tensor& expected) {
  return max_abs_diff(actual, expected) / std::max(max_abs(expected), 1.0);
}

// Shape and dtype equal, then rel_err <= tol. `what` names the tensor in messages.
#define EXPECT_CLOSE(actual, expected, dtype, tol, what)                                           \
  do {                                                                                             \
    const at::Tensor a_ = (actual);                                                                \
    const at::Tensor e_ = (expected);                                                              \
    EXPECT_MSG(a_.sizes() == e_.sizes(), what, ": shape ", a_.sizes(), " != expected ",            \
              e_.sizes());                                                                         \
    EXPECT_MSG(a_.scalar_type() == (dtype), what, ": dtype ", a_.scalar_type(),                    \
              " != expected ", (dtype));                                                           \
    if (a_.sizes() == e_.sizes()) {                                                                \
      const double err_ = ::fastattnreg::test::rel_err(a_, e_);                                    \
      EXPECT_MSG(err_ <= (tol), what, ": relative error ", err_, " > tolerance ", (tol),           \
                " (max|expected| ", ::fastattnreg::test::max_abs(e_), ")");                        \
      ::fastattnreg::test::note(                                                                   \
          ::fastattnreg::test::str(what, " ", ::fastattnreg::test::sci(err_)));                    \
    }                                                                                              \
  } while (0)

}  // namespace fastattnreg::test
