// The one schema of headprune's statistics, torch-free: included by the kernels, the ops and
// the public API, and mirrored by Python's headprune.core.schema (tests/test_schema.py checks
// that the two agree). Every column is a sum, so accumulators merge by addition.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

namespace headprune {

// Columns of a statistics accumulator [num_heads, kNumStats] (float64), summed over the valid
// query rows of a head's attention. Entropies are in nats.
enum class Stat : int64_t {
  count = 0,      // valid rows
  sum = 1,        // row entropy H
  sum_sq = 2,     // H^2
  sum_norm = 3,   // H / log(n), n = visible keys (rows with n >= 2; 0 otherwise)
  sum_first = 4,  // mass on the row's first visible key (the attention sink)
  sum_rest = 5,   // entropy renormalised over the keys after the first
};
inline constexpr int64_t kNumStats = 6;
inline constexpr std::array<std::string_view, kNumStats> kStatFields{"count",    "sum",       "sum_sq",
                                                                     "sum_norm", "sum_first", "sum_rest"};

// Columns of the output statistics (Python: HeadScores.outputs), per head and dimension of
// its output, i.e. per input column of the output projection.
enum class OutputStat : int64_t {
  count = 0,       // tokens seen
  sum = 1,         // the output value
  sum_sq = 2,      // its square
  count_norm = 3,  // tokens x squared norm of the output-projection column it feeds
};
inline constexpr int64_t kNumOutputStats = 4;
inline constexpr std::array<std::string_view, kNumOutputStats> kOutputFields{"count", "sum", "sum_sq", "count_norm"};

// Per attention row, what the row kernels write ([B, H, Q, kRowFields] float64) before the
// per-head reduction into Stat columns.
enum class RowField : int64_t {
  entropy = 0,       // H
  visible = 1,       // n, the visible keys (0: a fully masked row, skipped)
  first_mass = 2,    // p_first
  rest_entropy = 3,  // H_rest
};
inline constexpr int kRowFields = 4;
inline constexpr std::array<std::string_view, kRowFields> kRowFieldNames{"entropy", "visible", "first_mass",
                                                                         "rest_entropy"};

// Logits at or below this mark a masked key: -inf, and float32's finfo.min that transformers
// adds for masked positions.
constexpr float kMaskedLogit = -1e37f;

// Keys per float partial sum in the row kernels (CPU and CUDA), flushed into float64 after
// each: the inner loops stay in float, and a vector lane adds at most 32 terms (AVX2; 16 on
// AVX-512) before a flush, so even a row of equal terms, whose roundings all go one way,
// stays within 1e-6 relative of float64 however long (2,048 keys gave 1.5e-6 on a uniform row).
constexpr int64_t kFlushKeys = 256;

}  // namespace headprune
