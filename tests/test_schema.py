"""One statistics schema: the Python enums (headprune.core.schema) and the torch-free C++ header
(csrc/include/headprune/schema.h) agree, and the build record is checked field by field."""

import re
from pathlib import Path

import pytest

from headprune.core import build
from headprune.core.schema import MASKED_LOGIT, NUM_OUTPUT_STATS, NUM_STATS, OutputStat, RowField, Stat

HEADER = (Path(__file__).resolve().parents[1] / "csrc" / "include" / "headprune" / "schema.h").read_text()


def _cpp_enum(name: str) -> dict:
    body = re.search(rf"enum class {name} : \w+ \{{(.*?)\}};", HEADER, re.S).group(1)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+) = (\d+),", body)}


def _cpp_constant(name: str) -> str:
    return re.search(rf"constexpr \w+ {name} = ([^;]+);", HEADER).group(1)


def _cpp_names(name: str) -> list:
    body = re.search(rf"{name}\{{(.*?)\}};", HEADER, re.S).group(1)
    return re.findall(r'"(\w+)"', body)


@pytest.mark.parametrize("py, cpp, count, names", [
    (Stat, "Stat", "kNumStats", "kStatFields"),
    (OutputStat, "OutputStat", "kNumOutputStats", "kOutputFields"),
    (RowField, "RowField", "kRowFields", "kRowFieldNames"),
])
def test_python_and_cpp_schemas_agree(py, cpp, count, names):
    assert _cpp_enum(cpp) == {m.name.lower(): m.value for m in py}
    assert int(_cpp_constant(count)) == len(py)
    assert _cpp_names(names) == [m.name.lower() for m in py]


def test_constants_agree():
    assert NUM_STATS == len(Stat) and NUM_OUTPUT_STATS == len(OutputStat)
    assert float(_cpp_constant("kMaskedLogit").rstrip("f")) == MASKED_LOGIT


RUNNING = {"torch_version": "2.13.0", "cuda_version": None, "cxx11_abi": True}


@pytest.mark.parametrize("built, expect", [
    ({"torch_version": "2.13.0", "with_cuda": False, "cuda_version": None, "cxx11_abi": True}, []),
    ({"torch_version": "2.12.1", "with_cuda": False, "cuda_version": None, "cxx11_abi": True}, ["torch version 2.12.1"]),
    ({"torch_version": "2.13.0", "with_cuda": True, "cuda_version": "12.8", "cxx11_abi": True}, ["CUDA 12.8"]),
    ({"torch_version": "2.13.0", "with_cuda": False, "cuda_version": None, "cxx11_abi": False}, ["C++11 ABI False"]),
    ({"torch_version": "2.12.1", "with_cuda": True, "cuda_version": "12.8", "cxx11_abi": False},
     ["torch version", "CUDA 12.8", "C++11 ABI"]),
])
def test_build_record_mismatches_name_every_field(built, expect):
    got = build.mismatches(built, RUNNING)
    assert len(got) == len(expect) and all(g.startswith(e) for g, e in zip(got, expect)), got


def test_a_cpu_build_runs_under_a_cuda_torch_of_the_same_version():
    built = {"torch_version": "2.13.0", "with_cuda": False, "cuda_version": None, "cxx11_abi": True}
    assert build.mismatches(built, {**RUNNING, "cuda_version": "12.8"}) == []


def test_this_build_matches_the_running_torch():
    assert build.mismatches(build.build_info(), build.running_torch()) == []
