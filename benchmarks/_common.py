"""Shared helpers of the benchmark scripts: medians, peak CPU memory, result files."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def median_ms(fn, *, repeat: int = 7, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds (the machine is shared: medians, not means)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def paired_ms(fa, fb, *, repeat: int = 25, warmup: int = 1):
    """fa and fb timed alternately, ``repeat`` pairs: (median ms of fa, median ms of fb,
    median of the per-pair ratios time(fb) / time(fa)). On a shared machine a burst of
    load lands on both halves of a pair, so the paired ratio is steadier than a ratio of
    medians taken one after the other."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    ratio = statistics.median(b / a for a, b in zip(ta, tb))
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, ratio


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _trim() -> None:
    """glibc's malloc_trim(0): return freed heap pages to the system (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn) -> int | None:
    """Peak resident memory above the start while fn() runs (Linux: the VmHWM high-water mark,
    reset through /proc/self/clear_refs). None where that is unavailable.

    The pages malloc keeps after earlier frees are resident already, and fn() would reuse them
    unseen (a 20 MB peak read as 6 MB after a larger loop): they go back to the system first."""
    try:
        gc.collect()
        _trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kb("VmRSS")
        fn()
        return max(0, _proc_status_kb("VmHWM") - base) * 1024
    except (OSError, KeyError):
        return None


def _amx():
    """Whether the CPU has AMX tiles for bfloat16 (torch's bfloat16 matrix products and SDPA use
    them); ``None`` where /proc/cpuinfo cannot say."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return None


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": _amx(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line([r.get(c, "") for c in cols]) for r in rows])
