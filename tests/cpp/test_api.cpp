// The library as a C++ service sees it: ops registered with the dispatcher on load, calls
// routed by the dispatcher, build record, argument errors that name the argument.
#include <ATen/core/dispatch/Dispatcher.h>
#include <headprune/headprune.h>
#include <torch/headeronly/version.h>

#include <limits>
#include <string>

#include "check.h"

namespace {

const char* const kOps[] = {"headprune::entropy_from_probs_accumulate_", "headprune::entropy_stats_from_probs_accumulate_",
                            "headprune::entropy_from_qk_accumulate_", "headprune::entropy_stats_from_qk_accumulate_",
                            "headprune::attention_stats_accumulate_", "headprune::apply_head_mask_"};

}  // namespace

HP_TEST(ops_are_registered_on_load) {
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const char* name : kOps) {
    const auto op = dispatcher.findSchema({name, ""});
    if (!op.has_value()) hp_test::fail(__FILE__, __LINE__, std::string("no schema for ") + name);
    const bool composite = std::string(name) == "headprune::apply_head_mask_";
    const auto key = composite ? c10::DispatchKey::CompositeImplicitAutograd : c10::DispatchKey::CPU;
    if (!op->hasKernelForDispatchKey(key)) hp_test::fail(__FILE__, __LINE__, std::string("no kernel for ") + name);
  }
}

HP_TEST(calls_go_through_the_dispatcher) {
  // No Meta kernel is registered in C++: the dispatcher, not a direct CPU call, must refuse it.
  at::Tensor stats = at::zeros({2, headprune::kNumStats}, at::TensorOptions().dtype(at::kDouble).device(at::kMeta));
  const at::Tensor q = at::empty({1, 2, 3, 4}, at::TensorOptions().device(at::kMeta));
  bool refused = false;
  try {
    headprune::entropy_stats_from_qk_accumulate_(stats, q, q, 1.0);
  } catch (const c10::Error& e) {
    refused = std::string(e.what_without_backtrace()).find("Meta") != std::string::npos;
  }
  HP_CHECK(refused);
}

HP_TEST(build_info_matches_this_build) {
  const headprune::BuildInfo info = headprune::build_info();
  HP_CHECK(info.torch_version == TORCH_VERSION);
  HP_CHECK(info.version.size() >= 5);
  HP_CHECK(info.cpu_isas.rfind("DEFAULT", 0) == 0);
  HP_CHECK(info.cpu_isas.find(headprune::cpu_isa()) != std::string::npos);
  HP_CHECK(info.cxx11_abi == static_cast<bool>(_GLIBCXX_USE_CXX11_ABI));
  std::printf("  build: headprune %s, torch %s, cuda %d, isas %s, running %s\n", info.version.c_str(),
              info.torch_version.c_str(), info.with_cuda, info.cpu_isas.c_str(), headprune::cpu_isa().c_str());
}

HP_TEST(probs_errors_name_the_argument) {
  at::Tensor sums = at::zeros({2}, at::kDouble);
  at::Tensor counts = at::zeros({2}, at::kLong);
  const at::Tensor p = at::softmax(at::randn({1, 2, 3, 4}), -1);
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, counts, p[0]), "probs");
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, counts, p.to(at::kInt)), "probs");
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, counts, p, std::nullopt, -1.0), "eps");
  at::Tensor sums_f32 = at::zeros({2});
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums_f32, counts, p), "sums");
  at::Tensor counts3 = at::zeros({3}, at::kLong);
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, counts3, p), "counts");
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, counts, p, at::ones({1, 3})), "query_mask");
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, counts, p, at::ones({1, 4}, at::kBool)), "query_mask");
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, counts, p, std::nullopt, 1e300), "eps");
  HP_CHECK_THROWS(headprune::entropy_from_probs_accumulate_(sums, counts, p.mul(-1)),
                  "probs: expected probabilities >= 0");
  at::Tensor stats = at::zeros({2, 5}, at::kDouble);
  HP_CHECK_THROWS(headprune::entropy_stats_from_probs_accumulate_(stats, p), "stats");
  HP_CHECK(sums.eq(0).all().item<bool>() && counts.eq(0).all().item<bool>());
}

HP_TEST(qk_errors_name_the_argument) {
  at::Tensor stats = at::zeros({4, headprune::kNumStats}, at::kDouble);
  const at::Tensor q = at::randn({2, 4, 3, 8});
  const at::Tensor k = at::randn({2, 2, 5, 8});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q[0], k, 1.0), "query");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k.narrow(1, 0, 1).repeat({1, 3, 1, 1}), 1.0),
                  "key");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k.to(at::kDouble), 1.0), "key");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k.narrow(3, 0, 4), 1.0), "key");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k, nan), "scale");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k, 1e300), "scale");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k, 1.0, at::ones({3, 3}, at::kBool)),
                  "attn_mask");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k, 1.0, at::ones({2, 1, 1, 5}, at::kInt)),
                  "attn_mask");
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k, 1.0, std::nullopt, false,
                                                                 at::ones({2, 5}, at::kBool)),
                  "query_mask");
  at::Tensor sums = at::zeros({4}, at::kDouble);
  at::Tensor counts = at::zeros({4}, at::kInt);
  HP_CHECK_THROWS(headprune::entropy_from_qk_accumulate_(sums, counts, q, k, 1.0), "counts");
  HP_CHECK(stats.eq(0).all().item<bool>());
}

HP_TEST(requires_grad_is_refused_under_grad_mode) {
  // The ops' Autograd kernel: not differentiable, so an input that requires grad is named
  // while grad mode is on; under a NoGradGuard the same call runs.
  at::Tensor stats = at::zeros({4, headprune::kNumStats}, at::kDouble);
  const at::Tensor q = at::randn({2, 4, 3, 8}).requires_grad_(true);
  const at::Tensor k = at::randn({2, 2, 5, 8});
  HP_CHECK_THROWS(headprune::entropy_stats_from_qk_accumulate_(stats, q, k, 1.0), "query: requires grad");
  HP_CHECK(stats.eq(0).all().item<bool>());
  {
    const at::NoGradGuard no_grad;
    headprune::entropy_stats_from_qk_accumulate_(stats, q, k, 1.0);
  }
  HP_CHECK(stats.select(1, 0).eq(2 * 3).all().item<bool>());
}

int main(int argc, char** argv) { return hp_test::run_all(argc, argv); }
