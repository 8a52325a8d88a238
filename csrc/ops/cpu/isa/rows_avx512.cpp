// The CPU row kernels compiled for AVX512 (flags set by setup.py / CMakeLists.txt).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "../entropy_rows_impl.h"

namespace headprune::cpu {
RowKernels row_kernels_avx512() { return AVX512::make_row_kernels(); }
}  // namespace headprune::cpu
