// Public C++ API of headprune for libtorch users (inference services, C++ tools).
//
// Every function calls the registered op through the c10 dispatcher, so a C++ caller gets the
// same device dispatch (CPU, CUDA when built) and the same checks as `torch.ops.headprune.*`
// in Python. Entropies are in nats; accumulators are float64 (counts int64) and only added to.
//
// Link against the CMake target `headprune::headprune` (find_package(headprune)). The op
// registrations live in the same shared library as these functions, so they are loaded with it.
// Do not load this library and the Python extension headprune._C into one process: both
// register the `headprune` op namespace.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "headprune/schema.h"

#if defined(_WIN32)
#if defined(headprune_EXPORTS)  // defined by CMake while building the shared library
#define HEADPRUNE_API __declspec(dllexport)
#else
#define HEADPRUNE_API __declspec(dllimport)
#endif
#else
#define HEADPRUNE_API __attribute__((visibility("default")))
#endif

namespace headprune {

// ------------------------------------------------------------------------------------ ops

// probs [B, H, Q, K] (f16/bf16/f32/f64, any strides): adds, per head, the sum over valid query
// rows of -sum_k p log(p + eps) into sums [H] (f64) and the number of valid rows into counts
// [H] (i64). query_mask [B, Q] bool excludes padded rows; all-zero rows are skipped.
HEADPRUNE_API void entropy_from_probs_accumulate_(at::Tensor& sums, at::Tensor& counts, const at::Tensor& probs,
                                                  const std::optional<at::Tensor>& query_mask = std::nullopt,
                                                  double eps = 1e-8);

// The same rows; adds the six statistics (see Stat) into stats [H, kNumStats] (f64).
HEADPRUNE_API void entropy_stats_from_probs_accumulate_(at::Tensor& stats, const at::Tensor& probs,
                                                        const std::optional<at::Tensor>& query_mask = std::nullopt,
                                                        double eps = 1e-8);

// query [B, Hq, Q, D], key [B, Hkv, K, D] (Hq % Hkv == 0, same float dtype): the entropy of
// softmax(q k^T * scale + attn_mask) per row, streamed over key blocks (never O(Q * K) memory).
// attn_mask: bool (true = attend) or additive float, broadcastable to [B, Hq, Q, K].
// is_causal: row i sees keys j <= i + K - Q. Rows with no visible key are skipped.
HEADPRUNE_API void entropy_from_qk_accumulate_(at::Tensor& sums, at::Tensor& counts, const at::Tensor& query,
                                               const at::Tensor& key, double scale,
                                               const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                               bool is_causal = false,
                                               const std::optional<at::Tensor>& query_mask = std::nullopt);

// The same rows; adds the six statistics into stats [Hq, kNumStats] (f64).
HEADPRUNE_API void entropy_stats_from_qk_accumulate_(at::Tensor& stats, const at::Tensor& query,
                                                     const at::Tensor& key, double scale,
                                                     const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                                     bool is_causal = false,
                                                     const std::optional<at::Tensor>& query_mask = std::nullopt);

// The attention output softmax(q k^T * scale + attn_mask) @ value ([B, Hq, Q, Dv], query's
// dtype; value [B, Hkv, K, Dv]) and, added into stats, the six statistics of its rows: an
// attention call that also measures its heads (one fused pass over the logits on CPU).
HEADPRUNE_API at::Tensor attention_stats_accumulate_(at::Tensor& stats, const at::Tensor& query, const at::Tensor& key,
                                                     const at::Tensor& value, double scale,
                                                     const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                                     bool is_causal = false,
                                                     const std::optional<at::Tensor>& query_mask = std::nullopt);

// In place: the slice of head h along dim of x (x.size(dim) == num_heads * head_dim, heads
// outermost) is multiplied by mask[h] (0/1 or real gates). x is never reallocated. Refuses a
// leaf that requires grad while grad mode is on: use at::NoGradGuard on parameters.
HEADPRUNE_API void apply_head_mask_(at::Tensor& x, const at::Tensor& mask, int64_t head_dim, int64_t dim);

// ---------------------------------------------------------------------------- statistics

// The columns of a statistics accumulator (Stat, kNumStats, kStatFields) are defined in
// headprune/schema.h.

// Per-head running statistics of attention-row entropies, fed batch by batch; the C++ twin of
// Python's headprune.EntropyAccumulator. The whole state is one float64 tensor [H, kNumStats],
// so accumulators merge by addition, all-reduce as one tensor, and save with
// torch::jit::pickle_save (Python: torch.load it, EntropyAccumulator.load_state_dict({"stats": t})).
class HEADPRUNE_API EntropyAccumulator {
 public:
  explicit EntropyAccumulator(int64_t num_heads, c10::Device device = c10::kCPU);

