// CPU backend of the entropy ops: picks the row kernels of the best compiled instruction set.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../entropy_ops.h"
#include "entropy_rows.h"

namespace headprune::cpu {

RowKernels row_kernels_default();
#ifdef HEADPRUNE_CPU_AVX2
RowKernels row_kernels_avx2();
#endif
#ifdef HEADPRUNE_CPU_AVX512
RowKernels row_kernels_avx512();
#endif

const RowKernels& row_kernels() {
  // ATen's own choice (honours ATEN_CPU_CAPABILITY=default|avx2|avx512), read once.
  static const RowKernels chosen = [] {
    const std::string cap = at::get_cpu_capability();
#ifdef HEADPRUNE_CPU_AVX512
    if (cap == "AVX512") return row_kernels_avx512();
#endif
#ifdef HEADPRUNE_CPU_AVX2
    if (cap == "AVX512" || cap == "AVX2") return row_kernels_avx2();
#endif
    return row_kernels_default();
  }();
  return chosen;
}

const char* compiled_isas() {
  return "DEFAULT"
#ifdef HEADPRUNE_CPU_AVX2
         ",AVX2"
#endif
#ifdef HEADPRUNE_CPU_AVX512
         ",AVX512"
#endif
      ;
}

namespace {

struct CpuBackend {
  static void probs_rows(const at::Tensor& probs, double eps, at::Tensor& rows) {
    row_kernels().probs_rows(probs, eps, rows);
  }
  static void qk_rows(const at::Tensor& query, const at::Tensor& key, double scale,
                      const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows) {
    row_kernels().qk_rows(query, key, scale, mask, is_causal, rows);
  }
  static at::Tensor attention_rows(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                   double scale, const std::optional<at::Tensor>& /*attn_mask*/,
                                   const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows) {
    at::Tensor out = at::empty({query.size(0), query.size(1), query.size(2), value.size(3)},
                               query.options().dtype(ops::compute_type(query)));
    row_kernels().attention_rows(query, key, value, scale, mask, is_causal, rows, out);
    return out.to(query.scalar_type());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(headprune, CPU, m) { ops::EntropyOps<CpuBackend>::register_impls(m); }

}  // namespace headprune::cpu
