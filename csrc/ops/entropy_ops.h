// The five entropy ops, written once over a backend's row kernels and registered per
// dispatch key by cpu/entropy_kernel.cpp and cuda/entropy_kernel.cu:
//
//   struct Backend {
//     static void probs_rows(const at::Tensor& probs, double eps, at::Tensor& rows);
//     static void qk_rows(const at::Tensor& q, const at::Tensor& k, double scale,
//                         const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows);
//     // softmax(...) @ value in query's dtype, with the rows of qk_rows; attn_mask is the
//     // caller's mask as given, mask the expanded view qk_rows takes.
//     static at::Tensor attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
//                                      double scale, const std::optional<at::Tensor>& attn_mask,
//                                      const std::optional<at::Tensor>& mask, bool is_causal,
//                                      at::Tensor& rows);
//   };
//
// rows is a contiguous float64 [B, H, Q, 4] of per-row {H, n, p_first, H_rest}. Every check
// and the finiteness test run before anything is added, so a failed call leaves the
// accumulators untouched.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

namespace headprune::ops {

template <typename Backend>
struct EntropyOps {
  static at::Tensor probs_stats(const at::Tensor& probs, const std::optional<at::Tensor>& query_mask, double eps,
                                const char* op) {
    at::Tensor rows = new_rows(probs);
    Backend::probs_rows(probs, eps, rows);
    check_no_negative_rows(rows, probs);
    return reduce_rows(rows, query_mask, op, "probs");
  }

  static at::Tensor qk_stats(const at::Tensor& query, const at::Tensor& key, double scale,
                             const std::optional<at::Tensor>& attn_mask, bool is_causal,
                             const std::optional<at::Tensor>& query_mask, const char* op) {
    const auto mask = expand_attn_mask(attn_mask, query, key, compute_type(query));
    at::Tensor rows = new_rows(query);
    Backend::qk_rows(query, key, scale, mask, is_causal, rows);
    return reduce_rows(rows, query_mask, op, "query/key/attn_mask");
  }

  static void from_probs(at::Tensor& sums, at::Tensor& counts, const at::Tensor& probs,
                         const std::optional<at::Tensor>& query_mask, double eps) {
    check_probs(probs, eps);
    check_sums_counts(sums, counts, probs, probs.size(1));
    check_query_mask(query_mask, probs, probs.size(2));
    add_to_sums_counts(sums, counts, probs_stats(probs, query_mask, eps, "entropy_from_probs_accumulate_"));
  }

  static void stats_from_probs(at::Tensor& stats, const at::Tensor& probs, const std::optional<at::Tensor>& query_mask,
                               double eps) {
    check_probs(probs, eps);
    check_stats(stats, probs, probs.size(1));
    check_query_mask(query_mask, probs, probs.size(2));
    stats.add_(probs_stats(probs, query_mask, eps, "entropy_stats_from_probs_accumulate_"));
  }

  static void from_qk(at::Tensor& sums, at::Tensor& counts, const at::Tensor& query, const at::Tensor& key,
                      double scale, const std::optional<at::Tensor>& attn_mask, bool is_causal,
                      const std::optional<at::Tensor>& query_mask) {
    check_qk(query, key, scale);
    check_sums_counts(sums, counts, query, query.size(1));
    check_query_mask(query_mask, query, query.size(2));
    add_to_sums_counts(sums, counts,
                       qk_stats(query, key, scale, attn_mask, is_causal, query_mask, "entropy_from_qk_accumulate_"));
  }

  static void stats_from_qk(at::Tensor& stats, const at::Tensor& query, const at::Tensor& key, double scale,
                            const std::optional<at::Tensor>& attn_mask, bool is_causal,
                            const std::optional<at::Tensor>& query_mask) {
    check_qk(query, key, scale);
    check_stats(stats, query, query.size(1));
    check_query_mask(query_mask, query, query.size(2));
    stats.add_(qk_stats(query, key, scale, attn_mask, is_causal, query_mask, "entropy_stats_from_qk_accumulate_"));
  }

  static at::Tensor attention_stats(at::Tensor& stats, const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, double scale, const std::optional<at::Tensor>& attn_mask,
                                    bool is_causal, const std::optional<at::Tensor>& query_mask) {
    check_qk(query, key, scale);
    check_value(value, key);
    check_stats(stats, query, query.size(1));
    check_query_mask(query_mask, query, query.size(2));
    const auto mask = expand_attn_mask(attn_mask, query, key, compute_type(query));
    at::Tensor rows = new_rows(query);
    at::Tensor out = Backend::attention_rows(query, key, value, scale, attn_mask, mask, is_causal, rows);
    stats.add_(reduce_rows(rows, query_mask, "attention_stats_accumulate_", "query/key/attn_mask"));
    return out;
  }

  static void register_impls(torch::Library& m) {
    m.impl("attention_stats_accumulate_", &attention_stats);
    m.impl("entropy_from_probs_accumulate_", &from_probs);
    m.impl("entropy_stats_from_probs_accumulate_", &stats_from_probs);
    m.impl("entropy_from_qk_accumulate_", &from_qk);
    m.impl("entropy_stats_from_qk_accumulate_", &stats_from_qk);
  }
};

}  // namespace headprune::ops
