"""benchmarks/_common.py: the helpers the benchmarks' figures rest on."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

_PEAK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from _common import peak_extra_bytes
def fn():
    held = [torch.ones(2_000_000 // 4) for _ in range(10)]  # 20 MB at once
    del held
for _ in range(3):  # freed blocks malloc keeps resident, which fn() would reuse unseen
    held = [torch.ones(4_000_000 // 4) for _ in range(10)]
    del held
print(peak_extra_bytes(fn))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_extra_bytes_sees_memory_that_earlier_frees_left_resident():
    out = subprocess.run([sys.executable, "-c", _PEAK, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = out.stdout.strip()
    if got == "None":
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 18e6 <= int(got) <= 40e6, got
