#include "common.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace headprune::ops {

// torch's name of a dtype ("float32", not ATen's "Float"), as Python users and the messages'
// own lists of expected types write it.
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "float64";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The largest finite value of the type `like` is computed in (compute_type).
double compute_max(const at::Tensor& like) {
  return compute_type(like) == at::kDouble ? std::numeric_limits<double>::max()
                                           : static_cast<double>(std::numeric_limits<float>::max());
}

// An accumulator whose elements share memory (an expanded view), refused before the kernel
// runs: ATen refuses its write only after the kernel, or after another accumulator was written.
void check_own_memory(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    ": expected an accumulator whose elements do not share memory, got an expanded view");
}

}  // namespace

void check_defined(const at::Tensor& t, const char* name) {
  // an undefined tensor (C++'s at::Tensor()) reads as 1-D of shape [0] to the checks below
  TORCH_CHECK_VALUE(t.defined(), name, ": expected a tensor, got an undefined one (at::Tensor())");
}

void check_defined(const std::optional<at::Tensor>& t, const char* name) {
  TORCH_CHECK_VALUE(!t.has_value() || t->defined(), name,
                    ": got an undefined tensor; pass no mask (std::nullopt, None) for none");
}

at::Tensor new_rows(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(1), like.size(2), 4}, like.options().dtype(at::kDouble));
}

void check_probs(const at::Tensor& probs, double eps) {
  check_defined(probs, "probs");
  TORCH_CHECK_VALUE(probs.dim() == 4, "probs: expected a 4-D tensor [B, H, Q, K], got ", probs.dim(), "-D with shape ",
                    probs.sizes());
  TORCH_CHECK_TYPE(is_supported_float(probs.scalar_type()),
                   "probs: expected float16, bfloat16, float32 or float64, got ", dtype_name(probs.scalar_type()));
  TORCH_CHECK_VALUE(probs.size(3) >= 1, "probs: expected at least one key (K >= 1), got shape ", probs.sizes());
  // eps is added in the compute type: beyond its range it would be inf, and p log(p + inf)
  // an infinite entropy blamed on probs. Within it, p log(p + eps) stays finite for p <= 1.
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps: expected a finite value >= 0, got ", eps);
  TORCH_CHECK_VALUE(eps <= compute_max(probs), "eps: expected a finite value >= 0 and at most ", compute_max(probs),
                    " (", dtype_name(compute_type(probs)), ", the type ", dtype_name(probs.scalar_type()),
                    " probs are computed in), got ", eps);
}

