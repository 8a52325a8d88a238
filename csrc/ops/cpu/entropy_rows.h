// CPU row kernels: one implementation (entropy_rows_impl.h) compiled once per instruction
// set (isa/rows_*.cpp, each with its own -m flags) and chosen at run time from ATen's CPU
// capability, so one build runs on CPUs with and without AVX2/AVX-512.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace headprune::cpu {

// rows: contiguous float64 [B, H, Q, 4] receiving {H, n, p_first, H_rest} per row.
using ProbsRowsFn = void (*)(const at::Tensor& probs, double eps, at::Tensor& rows);
// mask: nullopt or a [B, Hq, Q, K] view (bool, or the compute dtype).
using QkRowsFn = void (*)(const at::Tensor& query, const at::Tensor& key, double scale,
                          const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows);

// The attention output as well: out is a contiguous [B, Hq, Q, Dv] tensor of the compute type
// (float64 for float64 inputs, float32 otherwise) that receives softmax(...) @ value.
using AttentionRowsFn = void (*)(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scale,
                                 const std::optional<at::Tensor>& mask, bool is_causal, at::Tensor& rows,
                                 at::Tensor& out);

struct RowKernels {
  ProbsRowsFn probs_rows;
  QkRowsFn qk_rows;
  AttentionRowsFn attention_rows;
  const char* isa;
};

// The kernels for the best instruction set this CPU and this build support.
const RowKernels& row_kernels();

// Instruction sets compiled into this build, e.g. "DEFAULT,AVX2,AVX512".
const char* compiled_isas();

}  // namespace headprune::cpu
