"""Compile check of the CUDA sources on hosts without a GPU (and with a CPU-only torch).

Every ``csrc/**/*.cu`` is compiled to an object for sm_90 against the installed torch's
headers, with the flags torch.utils.cpp_extension gives nvcc. Nothing is linked or run: this
catches syntax, template and host/device errors, not wrong results (see test_ops_cuda.py).
Skipped when nvcc is not found. About a minute per file on two cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))


def find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("nvcc")


def nvcc_command(nvcc: str, src: Path, obj: Path) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        nvcc, "-c", str(src), "-o", str(obj),
        "-arch=sm_90", "-std=c++17", "-O2",
        # torch.utils.cpp_extension.COMMON_NVCC_FLAGS
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
        # a host-only function called from device code is an error, not a warning
        "-Werror", "cross-execution-space-call",
        # a CPU-only torch ships c10/cuda headers but not the generated cuda_cmake_macros.h
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DHEADPRUNE_WITH_CUDA",
        "-Xcompiler", "-fPIC",
        f"-I{CSRC}",
        f"-I{CSRC / 'include'}",
    ]
    return cmd + [f"-I{p}" for p in include_paths()]


def test_cuda_sources_exist():
    assert CU_FILES, f"no .cu file under {CSRC}"


@pytest.mark.slow  # about a minute per file on two cores
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_source_compiles(src, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found ($CUDA_HOME/bin, /usr/local/cuda/bin, PATH)")
    obj = tmp_path / (src.stem + ".o")
    cmd = nvcc_command(nvcc, src, obj)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"nvcc failed ({proc.returncode}) on {src.relative_to(ROOT)}:\n{' '.join(cmd)}\n{out}")
    assert obj.is_file() and obj.stat().st_size > 0