void check_qk(const at::Tensor& query, const at::Tensor& key, double scale) {
  check_defined(query, "query");
  check_defined(key, "key");
  TORCH_CHECK_VALUE(query.dim() == 4, "query: expected a 4-D tensor [B, Hq, Q, D], got ", query.dim(),
                    "-D with shape ", query.sizes());
  TORCH_CHECK_VALUE(key.dim() == 4, "key: expected a 4-D tensor [B, Hkv, K, D], got ", key.dim(), "-D with shape ",
                    key.sizes());
  TORCH_CHECK_TYPE(is_supported_float(query.scalar_type()),
                   "query: expected float16, bfloat16, float32 or float64, got ", dtype_name(query.scalar_type()));
  TORCH_CHECK_TYPE(key.scalar_type() == query.scalar_type(), "key: expected the dtype of query (",
                   dtype_name(query.scalar_type()), "), got ", dtype_name(key.scalar_type()));
  TORCH_CHECK_VALUE(key.device() == query.device(), "key: expected the device of query (", query.device(), "), got ",
                    key.device());
  TORCH_CHECK_VALUE(key.size(0) == query.size(0), "key: batch size ", key.size(0), " does not match query's ",
                    query.size(0));
  TORCH_CHECK_VALUE(key.size(3) == query.size(3), "key: head_dim ", key.size(3), " does not match query's ",
                    query.size(3));
  TORCH_CHECK_VALUE(key.size(1) >= 1 && query.size(1) % key.size(1) == 0, "key: query heads (", query.size(1),
                    ") must be a multiple of key heads (", key.size(1), ") for grouped-query attention");
  TORCH_CHECK_VALUE(key.size(2) >= 1, "key: expected at least one key (K >= 1), got shape ", key.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  // Logits are scaled in the compute type, which must hold scale itself.
  TORCH_CHECK_VALUE(std::abs(scale) <= compute_max(query), "scale: expected a finite number of magnitude at most ",
                    compute_max(query), " (", dtype_name(compute_type(query)), ", the type ",
                    dtype_name(query.scalar_type()), " query and key are computed in), got ", scale);
}

void check_value(const at::Tensor& value, const at::Tensor& key) {
  check_defined(value, "value");
  TORCH_CHECK_VALUE(value.dim() == 4, "value: expected a 4-D tensor [B, Hkv, K, Dv], got ", value.dim(),
                    "-D with shape ", value.sizes());
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), "value: expected the dtype of query and key (",
                   dtype_name(key.scalar_type()), "), got ", dtype_name(value.scalar_type()));
  TORCH_CHECK_VALUE(value.device() == key.device(), "value: expected the device of query (", key.device(), "), got ",
                    value.device());
  TORCH_CHECK_VALUE(value.size(0) == key.size(0) && value.size(1) == key.size(1) && value.size(2) == key.size(2),
                    "value: expected [B, Hkv, K] = [", key.size(0), ", ", key.size(1), ", ", key.size(2),
                    "] like key, got shape ", value.sizes());
  TORCH_CHECK_VALUE(value.size(3) >= 1, "value: expected a head_dim >= 1, got shape ", value.sizes());
}

void check_query_mask(const std::optional<at::Tensor>& query_mask, const at::Tensor& like, int64_t q_len) {
  check_defined(query_mask, "query_mask");
  if (!query_mask.has_value()) return;
  const at::Tensor& m = *query_mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "query_mask: expected a bool tensor [B, Q], got ", dtype_name(m.scalar_type()));
  TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == like.size(0) && m.size(1) == q_len, "query_mask: expected shape [",
                    like.size(0), ", ", q_len, "], got ", m.sizes());
  TORCH_CHECK_VALUE(m.device() == like.device(), "query_mask: expected device ", like.device(), ", got ", m.device());
}

void check_writable(const at::Tensor& t, const char* name) {
  // checked before the kernel runs: the dispatcher refuses such a write only after it is done
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), name,
                    ": an inference tensor (made under torch.inference_mode()) cannot be updated outside inference "
                    "mode; make it outside inference mode, or call the op inside it");
}

void check_sums_counts(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& like, int64_t heads) {
  check_defined(sums, "sums");
  check_defined(counts, "counts");
  check_writable(sums, "sums");
  check_writable(counts, "counts");
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kDouble, "sums: expected a float64 accumulator, got ",
                   dtype_name(sums.scalar_type()));
  TORCH_CHECK_VALUE(sums.dim() == 1 && sums.size(0) == heads, "sums: expected shape [", heads, "], got ",
                    sums.sizes());
  TORCH_CHECK_VALUE(sums.device() == like.device(), "sums: expected device ", like.device(), ", got ", sums.device());
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "counts: expected an int64 accumulator, got ",
                   dtype_name(counts.scalar_type()));
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == heads, "counts: expected shape [", heads, "], got ",
                    counts.sizes());
  TORCH_CHECK_VALUE(counts.device() == like.device(), "counts: expected device ", like.device(), ", got ",
                    counts.device());
  check_own_memory(sums, "sums");
  check_own_memory(counts, "counts");
  const auto shared = at::get_overlap_status(sums, counts);
  TORCH_CHECK_VALUE(shared != at::MemOverlapStatus::Full && shared != at::MemOverlapStatus::Partial,
                    "counts: expected an accumulator apart from sums, got one that shares memory with it");
}