  int64_t num_heads() const { return stats_.size(0); }
  c10::Device device() const { return stats_.device(); }

  // Adds the rows of probs [B, H, Q, K].
  // Each update is the op of the same name (minus "_accumulate_") with this accumulator as
  // its target.
  EntropyAccumulator& entropy_stats_from_probs(const at::Tensor& probs,
                                               const std::optional<at::Tensor>& query_mask = std::nullopt,
                                               double eps = 1e-8);
  // Adds the rows of softmax(query key^T * scale + attn_mask) without forming them.
  EntropyAccumulator& entropy_stats_from_qk(const at::Tensor& query, const at::Tensor& key, double scale,
                                            const std::optional<at::Tensor>& attn_mask = std::nullopt,
                                            bool is_causal = false,
                                            const std::optional<at::Tensor>& query_mask = std::nullopt);
  // Attention that measures itself: returns softmax(query key^T * scale + attn_mask) @ value
  // and adds its rows as entropy_stats_from_qk would (see attention_stats_accumulate_).
  at::Tensor attention_stats(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                             const std::optional<at::Tensor>& attn_mask = std::nullopt, bool is_causal = false,
                             const std::optional<at::Tensor>& query_mask = std::nullopt);
  // Adds another accumulator's state (another shard or worker); any device.
  EntropyAccumulator& merge(const EntropyAccumulator& other);
  void reset();

  at::Tensor count() const;            // [H] int64 rows seen
  at::Tensor mean() const;             // [H] float64 mean entropy (NaN for a head with no row)
  at::Tensor std() const;              // [H] population standard deviation of the entropies (0 below the sums' resolution)
  at::Tensor normalized_mean() const;  // [H] mean of H / log(n) (rows with n < 2 count as 0)
  at::Tensor first_mass_mean() const;  // [H] mean mass on the first visible key
  at::Tensor rest_mean() const;        // [H] mean entropy over the keys after the first

  // The state [H, kNumStats] float64, columns kStatFields. Save it, all-reduce it, or hand it
  // to load_stats; it is the accumulator's own tensor (clone it to keep a snapshot).
  const at::Tensor& stats() const { return stats_; }
  // Replaces the state with a copy of stats (any floating dtype and device, shape [H, kNumStats],
  // finite, counts >= 0).
  void load_stats(const at::Tensor& stats);

 private:
  at::Tensor column_mean(Stat column) const;
  at::Tensor stats_;
};

// -------------------------------------------------------------------------- build record

struct BuildInfo {
  std::string version;        // headprune version
  std::string torch_version;  // the libtorch this library was compiled against
  bool with_cuda;             // CUDA kernels compiled in
  bool cxx11_abi;
  std::string cpu_isas;  // CPU kernels compiled in, e.g. "DEFAULT,AVX2,AVX512"
};
HEADPRUNE_API BuildInfo build_info();

// The instruction set of the CPU kernels chosen at run time ("DEFAULT", "AVX2" or "AVX512";
// follows ATen's choice, so ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides it).
HEADPRUNE_API std::string cpu_isa();

namespace detail {
HEADPRUNE_API int link_anchor();
// Every translation unit that includes this header references the library, so linkers running
// with --as-needed keep it (and the op registrations it carries) even in a program that only
// calls the ops by name through the dispatcher. Dynamically initialised on purpose: an unused
// constant-initialised inline variable may not be emitted at all.
[[maybe_unused]] inline const int kLinkAnchor = link_anchor();
}  // namespace detail

}  // namespace headprune
