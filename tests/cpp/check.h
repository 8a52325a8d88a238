// A tiny self-contained test harness (no GoogleTest to download or install): HP_TEST cases
// register themselves, HP_CHECK* report file:line and keep going to the next case, and
// hp_test::run_all() returns the number of failed cases (ctest reads the exit code).
//
//   HP_TEST(name) { HP_CHECK(cond); HP_CHECK_CLOSE(actual, expected, rtol, atol);
//                   HP_CHECK_THROWS(statement, "substring of the c10::Error message"); }
//   int main(int argc, char** argv) { return hp_test::run_all(argc, argv); }  // argv[1]: filter
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace hp_test {

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const char* file, int line, const std::string& what) {
  std::ostringstream s;
  s << file << ":" << line << ": " << what;
  throw Failure(s.str());
}

// Max over elements of |a - e| - (atol + rtol |e|) > 0 fails; NaNs must match.
inline void check_close(const at::Tensor& actual, const at::Tensor& expected, double rtol, double atol,
                        const char* expr, const char* file, int line) {
  if (actual.sizes() != expected.sizes()) {
    std::ostringstream s;
    s << expr << ": shape " << actual.sizes() << " != expected " << expected.sizes();
    fail(file, line, s.str());
  }
  const at::Tensor a = actual.detach().to(at::kCPU, at::kDouble);
  const at::Tensor e = expected.detach().to(at::kCPU, at::kDouble);
  const at::Tensor nan_ok = at::isnan(a).eq(at::isnan(e)).all();
  const at::Tensor excess = ((a - e).abs() - (atol + rtol * e.abs())).nan_to_num(0.0);
  if (!nan_ok.item<bool>() || excess.max().item<double>() > 0) {
    std::ostringstream s;
    s << expr << ": not close (rtol " << rtol << ", atol " << atol << "), max |diff| "
      << (a - e).abs().nan_to_num(0.0).max().item<double>() << "\nactual:\n" << a << "\nexpected:\n" << e;
    fail(file, line, s.str());
  }
}

inline int run_all(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : "";
  int failed = 0, ran = 0;
  for (const Case& c : registry()) {
    if (std::strstr(c.name, filter) == nullptr) continue;
    ++ran;
    try {
      c.fn();
      std::printf("[ ok ] %s\n", c.name);
    } catch (const Failure& f) {
      ++failed;
      std::printf("[FAIL] %s\n  %s\n", c.name, f.what());
    } catch (const std::exception& ex) {
      ++failed;
      std::printf("[FAIL] %s\n  unexpected exception: %s\n", c.name, ex.what());
    }
  }
  std::printf("%d/%d passed\n", ran - failed, ran);
  return ran == 0 ? 1 : failed;
}

}  // namespace hp_test

#define HP_TEST(name)                                              \
  static void name();                                              \
  static const ::hp_test::Register name##_registered(#name, &name); \
  static void name()

#define HP_CHECK(cond)                                                               \
  do {                                                                               \
    if (!(cond)) ::hp_test::fail(__FILE__, __LINE__, "HP_CHECK(" #cond ") failed"); \
  } while (0)

#define HP_CHECK_CLOSE(actual, expected, rtol, atol) \
  ::hp_test::check_close((actual), (expected), (rtol), (atol), #actual " vs " #expected, __FILE__, __LINE__)

#define HP_CHECK_EQUAL(actual, expected) \
  ::hp_test::check_close((actual), (expected), 0.0, 0.0, #actual " == " #expected, __FILE__, __LINE__)

// The statement must throw a c10::Error whose message contains `substring` (the argument name).
#define HP_CHECK_THROWS(statement, substring)                                                             \
  do {                                                                                                   \
    bool hp_thrown_ = false;                                                                             \
    try {                                                                                                \
      statement;                                                                                         \
    } catch (const c10::Error& hp_e_) {                                                                  \
      hp_thrown_ = true;                                                                                 \
      const std::string hp_msg_ = hp_e_.what_without_backtrace();                                        \
      if (hp_msg_.find(substring) == std::string::npos)                                                  \
        ::hp_test::fail(__FILE__, __LINE__, "`" #statement "` threw without \"" substring "\": " + hp_msg_); \
    }                                                                                                    \
    if (!hp_thrown_) ::hp_test::fail(__FILE__, __LINE__, "`" #statement "` did not throw a c10::Error");   \
  } while (0)
