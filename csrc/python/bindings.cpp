// Python module headprune._C. The ops themselves are registered with the dispatcher by the
// static initialisers of ops/; this file only adds what Python needs beside them. (What the
// module was built for is recorded by setup.py in headprune/_build_info.py, which is read
// before this module is imported: see headprune/core/build.py.)
#include <torch/extension.h>

#include "../ops/cpu/entropy_rows.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "headprune native core: streaming attention-entropy reducers and head masks";
  m.def("cpu_isa", [] { return std::string(headprune::cpu::row_kernels().isa); },
        "The instruction set of the CPU kernels chosen at run time.");
}
