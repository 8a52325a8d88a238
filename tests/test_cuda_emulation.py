"""The CUDA device code of the entropy ops, run on CPU threads, against the float64 reference.

``tests/cuda_emu/emu.cpp`` includes ``csrc/ops/cuda/entropy_rows.cuh`` with the CUDA keywords and
intrinsics emulated (one ``std::thread`` per CUDA thread, barriers for ``__syncthreads``, shuffles
and ballots), and runs ``qk_rows_kernel`` / ``probs_rows_kernel`` block by block. It is built once
per session with g++ (skipped if g++ is missing), so these tests check the results of the device
code on hosts without a GPU or nvcc. Each case writes its inputs as raw files, runs the emulator
and compares the per-row ``(H, n, p_first, H_rest)`` with ``headprune.reference``.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from headprune.core import reference as ref

ROOT = Path(__file__).resolve().parents[1]
EMU_SRC = ROOT / "tests" / "cuda_emu" / "emu.cpp"
SENTINEL = -12345.0  # what emu leaves in rows the kernels never wrote


@pytest.fixture(scope="session")
def emu(tmp_path_factory) -> Path:
    """Path of the emulator binary, compiled once per session."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: cannot build the CUDA emulator (tests/cuda_emu/emu.cpp)")
    out = tmp_path_factory.mktemp("cuda_emu") / "emu"
    cmd = [gxx, "-std=c++20", "-O1", "-pthread", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", str(EMU_SRC), "-o", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        pytest.fail(f"building the CUDA emulator failed ({' '.join(cmd)}):\n{res.stderr}")
    print(f"\ncuda emulator compiled in {elapsed:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------
# helpers


def dtype_name(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-10


def run_emu(emu: Path, args: list, d: Path) -> torch.Tensor:
    """Runs ``emu args...`` (which writes ``d/rows.bin``) and returns the rows as float64."""
    res = subprocess.run([str(emu)] + [str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"emu {args} exited with {res.returncode}:\n{res.stderr}"
    return torch.frombuffer(bytearray((d / "rows.bin").read_bytes()), dtype=torch.float64)


def zero_empty_rows(n, *stats):
    """The kernels write 0 for rows with no visible key; the reference writes NaN there."""
    empty = n == 0
    for t in stats:
        t[empty] = 0


def assert_rows_match(rows, H, n, p_first, H_rest, atol):
    rows = rows.view(*H.shape, 4)
    assert not bool(torch.isnan(rows).any()), "NaN in the kernel's rows"
    assert not bool((rows == SENTINEL).any()), "rows left unwritten by the kernel"
    assert torch.equal(rows[..., 1], n.double()), "visible-key counts n differ"
    if H.numel() == 0:
        return
    for col, name, want in ((0, "H", H), (2, "p_first", p_first), (3, "H_rest", H_rest)):
        err = (rows[..., col] - want).abs().max().item()
        assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:g}"


def write_mask(d: Path, mask, dtype, shape) -> tuple[int, list[int]]:
    """Writes ``mask.bin``; returns emu's mask kind (0 none, 1 bool, 2 additive) and its
    broadcast strides over ``shape``."""
    if mask is None:
        (d / "mask.bin").write_bytes(b"")
        return 0, [0, 0, 0, 0]
    base = mask.contiguous()
    if mask.dtype != torch.bool:
        base = base.to(dtype)
    base.numpy().tofile(d / "mask.bin")
    return (1 if mask.dtype == torch.bool else 2), list(base.expand(*shape).stride())


# ---------------------------------------------------------------------------------------------
# masks (seeded, built lazily per case)


def bool_mask():
    g = torch.Generator().manual_seed(1)
    m = torch.rand(2, 1, 20, 90, generator=g) > 0.3
    m[0, 0, 3] = False  # a fully masked row
    m[1, 0, :5] = False
    m[1, 0, 7, :89] = False  # only the last key visible
    m[1, 0, 8, :64] = False  # first visible key opens the second tile
    m[1, 0, 9, :63] = False  # first visible key closes the first tile
    return m


def additive_mask(dtype):
    g = torch.Generator().manual_seed(2)
    am = torch.randn(2, 2, 12, 100, generator=g, dtype=torch.float64)
    am = am.masked_fill(torch.rand(2, 2, 12, 100, generator=g) < 0.3, torch.finfo(torch.float32).min)
    am[..., 0] = -math.inf
    am[0, 1, 4] = -math.inf
    return am.to(dtype)


def padding_mask():
    pad = torch.ones(3, 30, dtype=torch.bool)
    pad[1, :7] = False
    pad[2, 25:] = False
    return pad[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# qk rows: qk_rows_kernel (fused logits + online entropy)

F32, F64 = torch.float32, torch.float64

# id: (B, Hq, Hkv, Q, K, D, options)
QK_CASES = {
    "basic": (2, 3, 3, 17, 33, 64, {}),
    "basic-f64": (2, 3, 3, 17, 33, 64, dict(dtype=F64)),
    "Q=K=1": (1, 2, 2, 1, 1, 8, {}),
    "gqa": (1, 4, 2, 37, 130, 40, {}),
    "gqa-f64": (1, 4, 1, 40, 70, 72, dict(dtype=F64)),
    "D=256": (1, 1, 1, 5, 70, 256, {}),
    "D=0": (1, 1, 1, 3, 5, 0, {}),
    "D=1": (1, 1, 1, 3, 7, 1, {}),
    "causal-Q<K": (1, 2, 1, 40, 150, 32, dict(causal=True)),
    "causal-Q<K-f64": (1, 2, 1, 33, 97, 16, dict(dtype=F64, causal=True)),
    "causal-Q>K": (1, 2, 2, 100, 20, 16, dict(causal=True)),
    "causal-Q=K": (1, 1, 1, 70, 70, 16, dict(causal=True)),
    "large-logits": (1, 2, 2, 16, 300, 64, dict(spread=30.0)),
    "bool-mask": (2, 3, 3, 20, 90, 48, dict(mask=bool_mask)),
    "bool-mask-f64": (2, 3, 3, 20, 90, 48, dict(dtype=F64, mask=bool_mask)),
    "additive-mask": (2, 2, 2, 12, 100, 32, dict(mask=lambda: additive_mask(F32))),
    "additive-mask-f64": (2, 2, 2, 12, 100, 32, dict(dtype=F64, mask=lambda: additive_mask(F64))),
    "padding+causal": (3, 4, 2, 30, 30, 64, dict(mask=padding_mask, causal=True)),
    "long-rows": (1, 1, 1, 8, 2600, 64, {}),  # > 2048 keys (41 tiles, the last partial): flushes
}

# id: (B, Hq, Hkv, Q, K, D, value put into one key)
QK_NONFINITE_CASES = {
    "nan-key": (1, 1, 1, 4, 70, 8, math.nan),
    "inf-key": (1, 1, 1, 4, 70, 8, math.inf),
    "-inf-key": (1, 1, 1, 4, 70, 8, -math.inf),
}


def run_qk(emu, d, B, Hq, Hkv, Q, K, D, dtype=F32, mask=None, causal=False, spread=2.0, seed=0, nonfinite=None):
    """Runs qk_rows_kernel on random query/key; returns (kernel rows, float64 reference logits)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Q, D, generator=g, dtype=torch.float64) * spread).to(dtype)
    k = torch.randn(B, Hkv, K, D, generator=g, dtype=torch.float64).to(dtype)
    if nonfinite is not None:
        k[0, 0, K - 1, 0] = nonfinite
    scale = 1 / math.sqrt(max(D, 1))
    q.numpy().tofile(d / "q.bin")
    k.numpy().tofile(d / "k.bin")
    kind, strides = write_mask(d, mask, dtype, (B, Hq, Q, K))
    args = ["qk", dtype_name(dtype), d, repr(scale), B, Hq, Hkv, Q, K, D, int(causal), kind] + strides
    rows = run_emu(emu, args, d)
    return rows, ref.attention_logits(q, k, scale, mask, causal)


@pytest.mark.parametrize("case", QK_CASES.values(), ids=QK_CASES.keys())
def test_qk_rows(emu, tmp_path, case):
    *shape, opts = case
    opts = dict(opts)
    if callable(opts.get("mask")):
        opts["mask"] = opts["mask"]()
    dtype = opts.get("dtype", F32)
    rows, z = run_qk(emu, tmp_path, *shape, **opts)
    H, n, p_first, H_rest = ref.row_stats_from_logits(z)
    zero_empty_rows(n, H, p_first, H_rest)
    assert_rows_match(rows, H, n, p_first, H_rest, tolerance(dtype))


@pytest.mark.parametrize("case", QK_NONFINITE_CASES.values(), ids=QK_NONFINITE_CASES.keys())
def test_qk_rows_nonfinite_key(emu, tmp_path, case):
    *shape, value = case
    B, Hq, _, Q = shape[:4]
    rows, z = run_qk(emu, tmp_path, *shape, nonfinite=value)
    H = ref.row_stats_from_logits(z)[0]
    bad = ~torch.isfinite(rows.view(B, Hq, Q, 4)[..., 0])
    assert bool(bad.any()), "no row became non-finite"
    assert torch.equal(bad, ~torch.isfinite(H)), "non-finite rows differ from the reference's"


# ---------------------------------------------------------------------------------------------
# probs rows: probs_rows_kernel (entropy of given probabilities)

# id: (B, H, Q, K, options)
PROBS_CASES = {
    "K=1": (2, 3, 5, 1, {}),
    "K=33": (2, 3, 5, 33, {}),
    "K=100-f64": (2, 3, 5, 100, dict(dtype=F64)),
    "K=5000": (1, 2, 5, 5000, {}),  # > 2 flush chunks of 2048 keys
    "transposed": (2, 3, 9, 50, dict(transpose=True)),
    "eps=0.1": (1, 3, 9, 70, dict(eps=0.1)),
    "odd-rows": (1, 1, 13, 20, {}),  # the last block is partly idle
}


def make_probs(B, H, Q, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, H, Q, K, generator=g, dtype=torch.float64) * 2
    z = z.masked_fill(torch.rand(B, H, Q, K, generator=g) < 0.3, -math.inf)
    if Q > 0:
        z[:, :, 0] = -math.inf  # all-zero rows
    if Q > 1:
        z[:, :, 1, : min(K - 1, 40)] = -math.inf  # first non-zero entry late in the row
    return torch.softmax(z, -1).nan_to_num(0.0).to(dtype)


@pytest.mark.parametrize("case", PROBS_CASES.values(), ids=PROBS_CASES.keys())
def test_probs_rows(emu, tmp_path, case):
    B, H, Q, K, opts = case
    dtype, eps = opts.get("dtype", F32), opts.get("eps", 1e-8)
    p = make_probs(B, H, Q, K, dtype, opts.get("seed", 0))
    if opts.get("transpose", False):
        base = p.transpose(-1, -2).contiguous()
        view = base.transpose(-1, -2)
    else:
        base = view = p
    base.numpy().tofile(tmp_path / "probs.bin")
    args = ["probs", dtype_name(dtype), tmp_path, repr(eps), B, H, Q, K] + list(view.stride())
    rows = run_emu(emu, args, tmp_path)
    Hh, n, p_first, H_rest = ref.row_stats_from_probs(p, eps)
    zero_empty_rows(n, Hh, p_first, H_rest)
    assert_rows_match(rows, Hh, n, p_first, H_rest, tolerance(dtype))


def edge_probs(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[1, 6, 1, 70] rows of probabilities that are zero or subnormal in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    tiny, least = fi.tiny, fi.tiny * fi.eps  # smallest normal, smallest subnormal
    K = 70
    sub = lambda n: (torch.rand(n, generator=g, dtype=torch.float64) * tiny).to(dtype)  # noqa: E731
    rows = torch.zeros(6, K, dtype=dtype)
    rows[0, 0], rows[0, 1:] = 0.5, sub(K - 1)
    rows[1, 0], rows[1, 1:] = 1.0, least
    rows[2] = sub(K)
    rows[3, 0], rows[3, 1:40], rows[3, 40:] = 0.75, sub(39), 1e-30
    rows[4] = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 3, -1).to(dtype)
    rows[4, 10:15] = sub(5)
    rows[4, 20:30] = 0.0
    rows[5, 3], rows[5, 4:] = 0.5, sub(K - 4)
    rows[5, 4::3] = 0.0
    return rows.view(1, 6, 1, K)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_probs_rows_zero_and_subnormal_entries(emu, tmp_path, dtype, eps):
    """Zeros with eps = 0 (0 log 0 = 0, not NaN) and subnormal entries (the rest entropy)."""
    p = edge_probs(dtype)
    p.numpy().tofile(tmp_path / "probs.bin")
    rows = run_emu(emu, ["probs", dtype_name(dtype), tmp_path, repr(eps), *p.shape, *p.stride()], tmp_path)
    assert_rows_match(rows, *ref.row_stats_from_probs(p, eps), 1e-6)


def test_probs_rows_negative_entry_marks_the_row(emu, tmp_path):
    p = edge_probs(F32)
    p[0, 1, 0, 0] = -0.5  # the first entry
    p[0, 4, 0, 33] = -1e-3  # after it
    p[0, 5, 0, 69] = -1e-44  # the last entry, subnormal
    p.numpy().tofile(tmp_path / "probs.bin")
    rows = run_emu(emu, ["probs", "f32", tmp_path, "0.0", *p.shape, *p.stride()], tmp_path).view(6, 4)
    assert rows[:, 1].tolist()[1::3] == [-1.0, -1.0] and rows[5, 1] == -1.0
    assert (rows[[0, 2, 3], 1] > 0).all()
