"""Builds headprune._C with torch.utils.cpp_extension.

    pip install --no-build-isolation -e .

Environment:
    HEADPRUNE_SKIP_EXTENSION=1    install the Python package without compiling the extension.
    HEADPRUNE_WITH_CUDA=auto|0|1  auto (default): build the CUDA kernels when torch is a CUDA
                                  build and nvcc is found (never decided by whether a GPU is
                                  visible, so GPU-less build hosts produce CUDA wheels too).
    TORCH_CUDA_ARCH_LIST, MAX_JOBS  honoured as by torch.utils.cpp_extension.
"""

import os
import platform
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "headprune needs PyTorch to build: install it first (e.g. `pip install torch==2.13.0`), "
        "then `pip install --no-build-isolation -e .`"
    )

ROOT = Path(__file__).parent.resolve()
CSRC = Path("csrc")

# One source per instruction set; each gets its own -m flags (see csrc/ops/cpu/entropy_rows.h).
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def with_cuda() -> bool:
    mode = os.environ.get("HEADPRUNE_WITH_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"HEADPRUNE_WITH_CUDA: expected auto, 0 or 1, got {mode!r}")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not possible:
        sys.exit(
            "HEADPRUNE_WITH_CUDA=1 but torch is not a CUDA build or nvcc was not found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    return possible and mode != "0"


def isa_sources() -> dict:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {isa: str(CSRC / "ops" / "cpu" / "isa" / f"rows_{isa}.cpp") for isa in ISA_FLAGS}


def write_build_info(cuda: bool, isas: list) -> None:
    torch_version = torch.__version__.split("+")[0]
    text = (
        "# Written by setup.py: what headprune._C was built for.\n"
        f"TORCH_VERSION = {torch_version!r}\n"
        f"WITH_CUDA = {cuda!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if cuda else None!r}\n"
        f"CPU_ISAS = {','.join(['DEFAULT'] + isas)!r}\n"
        f"CXX11_ABI = {bool(torch._C._GLIBCXX_USE_CXX11_ABI)!r}\n"
    )
    (ROOT / "python" / "headprune" / "_build_info.py").write_text(text)


class Build(BuildExtension):
    """Compiles the per-ISA CPU kernels with their own flags, linked after the baseline
    objects so that inline functions shared with them resolve to baseline code."""

    def build_extension(self, ext):
        extra = []
        for isa, src in isa_sources().items():
            args = ext.extra_compile_args
            if isinstance(args, dict):
                args = {**args, "cxx": args["cxx"] + ISA_FLAGS[isa]}
            else:
                args = args + ISA_FLAGS[isa]
            extra += self.compiler.compile(
                [src], output_dir=self.build_temp, macros=ext.define_macros,
                include_dirs=ext.include_dirs, extra_postargs=args,
            )
        ext.extra_objects = list(ext.extra_objects or []) + extra
        super().build_extension(ext)


def extension():
    cuda = with_cuda()
    isas = list(isa_sources())
    write_build_info(cuda, [i.upper() for i in isas])
    sources = [
        "csrc/python/bindings.cpp",
        "csrc/ops/registration.cpp",
        "csrc/ops/common.cpp",
        "csrc/ops/cpu/entropy_kernel.cpp",
        "csrc/ops/cpu/isa/rows_default.cpp",
    ]
    torch_version = torch.__version__.split("+")[0]
    defines = [f'-DHEADPRUNE_TORCH_VERSION="{torch_version}"'] + [f"-DHEADPRUNE_CPU_{i.upper()}" for i in isas]
    cxx = ["-O3", "-fopenmp"] + defines  # the C++ standard: torch's default
    include = [str(ROOT / CSRC / "include")]  # headprune/schema.h, shared with the public header
    if cuda:
        sources += sorted(str(p) for p in (CSRC / "ops" / "cuda").glob("*.cu"))
        cxx.append("-DHEADPRUNE_WITH_CUDA")
        nvcc = ["-O3", "-DHEADPRUNE_WITH_CUDA", "--expt-relaxed-constexpr"] + defines
        return CUDAExtension("headprune._C", sources, include_dirs=include, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=["-fopenmp"])
    return CppExtension("headprune._C", sources, include_dirs=include, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"])


# HEADPRUNE_SKIP_EXTENSION=1: install the Python package only (the Makefile then compiles the
# extension in place with `setup.py build_ext --inplace`, incrementally).
SKIP_EXTENSION = os.environ.get("HEADPRUNE_SKIP_EXTENSION", "0") == "1"

setup(
    packages=find_packages("python") + ["headprune.app.data"],  # data/: the bundled texts (no __init__)
    package_dir={"": "python"},
    package_data={"headprune.app.data": ["*.txt", "*.md"]},
    ext_modules=[] if SKIP_EXTENSION else [extension()],
    cmdclass={"build_ext": Build},
)
