// Argument checks and the device-independent reduction shared by every backend.
//
// Each entropy op runs in two stages: a backend "row kernel" writes, for every attention row,
// {H, n, p_first, H_rest} (float64, [B, H, Q, 4]; see kernels/online_entropy.h), then
// reduce_rows() masks and sums them per head with ATen ops. The row buffer is O(B*H*Q), never
// O(Q*K), and the fixed reduction order makes chunked and one-shot accumulation agree.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "headprune/schema.h"

namespace headprune::ops {

using headprune::kNumStats;

// The type the kernels compute in: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType compute_type(const at::Tensor& like) {
  return like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// torch's name of a dtype ("float32", not ATen's "Float"), for messages.
const char* dtype_name(at::ScalarType t);

// An uninitialised row buffer [B, H, Q, 4] (float64) for the rows of `like` [B, H, Q, ...].
at::Tensor new_rows(const at::Tensor& like);

// a named refusal of an undefined tensor (and of an optional holding one)
void check_defined(const at::Tensor& t, const char* name);
void check_defined(const std::optional<at::Tensor>& t, const char* name);
void check_probs(const at::Tensor& probs, double eps);
void check_qk(const at::Tensor& query, const at::Tensor& key, double scale);
// value [B, Hkv, K, Dv] matching key (dtype, device, B, Hkv, K).
void check_value(const at::Tensor& value, const at::Tensor& key);
void check_query_mask(const std::optional<at::Tensor>& query_mask, const at::Tensor& like, int64_t q_len);
// an accumulator or output the op writes in place: refused if it cannot be written here
void check_writable(const at::Tensor& t, const char* name);
void check_sums_counts(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& like, int64_t heads);
void check_stats(const at::Tensor& stats, const at::Tensor& like, int64_t heads);

// attn_mask broadcast (as a view) to [B, Hq, Q, K]; float masks are converted to `compute`.
std::optional<at::Tensor> expand_attn_mask(
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& query, const at::Tensor& key,
    at::ScalarType compute);

// Raises, naming the first negative entry of probs, if a row kernel marked a row of `rows`
// as holding a negative probability (n = -1; see kernels::mark_negative_probs).
void check_no_negative_rows(const at::Tensor& rows, const at::Tensor& probs);

// Per-head statistics [H, kNumStats] (float64) of the valid rows of `rows` [B, H, Q, 4].
// Raises if a valid row is not finite (NaN/inf inputs), before anything is accumulated.
at::Tensor reduce_rows(const at::Tensor& rows, const std::optional<at::Tensor>& query_mask, const char* op,
                       const char* inputs);

void add_to_sums_counts(at::Tensor& sums, at::Tensor& counts, const at::Tensor& stats);

}  // namespace headprune::ops
