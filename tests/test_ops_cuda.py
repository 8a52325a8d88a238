"""The CUDA kernels of the entropy ops against the float64 reference and the CPU kernels.

Skipped without a CUDA device or when headprune._C was built without CUDA. Setting
HEADPRUNE_TEST_CUDA_ON_CPU=1 runs the same tests on the CPU kernels: a check of the tests
themselves on GPU-less hosts.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from headprune.core import NUM_STATS, ops
from headprune.core import reference as ref
from headprune.core.build import load_extension

load_extension()  # the tests call torch.ops.headprune.* directly


ON_CPU = os.environ.get("HEADPRUNE_TEST_CUDA_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"


def _has_cuda_kernel() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("headprune::entropy_from_qk_accumulate_", "CUDA")


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not ON_CPU and not _has_cuda_kernel(), reason="headprune._C built without CUDA kernels"),
]

ATOL = 1e-4  # nats, on per-row means, for float32/float64
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _qk(B, Hq, Hkv, Q, K, D, dtype, seed=0, spread=2.0):
    g = _gen(seed)
    q = (torch.randn(B, Hq, Q, D, generator=g, dtype=torch.float64) * spread).to(dtype)
    k = torch.randn(B, Hkv, K, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k


def _dev(x):
    return None if x is None else x.to(DEVICE)


def _stats_qk(q, k, scale, attn_mask=None, is_causal=False, query_mask=None, device=DEVICE):
    stats = torch.zeros(q.shape[1], NUM_STATS, dtype=torch.float64, device=device)
    on = (lambda x: None if x is None else x.to(device))
    ops.entropy_stats_from_qk_accumulate_(stats, on(q), on(k), scale, on(attn_mask), is_causal, on(query_mask))
    return stats.cpu()


def _stats_probs(p, query_mask=None, eps=1e-8, device=DEVICE):
    stats = torch.zeros(p.shape[1], NUM_STATS, dtype=torch.float64, device=device)
    qm = None if query_mask is None else query_mask.to(device)
    ops.entropy_stats_from_probs_accumulate_(stats, p.to(device), qm, eps)
    return stats.cpu()


def _means(stats):
    """Per-head means of the row statistics (count column kept as is)."""
    n = stats[:, :1].clamp_min(1)
    return torch.cat([stats[:, :1], stats[:, 1:] / n], dim=1)


def assert_stats_close(got, want, atol=ATOL):
    assert torch.equal(got[:, 0], want[:, 0]), f"counts differ: {got[:, 0]} vs {want[:, 0]}"
    g, w = _means(got), _means(want)
    tol = torch.full((NUM_STATS,), atol, dtype=torch.float64)
    tol[2] = atol * (2 * w[:, 1].abs().max().item() + 1)  # mean H^2
    err = (g - w).abs().amax(0)
    assert bool((err <= tol).all()), f"max abs error per column {err.tolist()} > {tol.tolist()}"


def _naive_mean_entropy(q, k, scale, attn_mask=None, is_causal=False, query_mask=None):
    """Per-head mean row entropy computed entirely in q's dtype (the half-precision baseline)."""
    q, k = _dev(q), _dev(k)
    group = q.shape[1] // k.shape[1]
    z = (q @ k.repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    Q, K = z.shape[-2:]
    if attn_mask is not None:
        attn_mask = _dev(attn_mask)
        z = z.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else z + attn_mask.to(z.dtype)
    if is_causal:
        hidden = torch.arange(K, device=z.device)[None, :] > torch.arange(Q, device=z.device)[:, None] + (K - Q)
        z = z.masked_fill(hidden, -math.inf)
    visible = z > ref.MASKED_LOGIT
    z = z.masked_fill(~visible, -math.inf)
    p = torch.softmax(z, -1)
    H = -torch.where(visible, p * torch.log_softmax(z, -1), torch.zeros((), dtype=z.dtype, device=z.device)).sum(-1)
    valid = visible.any(-1)
    if query_mask is not None:
        valid = valid & _dev(query_mask)[:, None, :]
    H = torch.where(valid, H.double(), 0.0)
    return (H.sum((0, 2)) / valid.sum((0, 2)).clamp_min(1)).cpu()


def check_qk(q, k, scale, attn_mask=None, is_causal=False, query_mask=None):
    got = _stats_qk(q, k, scale, attn_mask, is_causal, query_mask)
    want = ref.entropy_stats_from_qk(q, k, scale, attn_mask, is_causal, query_mask)
    if q.dtype not in HALF:
        assert_stats_close(got, want)
        return
    # flash-attention's rule: at most 2x the error of a naive same-dtype computation (+ 1e-3).
    assert torch.equal(got[:, 0], want[:, 0])
    h_ref = _means(want)[:, 1]
    err = (_means(got)[:, 1] - h_ref).abs().max().item()
    naive = (_naive_mean_entropy(q, k, scale, attn_mask, is_causal, query_mask) - h_ref).abs().max().item()
    assert err <= 2 * naive + 1e-3, f"kernel error {err} vs naive {q.dtype} error {naive}"
    assert_stats_close(got, want, atol=5e-3)  # every column, loosely


# ---------------------------------------------------------------------------------- qk

QK_SHAPES = [  # B, Hq, Hkv, Q, K, D
    (2, 3, 3, 17, 33, 64),
    (1, 2, 2, 1, 1, 8),  # Q = K = 1
    (1, 2, 2, 1, 300, 16),  # decode-like
    (2, 8, 2, 37, 130, 128),  # GQA
    (1, 2, 1, 5, 70, 256),
    (1, 1, 1, 65, 65, 40),  # odd D, a second query block
    (1, 1, 1, 3, 7, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qk_matches_reference(shape, dtype):
    B, Hq, Hkv, Q, K, D = shape
    q, k = _qk(B, Hq, Hkv, Q, K, D, dtype)
    check_qk(q, k, D**-0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Q,K", [(9, 40), (64, 200), (1, 5), (40, 40)])
def test_qk_causal(Q, K, dtype):
    q, k = _qk(2, 4, 2, Q, K, 32, dtype, seed=1)
    check_qk(q, k, 32**-0.5, is_causal=True)


def test_qk_causal_more_queries_than_keys():
    q, k = _qk(1, 2, 2, 50, 20, 16, torch.float32, seed=2)  # the first 30 rows see nothing
    got = _stats_qk(q, k, 0.25, is_causal=True)
    assert got[:, 0].tolist() == [20.0, 20.0]
    assert_stats_close(got, ref.entropy_stats_from_qk(q, k, 0.25, is_causal=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_bool_mask_with_fully_masked_rows(dtype):
    B, H, Q, K = 2, 3, 20, 90
    q, k = _qk(B, H, H, Q, K, 48, dtype, seed=3)
    mask = torch.rand(B, 1, Q, K, generator=_gen(4)) > 0.3
    mask[0, 0, 3] = False  # fully masked rows are not counted
    mask[1, 0, :5] = False
    mask[1, 0, 7, :K - 1] = False  # only the last key visible
    check_qk(q, k, 48**-0.5, attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_additive_mask(dtype):
    B, H, Q, K = 2, 2, 12, 100
    q, k = _qk(B, H, H, Q, K, 32, dtype, seed=5)
    mask = torch.randn(B, H, Q, K, generator=_gen(6), dtype=torch.float64)
    hidden = torch.rand(B, H, Q, K, generator=_gen(7)) < 0.3
    mask = mask.masked_fill(hidden, torch.finfo(torch.float32).min)
    mask[..., 0] = -math.inf  # the first visible key is never key 0
    mask[0, 1, 4] = -math.inf  # a fully masked row
    mask = mask.to(torch.float64 if dtype == torch.float64 else torch.float32)
    check_qk(q, k, 32**-0.5, attn_mask=mask)


def test_qk_padding_mask_causal_and_query_mask():
    B, H, Q, K = 3, 4, 30, 30
    q, k = _qk(B, H, 2, Q, K, 64, torch.float32, seed=8)
    pad = torch.ones(B, K, dtype=torch.bool)
    pad[1, :7] = False  # left padding
    pad[2, 25:] = False  # right padding
    attn_mask = pad[:, None, None, :]  # broadcast [B, 1, 1, K]
    check_qk(q, k, 0.125, attn_mask=attn_mask, is_causal=True, query_mask=pad)


def test_qk_long_rows():
    q, k = _qk(1, 2, 2, 8, 4096, 64, torch.float32, seed=9)
    check_qk(q, k, 64**-0.5)
    check_qk(q, k, 64**-0.5, is_causal=True)


def test_qk_large_logits():
    q, k = _qk(1, 2, 2, 16, 500, 64, torch.float32, seed=10, spread=30.0)  # peaked rows
    check_qk(q, k, 64**-0.5)


def test_qk_non_contiguous_inputs():
    q, k = _qk(2, 4, 4, 24, 50, 32, torch.float32, seed=11)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Q, H, D] storage, like HF layouts
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous()
    assert_stats_close(_stats_qk(qt, kt, 0.2), ref.entropy_stats_from_qk(q, k, 0.2))


def test_qk_sums_counts_op():
    q, k = _qk(2, 3, 3, 10, 20, 16, torch.float32, seed=12)
    sums = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    counts = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    ops.entropy_from_qk_accumulate_(sums, counts, _dev(q), _dev(k), 0.25)
    ops.entropy_from_qk_accumulate_(sums, counts, _dev(q), _dev(k), 0.25)  # accumulates
    want_s, want_c = ref.entropy_from_qk(q, k, 0.25)
    assert torch.equal(counts.cpu(), 2 * want_c)
    torch.testing.assert_close(sums.cpu(), 2 * want_s, atol=2 * ATOL * want_c.max().item(), rtol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_qk_nonfinite_raises_and_leaves_stats(bad):
    q, k = _qk(1, 2, 2, 4, 70, 8, torch.float32, seed=13)
    k[0, 1, 66, 3] = bad  # in the second key tile
    stats = torch.ones(2, NUM_STATS, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.entropy_stats_from_qk_accumulate_(stats, _dev(q), _dev(k), 1.0)
    assert bool((stats == 1).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_cpu_and_cuda_agree(dtype):
    q, k = _qk(2, 4, 2, 33, 150, 64, dtype, seed=14)
    mask = torch.rand(2, 1, 33, 150, generator=_gen(15)) > 0.2
    cpu = _stats_qk(q, k, 0.125, mask, True, device="cpu")
    dev = _stats_qk(q, k, 0.125, mask, True)
    assert_stats_close(dev, cpu)


# ------------------------------------------------------------------------------- probs


def _probs(B, H, Q, K, dtype, seed=0, zero_frac=0.3):
    g = _gen(seed)
    z = torch.randn(B, H, Q, K, generator=g, dtype=torch.float64) * 2
    z = z.masked_fill(torch.rand(B, H, Q, K, generator=g) < zero_frac, -math.inf)
    z[..., 0, :] = -math.inf  # an all-zero row
    z[..., 1, :3] = -math.inf  # leading zeros
    return torch.softmax(z, -1).nan_to_num(0.0).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 33, 100, 4096])
def test_probs_matches_reference(K, dtype):
    p = _probs(2, 3, 5, K, dtype, seed=K)
    got = _stats_probs(p)
    want = ref.entropy_stats_from_probs(p)  # same (rounded) probabilities, in float64
    assert_stats_close(got, want, atol=ATOL if dtype not in HALF else 1e-3)


def test_probs_non_contiguous_and_query_mask():
    p = _probs(2, 4, 6, 50, torch.float32, seed=21)
    pt = p.transpose(-1, -2).contiguous().transpose(-1, -2)  # key stride != 1
    qm = torch.rand(2, 6, generator=_gen(22)) > 0.4
    assert_stats_close(_stats_probs(pt, qm, eps=1e-6), ref.entropy_stats_from_probs(p, qm, eps=1e-6))


def test_probs_nonfinite_raises():
    p = _probs(1, 2, 3, 40, torch.float32, seed=23)
    p[0, 1, 2, 30] = math.nan
    stats = torch.ones(2, NUM_STATS, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.entropy_stats_from_probs_accumulate_(stats, _dev(p), None, 1e-8)
    assert bool((stats == 1).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_probs_cpu_and_cuda_agree(dtype):
    p = _probs(2, 3, 7, 3000, dtype, seed=24)
    assert_stats_close(_stats_probs(p), _stats_probs(p, device="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_probs_zero_and_subnormal_entries(dtype, eps):
    """Zero entries with eps = 0 (0 log 0 = 0, not NaN) and rows whose entries after the first
    are subnormal in dtype (the rest entropy as in float64)."""
    fi = torch.finfo(dtype)
    sub = (torch.rand(4, 69, generator=_gen(27), dtype=torch.float64) * fi.tiny).to(dtype)
    p = torch.zeros(1, 4, 1, 70, dtype=dtype)
    p[0, :, 0, 0], p[0, :, 0, 1:] = 0.5, sub
    p[0, 1, 0, 1:] = fi.tiny * fi.eps  # the smallest subnormal
    p[0, 2, 0, 3::4] = 0.0
    p[0, 3] = _probs(1, 1, 2, 70, dtype, seed=28)[0, 0, 1]  # zeros in a normal row
    assert_stats_close(_stats_probs(p, eps=eps), ref.entropy_stats_from_probs(p, eps=eps), atol=1e-6)


def test_probs_negative_raises():
    p = _probs(2, 3, 4, 40, torch.float32, seed=29)
    p[1, 2, 3, 17] = -1e-3
    stats = torch.ones(3, NUM_STATS, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"probs: expected probabilities >= 0, got -0.001 at \[1, 2, 3, 17\]"):
        ops.entropy_stats_from_probs_accumulate_(stats, _dev(p), None, 1e-8)
    assert bool((stats == 1).all())


def test_requires_grad_and_other_devices_are_refused():
    q, k = _qk(1, 2, 1, 5, 9, 16, torch.float32, seed=30)
    stats = torch.ones(2, NUM_STATS, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="query: requires grad"):
        ops.entropy_stats_from_qk_accumulate_(stats, _dev(q).requires_grad_(True), _dev(k), 0.25)
    if not ON_CPU:
        with pytest.raises(ValueError, match="stats: expected device"):
            ops.entropy_stats_from_qk_accumulate_(stats.cpu(), _dev(q), _dev(k), 0.25)
        with pytest.raises(ValueError, match="key: expected the device of query"):
            ops.entropy_stats_from_qk_accumulate_(stats, _dev(q), k, 0.25)
    assert bool((stats == 1).all())


def test_opcheck():
    q, k = _qk(1, 2, 1, 5, 9, 16, torch.float32, seed=25)
    stats = torch.zeros(2, NUM_STATS, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(torch.ops.headprune.entropy_stats_from_qk_accumulate_.default,
                          (stats, _dev(q), _dev(k), 0.25, None, True, None))
    p = _probs(1, 2, 3, 9, torch.float32, seed=26)
    torch.library.opcheck(torch.ops.headprune.entropy_stats_from_probs_accumulate_.default,
                          (stats, _dev(p), None, 1e-8))


# ----------------------------------------------------------------- attention with statistics


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(2, 4, 2, 33, 70, 16, True), (1, 3, 3, 64, 64, 32, False), (1, 2, 1, 300, 300, 64, True)])
def test_attention_stats_matches_reference(case, dtype):
    B, Hq, Hkv, Q, K, D, causal = case
    q, k = _qk(B, Hq, Hkv, Q, K, D, dtype, seed=Q)
    v = torch.randn(B, Hkv, K, D + 3, generator=_gen(K), dtype=torch.float64).to(dtype)
    mask = torch.rand(B, 1, Q, K, generator=_gen(1)) > 0.2
    mask[0, 0, 1] = False  # a row with no visible key: zero output, not counted
    stats = torch.zeros(Hq, NUM_STATS, dtype=torch.float64, device=DEVICE)
    out = ops.attention_stats_accumulate_(stats, _dev(q), _dev(k), _dev(v), D**-0.5, _dev(mask), causal, None)
    want_out, want = ref.attention_stats(q, k, v, D**-0.5, mask, causal)
    assert out.dtype == dtype and out.device.type == torch.device(DEVICE).type
    tol = 2e-2 if dtype in HALF else 1e-4
    torch.testing.assert_close(out.cpu().double(), want_out, rtol=0, atol=tol)
    assert_stats_close(stats.cpu(), want, atol=ATOL if dtype not in HALF else 1e-3)


def test_attention_float16_with_a_float32_mask_below_float16s_range():
    """A float32 additive mask was cast to float16 for SDPA, where -1e5 becomes -inf: a row all
    at -1e5 (a constant shift: visible keys, counted by the statistics) came back zero or NaN.
    Only values at or below -1e37 mask a key, as the statistics read them."""
    q, k = _qk(1, 2, 2, 4, 6, 8, torch.float16, seed=5)
    v = torch.randn(1, 2, 6, 8, generator=_gen(6), dtype=torch.float64).to(torch.float16)
    mask = torch.zeros(1, 1, 4, 6)
    mask[0, 0, 1] = -1e5
    stats = torch.zeros(2, NUM_STATS, dtype=torch.float64, device=DEVICE)
    out = ops.attention_stats_accumulate_(stats, _dev(q), _dev(k), _dev(v), 8**-0.5, _dev(mask), False, None)
    want_out, _ = ref.attention_stats(q, k, v, 8**-0.5, mask, False)
    got = out.cpu().double()
    assert torch.isfinite(got).all() and got[0, :, 1].abs().amax() > 0
    torch.testing.assert_close(got[0, :, [0, 2, 3]], want_out[0, :, [0, 2, 3]], rtol=0, atol=2e-2)
    torch.testing.assert_close(got[0, :, 1], want_out[0, :, 1], rtol=0, atol=0.25)  # the shift rounds in float16
