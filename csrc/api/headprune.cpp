// The public C++ API (include/headprune/headprune.h): thin calls through the dispatcher, and
// the EntropyAccumulator that mirrors python/headprune/accumulator.py.
#include "headprune/headprune.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <limits>

#include "../ops/common.h"
#include "../ops/cpu/entropy_rows.h"

#ifndef HEADPRUNE_VERSION
#define HEADPRUNE_VERSION "unknown"
#endif
#ifndef HEADPRUNE_TORCH_VERSION
#define HEADPRUNE_TORCH_VERSION "unknown"
#endif

namespace headprune {
namespace {

// The typed handle of op `name` whose C++ signature is Fn (checked against the schema once).
template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

void entropy_from_probs_accumulate_(at::Tensor& sums, at::Tensor& counts, const at::Tensor& probs,
                                    const std::optional<at::Tensor>& query_mask, double eps) {
  static const auto op =
      find_op<decltype(entropy_from_probs_accumulate_)>("headprune::entropy_from_probs_accumulate_");
  op.call(sums, counts, probs, query_mask, eps);
}

void entropy_stats_from_probs_accumulate_(at::Tensor& stats, const at::Tensor& probs,
                                          const std::optional<at::Tensor>& query_mask, double eps) {
  static const auto op =
      find_op<decltype(entropy_stats_from_probs_accumulate_)>("headprune::entropy_stats_from_probs_accumulate_");
  op.call(stats, probs, query_mask, eps);
}

void entropy_from_qk_accumulate_(at::Tensor& sums, at::Tensor& counts, const at::Tensor& query, const at::Tensor& key,
                                 double scale, const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                 const std::optional<at::Tensor>& query_mask) {
  static const auto op = find_op<decltype(entropy_from_qk_accumulate_)>("headprune::entropy_from_qk_accumulate_");
  op.call(sums, counts, query, key, scale, attn_mask, is_causal, query_mask);
}

void entropy_stats_from_qk_accumulate_(at::Tensor& stats, const at::Tensor& query, const at::Tensor& key, double scale,
                                       const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                       const std::optional<at::Tensor>& query_mask) {
  static const auto op =
      find_op<decltype(entropy_stats_from_qk_accumulate_)>("headprune::entropy_stats_from_qk_accumulate_");
  op.call(stats, query, key, scale, attn_mask, is_causal, query_mask);
}

at::Tensor attention_stats_accumulate_(at::Tensor& stats, const at::Tensor& query, const at::Tensor& key,
                                       const at::Tensor& value, double scale,
                                       const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                       const std::optional<at::Tensor>& query_mask) {
  static const auto op =
      find_op<decltype(attention_stats_accumulate_)>("headprune::attention_stats_accumulate_");
  return op.call(stats, query, key, value, scale, attn_mask, is_causal, query_mask);
}

void apply_head_mask_(at::Tensor& x, const at::Tensor& mask, int64_t head_dim, int64_t dim) {
  static const auto op = find_op<decltype(apply_head_mask_)>("headprune::apply_head_mask_");
  op.call(x, mask, head_dim, dim);
}

// ---------------------------------------------------------------------- EntropyAccumulator

EntropyAccumulator::EntropyAccumulator(int64_t num_heads, c10::Device device) {
  TORCH_CHECK_VALUE(num_heads >= 1, "num_heads: expected a positive number of heads, got ", num_heads);
  stats_ = at::zeros({num_heads, kNumStats}, at::TensorOptions().dtype(at::kDouble).device(device));
}

namespace {
// The accumulator's head count against an input's (dim 1 of a [B, H, Q, ...] tensor), named
// after the input rather than after the op's `stats` argument the caller never passed.
void check_heads(const at::Tensor& t, const char* name, int64_t heads) {
  TORCH_CHECK_VALUE(!t.defined() || t.dim() != 4 || t.size(1) == heads, name, ": expected ", heads,
                    " heads (dim 1) for this accumulator of ", heads, " heads, got shape ", t.sizes());
}
}  // namespace

EntropyAccumulator& EntropyAccumulator::entropy_stats_from_probs(const at::Tensor& probs,
                                                                 const std::optional<at::Tensor>& query_mask,
                                                                 double eps) {
  check_heads(probs, "probs", num_heads());
  entropy_stats_from_probs_accumulate_(stats_, probs, query_mask, eps);
  return *this;
}

EntropyAccumulator& EntropyAccumulator::entropy_stats_from_qk(const at::Tensor& query, const at::Tensor& key,
                                                              double scale, const std::optional<at::Tensor>& attn_mask,
                                                              bool is_causal,
                                                              const std::optional<at::Tensor>& query_mask) {
  check_heads(query, "query", num_heads());
  entropy_stats_from_qk_accumulate_(stats_, query, key, scale, attn_mask, is_causal, query_mask);
  return *this;
}

at::Tensor EntropyAccumulator::attention_stats(const at::Tensor& query, const at::Tensor& key,
                                               const at::Tensor& value, double scale,
                                               const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                               const std::optional<at::Tensor>& query_mask) {
  check_heads(query, "query", num_heads());
  return attention_stats_accumulate_(stats_, query, key, value, scale, attn_mask, is_causal, query_mask);
}

EntropyAccumulator& EntropyAccumulator::merge(const EntropyAccumulator& other) {
  TORCH_CHECK_VALUE(other.num_heads() == num_heads(), "other: expected ", num_heads(), " heads, got ",
                    other.num_heads());
  stats_.add_(other.stats_.to(stats_.device()));
  return *this;
}

void EntropyAccumulator::reset() { stats_.zero_(); }

at::Tensor EntropyAccumulator::count() const {
  return stats_.select(1, static_cast<int64_t>(Stat::count)).round().to(at::kLong);
}

at::Tensor EntropyAccumulator::column_mean(Stat column) const {
  const at::Tensor c = stats_.select(1, static_cast<int64_t>(Stat::count));
  const at::Tensor nan = at::full({}, std::numeric_limits<double>::quiet_NaN(), c.options());
  return at::where(c.gt(0), stats_.select(1, static_cast<int64_t>(column)) / c.clamp_min(1), nan);
}

at::Tensor EntropyAccumulator::mean() const { return column_mean(Stat::sum); }

at::Tensor EntropyAccumulator::std() const {
  // E[H^2] - E[H]^2, with a difference below what the float64 sums resolve (summing `count`
  // squares rounds E[H^2] by up to count * eps of itself) reported as 0; NaN stays NaN
  const at::Tensor m = mean();
  const at::Tensor sq = column_mean(Stat::sum_sq);
  const at::Tensor var = sq - m * m;
  const at::Tensor resolution =
      stats_.select(1, static_cast<int64_t>(Stat::count)).clamp_min(1) * std::numeric_limits<double>::epsilon() * sq.abs();
  return at::where(var.le(resolution), at::zeros_like(var), var).sqrt();
}

at::Tensor EntropyAccumulator::normalized_mean() const { return column_mean(Stat::sum_norm); }
at::Tensor EntropyAccumulator::first_mass_mean() const { return column_mean(Stat::sum_first); }
at::Tensor EntropyAccumulator::rest_mean() const { return column_mean(Stat::sum_rest); }

void EntropyAccumulator::load_stats(const at::Tensor& stats) {
  TORCH_CHECK_VALUE(stats.defined(), "stats: expected a tensor [", num_heads(), ", ", kNumStats, "], got an undefined one");
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == num_heads() && stats.size(1) == kNumStats,
                    "stats: expected shape [", num_heads(), ", ", kNumStats, "], got ", stats.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(stats.scalar_type()), "stats: expected a floating tensor, got ",
                   ops::dtype_name(stats.scalar_type()));
  const at::Tensor s = stats.to(stats_.device(), at::kDouble);
  TORCH_CHECK_VALUE(at::isfinite(s).all().item<bool>(), "stats: expected finite values");
  TORCH_CHECK_VALUE(s.select(1, static_cast<int64_t>(Stat::count)).ge(0).all().item<bool>(),
                    "stats: expected non-negative counts (column 0)");
  stats_.copy_(s);
}

// --------------------------------------------------------------------------- build record

BuildInfo build_info() {
  BuildInfo info;
  info.version = HEADPRUNE_VERSION;
  info.torch_version = HEADPRUNE_TORCH_VERSION;
#ifdef HEADPRUNE_WITH_CUDA
  info.with_cuda = true;
#else
  info.with_cuda = false;
#endif
#if defined(_GLIBCXX_USE_CXX11_ABI)
  info.cxx11_abi = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#else
  info.cxx11_abi = false;  // not libstdc++
#endif
  info.cpu_isas = cpu::compiled_isas();
  return info;
}

std::string cpu_isa() { return cpu::row_kernels().isa; }

namespace detail {
int link_anchor() { return 0; }
}  // namespace detail

}  // namespace headprune