void check_stats(const at::Tensor& stats, const at::Tensor& like, int64_t heads) {
  check_defined(stats, "stats");
  check_writable(stats, "stats");
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kDouble, "stats: expected a float64 accumulator, got ",
                   dtype_name(stats.scalar_type()));
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == heads && stats.size(1) == kNumStats,
                    "stats: expected shape [", heads, ", ", kNumStats, "], got ", stats.sizes());
  TORCH_CHECK_VALUE(stats.device() == like.device(), "stats: expected device ", like.device(), ", got ",
                    stats.device());
  check_own_memory(stats, "stats");
}

std::optional<at::Tensor> expand_attn_mask(
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& query, const at::Tensor& key,
    at::ScalarType compute) {
  check_defined(attn_mask, "attn_mask");
  if (!attn_mask.has_value()) return std::nullopt;
  at::Tensor m = *attn_mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || is_supported_float(m.scalar_type()),
                   "attn_mask: expected a bool or floating mask, got ", dtype_name(m.scalar_type()));
  TORCH_CHECK_VALUE(m.device() == query.device(), "attn_mask: expected device ", query.device(), ", got ",
                    m.device());
  const std::vector<int64_t> target{query.size(0), query.size(1), query.size(2), key.size(2)};
  TORCH_CHECK_VALUE(m.dim() <= 4 && at::is_expandable_to(m.sizes(), target), "attn_mask: shape ", m.sizes(),
                    " is not broadcastable to [B, Hq, Q, K] = ", at::IntArrayRef(target));
  // The CPU kernels read a float mask of any type block by block (a converted copy would be
  // O(Q * K), twice a half-precision mask's size); the CUDA kernel reads the math's type.
  if (m.scalar_type() != at::kBool && m.scalar_type() != compute && !m.device().is_cpu()) m = m.to(compute);
  return m.expand(target);
}

void check_no_negative_rows(const at::Tensor& rows, const at::Tensor& probs) {
  if (!rows.select(-1, 1).lt(0).any().item<bool>()) return;
  // Only on the way to an error: the first negative entry in index order, for the message.
  const at::Tensor index = at::nonzero(probs.lt(0)).select(0, 0).cpu();
  const auto i = index.accessor<int64_t, 1>();
  const double value = probs[i[0]][i[1]][i[2]][i[3]].item<double>();
  TORCH_CHECK_VALUE(false, "probs: expected probabilities >= 0, got ", value, " at [", i[0], ", ", i[1], ", ", i[2],
                    ", ", i[3], "]; nothing was accumulated");
}

at::Tensor reduce_rows(const at::Tensor& rows, const std::optional<at::Tensor>& query_mask, const char* op,
                       const char* inputs) {
  const at::Tensor H = rows.select(-1, 0);
  const at::Tensor n = rows.select(-1, 1);
  at::Tensor valid = n.gt(0);
  if (query_mask.has_value()) valid = valid.logical_and(query_mask->unsqueeze(1));
  const bool finite = at::isfinite(H).logical_or(valid.logical_not()).all().item<bool>();
  TORCH_CHECK_VALUE(finite, op, ": the inputs produce NaN or infinite entropies (NaN/inf in ",
                    inputs, "); nothing was accumulated");
  const at::Tensor zero = at::zeros({}, rows.options());
  const at::Tensor norm = at::where(n.ge(2), H / at::log(n.clamp_min(2)), zero);
  const at::Tensor cols = at::stack({valid.to(at::kDouble), H, H * H, norm, rows.select(-1, 2), rows.select(-1, 3)}, -1);
  return at::where(valid.unsqueeze(-1), cols, zero).sum(at::IntArrayRef{0, 2});
}

void add_to_sums_counts(at::Tensor& sums, at::Tensor& counts, const at::Tensor& stats) {
  sums.add_(stats.select(1, 1));
  counts.add_(stats.select(1, 0).round().to(at::kLong));
}

}  // namespace headprune::ops
