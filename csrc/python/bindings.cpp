// Python module headprune._C. The ops themselves are registered with the dispatcher by the
// static initialisers of ops/; this file only adds what Python needs beside them.
#include <torch/extension.h>

#include "../ops/cpu/entropy_rows.h"

#ifndef HEADPRUNE_TORCH_VERSION
#define HEADPRUNE_TORCH_VERSION "unknown"
#endif

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = HEADPRUNE_TORCH_VERSION;
#ifdef HEADPRUNE_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  info["cpu_isas"] = headprune::cpu::compiled_isas();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "headprune native core: streaming attention-entropy reducers and head masks";
  m.def("build_info", &build_info, "What this extension was compiled for.");
  m.def("cpu_isa", [] { return std::string(headprune::cpu::row_kernels().isa); },
        "The instruction set of the CPU kernels chosen at run time.");
}
