"""The CMake package for libtorch users: configure, build, ctest, install, then build and run
examples/ as a separate downstream project that only sees the installed package.

Build trees are kept under build-cmake/ (build/, example/), so reruns are incremental; the
install prefix build-cmake/prefix/ is wiped and reinstalled on every run, so the downstream
build proves the installed files are enough. HEADPRUNE_CMAKE_JOBS sets the parallelism.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build-cmake"
BUILD = WORK / "build"
PREFIX = WORK / "prefix"
EXAMPLE = WORK / "example"
CMAKE = shutil.which("cmake")
CTEST = shutil.which("ctest")
JOBS = os.environ.get("HEADPRUNE_CMAKE_JOBS", str(min(os.cpu_count() or 2, 4)))
TORCH_PREFIX = torch.utils.cmake_prefix_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CMAKE is None or CTEST is None, reason="cmake/ctest not found on PATH"),
]


def generator() -> list:
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def run(cmd, timings: dict | None = None, label: str = "", **kw) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if timings is not None:
        timings[label] = time.perf_counter() - start
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def timings():
    t = {}
    yield t
    if t:
        print("\ncmake package timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))


@pytest.fixture(scope="module")
def built(timings):
    """The library and its C++ tests, built incrementally in build-cmake/build."""
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++") or os.environ.get("CXX")):
        pytest.skip("no C++ compiler found")
    BUILD.mkdir(parents=True, exist_ok=True)
    run([CMAKE, "-S", ROOT, "-B", BUILD, *generator(), f"-DCMAKE_PREFIX_PATH={TORCH_PREFIX}",
         "-DCMAKE_BUILD_TYPE=Release", "-DHEADPRUNE_BUILD_TESTS=ON"], timings, "configure")
    run([CMAKE, "--build", BUILD, "-j", JOBS], timings, "build")
    return BUILD


def test_cmake_version_matches_pyproject():
    cmake = re.search(r"project\(headprune VERSION ([0-9.]+)", (ROOT / "CMakeLists.txt").read_text()).group(1)
    py = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert cmake == py


def test_ctest(built, timings):
    proc = run([CTEST, "--test-dir", built, "--output-on-failure", "-j", JOBS], timings, "ctest")
    assert "100% tests passed" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def installed(built, timings):
    shutil.rmtree(PREFIX, ignore_errors=True)
    run([CMAKE, "--install", built, "--prefix", PREFIX], timings, "install")
    return PREFIX


def test_install_layout(installed):
    libdir = next(d for d in ("lib", "lib64") if (installed / d / "cmake" / "headprune").is_dir())
    cfg = installed / libdir / "cmake" / "headprune"
    for name in ("headprune-config.cmake", "headprune-config-version.cmake", "headprune-targets.cmake"):
        assert (cfg / name).is_file(), name
    assert (installed / "include" / "headprune" / "headprune.h").is_file()
    assert list((installed / libdir).glob("libheadprune.so*")) or list((installed / libdir).glob("*headprune*.dylib"))
    # Only the installed tree: no path into the source tree leaks into the exported targets.
    assert str(ROOT / "csrc") not in (cfg / "headprune-targets.cmake").read_text()
    if sys.platform.startswith("linux") and shutil.which("ldd"):  # finds its libtorch by itself
        ldd = run(["ldd", installed / libdir / "libheadprune.so"], env={**os.environ, "LD_LIBRARY_PATH": ""})
        assert "not found" not in ldd.stdout, ldd.stdout


@pytest.fixture(scope="module")
def example(installed, timings):
    """examples/ configured and built as a downstream project against the installed package."""
    EXAMPLE.mkdir(parents=True, exist_ok=True)
    run([CMAKE, "-S", ROOT / "examples", "-B", EXAMPLE, *generator(), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_PREFIX_PATH={installed};{TORCH_PREFIX}"], timings, "example configure")
    run([CMAKE, "--build", EXAMPLE, "-j", JOBS], timings, "example build")
    exe = EXAMPLE / "service_example"
    assert exe.is_file()
    return exe


def test_example_random_input(example, timings):
    proc = run([example], timings, "example run")
    out = proc.stdout
    print(out)
    assert "headprune::entropy_from_qk_accumulate_ registered" in out
    assert re.search(r"pruned heads: \d+ \d+\n", out), out
    assert "32 zero columns (2 heads x 16)" in out, out


def test_example_file_round_trip(example, tmp_path):
    """Tensors saved by Python in, statistics out, loaded back by Python's accumulator."""
    from headprune import EntropyAccumulator
    from headprune.core import reference

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 9, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(3, 2, 9, 8, dtype=torch.float64, generator=gen)
    qm = torch.arange(9)[None, :] < torch.tensor([[9], [6], [1]])
    torch.save({"query": q, "key": k, "query_mask": qm}, tmp_path / "qk.pt")
    run([example, tmp_path / "qk.pt", tmp_path / "state.pt"])
    stats = torch.load(tmp_path / "state.pt", weights_only=True)
    expected = reference.entropy_stats_from_qk(q, k, 8 ** -0.5, None, True, qm)
    torch.testing.assert_close(stats, expected, rtol=1e-10, atol=1e-10)
    acc = EntropyAccumulator(4)
    acc.load_state_dict({"stats": stats})
    assert acc.count.tolist() == [16] * 4


def test_config_refuses_another_torch(installed, tmp_path):
    """find_package(headprune) names the torch version mismatch instead of failing at link time."""
    fake = tmp_path / "fake-torch" / "share" / "cmake" / "Torch"
    fake.mkdir(parents=True)
    (fake / "TorchConfig.cmake").write_text("add_library(torch INTERFACE IMPORTED)\nset(Torch_FOUND TRUE)\n")
    (fake / "TorchConfigVersion.cmake").write_text(
        'set(PACKAGE_VERSION "1.0.0")\nset(PACKAGE_VERSION_COMPATIBLE TRUE)\n')
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(p LANGUAGES NONE)\nfind_package(headprune REQUIRED)\n")
    proc = subprocess.run([CMAKE, "-S", tmp_path / "proj", "-B", tmp_path / "b",
                           f"-DCMAKE_PREFIX_PATH={tmp_path / 'fake-torch'};{installed}"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "was built against libtorch" in proc.stderr and "1.0.0" in proc.stderr, proc.stderr
    assert "libtorch ;" not in proc.stderr and "CMAKE_PREFIX_PATH ;" not in proc.stderr, proc.stderr  # one string
