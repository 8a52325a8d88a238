// The CPU row kernels compiled for AVX2 (flags set by setup.py / CMakeLists.txt).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "../entropy_rows_impl.h"

namespace headprune::cpu {
RowKernels row_kernels_avx2() { return AVX2::make_row_kernels(); }
}  // namespace headprune::cpu
