// The CPU row kernels compiled for DEFAULT (flags set by setup.py / CMakeLists.txt).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "../entropy_rows_impl.h"

namespace headprune::cpu {
RowKernels row_kernels_default() { return DEFAULT::make_row_kernels(); }
}  // namespace headprune::cpu
