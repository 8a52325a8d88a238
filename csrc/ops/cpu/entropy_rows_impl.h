// The vectorised CPU row kernels of one instruction set. Included once per instruction set by
// isa/rows_*.cpp with CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and CPU_CAPABILITY_<ISA> defined,
// which selects ATen's Vectorized<T> width and puts everything in its own namespace (no ODR
// clashes). One kernel per header under rows/: probs_rows.h, qk_rows.h, attention_rows.h,
// the last two sharing the block-streaming loop of logit_blocks.h; vec_math.h holds the
// vectorised log/exp.
#pragma once

#include "entropy_rows.h"
#include "rows/attention_rows.h"
#include "rows/probs_rows.h"
#include "rows/qk_rows.h"

namespace headprune::cpu {
namespace CPU_CAPABILITY {

inline RowKernels make_row_kernels() {
#define HP_STR2(x) #x
#define HP_STR(x) HP_STR2(x)
  return RowKernels{&probs_rows, &qk_rows, &attention_rows, HP_STR(CPU_CAPABILITY)};
#undef HP_STR
#undef HP_STR2
}

}  // namespace CPU_CAPABILITY
}  // namespace headprune::cpu
