"""Native entropy ops against the float64 pure-PyTorch reference."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from headprune import NUM_STATS
from headprune.core import ops
from headprune.core import reference as R

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Absolute tolerance on a per-head mean row entropy (nats). Reduced-precision inputs are
# widened exactly, so the same float32 math applies to them.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-10}


def rand_probs(B, H, Q, K, dtype=torch.float32, sharp=3.0, gen=None):
    z = torch.randn(B, H, Q, K, generator=gen, dtype=torch.float64) * sharp
    return torch.softmax(z, -1).to(dtype)


def stats_probs(probs, query_mask=None, eps=1e-8):
    s = torch.zeros(probs.shape[1], NUM_STATS, dtype=torch.float64)
    ops.entropy_stats_from_probs_accumulate_(s, probs, query_mask, eps)
    return s


def stats_qk(q, k, scale, attn_mask=None, is_causal=False, query_mask=None):
    s = torch.zeros(q.shape[1], NUM_STATS, dtype=torch.float64)
    ops.entropy_stats_from_qk_accumulate_(s, q, k, scale, attn_mask, is_causal, query_mask)
    return s


def assert_stats_close(got, want, atol):
    """Counts equal; every other column compared as a per-row mean."""
    torch.testing.assert_close(got[:, 0], want[:, 0], rtol=0, atol=0)
    n = want[:, :1].clamp_min(1)
    torch.testing.assert_close(got[:, 1:] / n, want[:, 1:] / n, rtol=0, atol=atol)


# ------------------------------------------------------------------------------ from probs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (3, 2, 17, 33), (1, 2, 3, 4099)])
def test_entropy_from_probs_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    p = rand_probs(*shape, dtype=dtype, gen=g)
    assert_stats_close(stats_probs(p), R.entropy_stats_from_probs(p), ATOL[dtype] * 10)
    sums = torch.zeros(shape[1], dtype=torch.float64)
    counts = torch.zeros(shape[1], dtype=torch.int64)
    ops.entropy_from_probs_accumulate_(sums, counts, p)
    want_s, want_c = R.entropy_from_probs(p)
    assert torch.equal(counts, want_c)
    torch.testing.assert_close(sums / counts, want_s / want_c, rtol=0, atol=ATOL[dtype] * 10)


def test_entropy_from_probs_non_contiguous_and_padding():
    g = torch.Generator().manual_seed(1)
    base = rand_probs(2, 3, 40, 24, gen=g)  # [B, H, K', Q'] then transposed: stride(-1) != 1
    p = base.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert p.stride(-1) != 1
    qm = torch.rand(2, 40, generator=g) > 0.3
    assert_stats_close(stats_probs(p, qm), R.entropy_stats_from_probs(p, qm), 1e-5)
    sliced = rand_probs(2, 6, 9, 50, gen=g)[:, ::2, :, 3:40]  # strided heads, offset keys
    assert_stats_close(stats_probs(sliced), R.entropy_stats_from_probs(sliced), 1e-5)


def test_entropy_from_probs_exact_values():
    K = 37
    uniform = torch.full((1, 1, 4, K), 1.0 / K)
    s = stats_probs(uniform, eps=0.0)
    assert s[0, 1].item() / 4 == pytest.approx(math.log(K), abs=1e-5)
    onehot = torch.zeros(1, 2, 3, 8)
    onehot[..., 5] = 1.0
    s = stats_probs(onehot, eps=0.0)
    assert torch.all(s[:, 1] == 0) and torch.all(s[:, 0] == 3) and torch.all(s[:, 4] == 3)  # p_first = 1
    zero_rows = rand_probs(1, 2, 5, 6)
    zero_rows[0, :, 1] = 0.0  # a fully masked row is not counted
    zero_rows[0, :, 2, :3] = 0.0  # exact zeros inside a row
    zero_rows[0, :, 2] /= zero_rows[0, :, 2].sum(-1, keepdim=True)
    s = stats_probs(zero_rows)
    assert torch.all(s[:, 0] == 4)
    assert_stats_close(s, R.entropy_stats_from_probs(zero_rows), 1e-5)


# --------------------------------------------------------------------------------- from qk


def rand_qk(B, Hq, Hkv, Q, K, D, dtype=torch.float32, gen=None):
    q = torch.randn(B, Hq, Q, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, K, D, generator=gen, dtype=torch.float64).to(dtype)
    return q, k


QK_CASES = [
    # B, Hq, Hkv, Q, K, D, causal
    (2, 4, 4, 9, 9, 16, False),
    (1, 6, 2, 33, 70, 8, True),  # GQA, causal with Q < K (cached decoding)
    (2, 3, 3, 1, 1, 4, False),  # K = 1
    (1, 2, 1, 1, 130, 32, True),  # one query row against a long cache
    (1, 2, 2, 70, 600, 64, True),  # several key blocks
    (1, 2, 2, 130, 65, 5, False),  # Q > K, odd D
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", QK_CASES)
def test_entropy_from_qk_matches_reference(dtype, case):
    B, Hq, Hkv, Q, K, D, causal = case
    g = torch.Generator().manual_seed(Q * K + D)
    q, k = rand_qk(B, Hq, Hkv, Q, K, D, dtype, g)
    scale = D**-0.5 * 2
    want = R.entropy_stats_from_qk(q, k, scale, None, causal)
    assert_stats_close(stats_qk(q, k, scale, None, causal), want, ATOL[dtype] * 10)
    sums = torch.zeros(Hq, dtype=torch.float64)
    counts = torch.zeros(Hq, dtype=torch.int64)
    ops.entropy_from_qk_accumulate_(sums, counts, q, k, scale, None, causal)
    assert torch.equal(counts, want[:, 0].long())
    torch.testing.assert_close(sums, want[:, 1], rtol=0, atol=ATOL[dtype] * 10 * want[:, 0].max().item())


@pytest.mark.parametrize("kind", ["bool", "additive_inf", "additive_finfo", "additive_real"])
def test_entropy_from_qk_masks(kind):
    g = torch.Generator().manual_seed(7)
    B, H, Q, K, D = 2, 4, 21, 45, 16
    q, k = rand_qk(B, H, 2, Q, K, D, gen=g)
    keep = torch.rand(B, 1, Q, K, generator=g) > 0.4
    keep[0, 0, 3] = False  # a fully masked row: excluded, never NaN
    if kind == "bool":
        mask = keep
    elif kind == "additive_inf":
        mask = torch.zeros(B, 1, Q, K).masked_fill(~keep, -math.inf)
    elif kind == "additive_finfo":
        mask = torch.zeros(B, 1, Q, K).masked_fill(~keep, torch.finfo(torch.float32).min)
    else:  # real-valued bias (e.g. ALiBi / relative position), broadcast over batch
        mask = torch.randn(1, H, Q, K, generator=g)
    qm = torch.ones(B, Q, dtype=torch.bool)
    qm[1, -5:] = False
    want = R.entropy_stats_from_qk(q, k, 0.3, mask, True, qm)
    got = stats_qk(q, k, 0.3, mask, True, qm)
    assert_stats_close(got, want, 2e-5)
    if kind != "additive_real":
        assert got[0, 0] < B * Q  # the masked row and padded queries are not counted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_an_additive_mask_of_another_float_type_reads_as_converted(dtype):
    """A float mask of another type than the math's (float32 for half inputs) adds what it adds
    converted first, bit for bit, whatever its layout (the kernels convert it block by block
    instead of copying it whole), in the statistics and in the fused attention's output."""
    g = torch.Generator().manual_seed(5)
    B, H, Q, K, D = 2, 4, 70, 600, 8  # more than one key block
    q, k = rand_qk(B, H, 2, Q, K, D, gen=g)
    q, k = q.to(dtype), k.to(dtype)
    v = torch.randn(B, 2, K, 4, generator=g).to(dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    bias = torch.randn(B, 1, Q, K, generator=g).masked_fill(torch.rand(B, 1, Q, K, generator=g) > 0.7, -math.inf)
    for mtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for mask in (bias.to(mtype), bias.to(mtype).transpose(-1, -2).contiguous().transpose(-1, -2)):
            same = mask.to(compute)
            assert torch.equal(stats_qk(q, k, 0.3, mask, True), stats_qk(q, k, 0.3, same, True)), (mtype, mask.stride())
            a, b = (torch.zeros(H, NUM_STATS, dtype=torch.float64) for _ in range(2))
            out = ops.attention_stats_accumulate_(a, q, k, v, 0.3, mask, True)
            assert torch.equal(out, ops.attention_stats_accumulate_(b, q, k, v, 0.3, same, True)) and torch.equal(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_a_half_precision_mask_is_not_copied_whole():
    """The QK op's extra memory is per block, never O(Q * K): a bfloat16 [1, 1, 8192, 8192]
    mask (128 MiB) was converted to a float32 copy (256 MiB) before the kernel ran. Measured
    as the growth of the peak resident size of a fresh process across the call."""
    code = textwrap.dedent("""
        import resource, torch
        from headprune import NUM_STATS
        from headprune.core import ops
        torch.set_num_threads(1)
        n = 8192
        q, k = torch.randn(1, 1, n, 8, dtype=torch.bfloat16), torch.randn(1, 1, n, 8, dtype=torch.bfloat16)
        mask = torch.zeros(1, 1, n, n, dtype=torch.bfloat16)
        s = torch.zeros(1, NUM_STATS, dtype=torch.float64)
        ops.entropy_stats_from_qk_accumulate_(s, q[:, :, :8], k[:, :, :64], 0.3, mask[..., :8, :64])  # warm
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ops.entropy_stats_from_qk_accumulate_(s, q, k, 0.3, mask)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    grown_mib = int(out.stdout.split()[-1]) / 1024
    assert grown_mib < 32, f"peak resident size grew {grown_mib:.0f} MiB across the call"


def test_inputs_that_require_grad_under_no_grad_on_every_thread():
    """Under torch.no_grad(), inputs that require grad give what their detached values give, also
    where the work is split over threads (torch's parallel regions do not carry the caller's grad
    mode: the GEMMs of the other threads refused the inputs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(9)
        w = torch.randn(16, 16, generator=g, requires_grad=True)
        q, k, v = (torch.randn(1, 4, n, 16, generator=g) @ w for n in (256, 1024, 1024))
        assert q.requires_grad and k.requires_grad and v.requires_grad
        with torch.no_grad():
            got = stats_qk(q, k, 0.25, None, True)
            stats = torch.zeros(4, NUM_STATS, dtype=torch.float64)
            out = ops.attention_stats_accumulate_(stats, q, k, v, 0.25, None, True)
        assert torch.equal(got, stats_qk(q.detach(), k.detach(), 0.25, None, True))
        again = torch.zeros(4, NUM_STATS, dtype=torch.float64)
        assert torch.equal(out, ops.attention_stats_accumulate_(again, q.detach(), k.detach(), v.detach(), 0.25, None,
                                                                True)) and torch.equal(stats, again)
    finally:
        torch.set_num_threads(threads)


def test_entropy_from_qk_non_contiguous_hf_layout():
    g = torch.Generator().manual_seed(3)
    # transformers keeps [B, S, H, D] and transposes: stride(-1) == 1 but heads interleaved
    q = torch.randn(2, 30, 6, 8, generator=g).transpose(1, 2)
    k = torch.randn(2, 30, 3, 8, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    assert_stats_close(stats_qk(q, k, 0.35, None, True), R.entropy_stats_from_qk(q, k, 0.35, None, True), 2e-5)
    kt = torch.randn(2, 3, 8, 30, generator=g).transpose(-1, -2)  # stride(-1) != 1
    assert_stats_close(stats_qk(q, kt, 0.35), R.entropy_stats_from_qk(q, kt, 0.35), 2e-5)


def test_entropy_from_qk_long_rows_precision():
    g = torch.Generator().manual_seed(11)
    q, k = rand_qk(1, 2, 2, 3, 32768, 16, gen=g)
    got = stats_qk(q, k, 0.5)
    want = R.entropy_stats_from_qk(q, k, 0.5)
    assert_stats_close(got, want, 2e-5)
    uniform = stats_qk(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 32768, 4), 1.0)
    assert uniform[0, 1].item() / 2 == pytest.approx(math.log(32768), abs=1e-6)


def test_entropy_from_qk_large_logits_stay_finite():
    """Peaked rows with logits ~1e3: the relative-shift form avoids cancellation."""
    g = torch.Generator().manual_seed(5)
    q, k = rand_qk(1, 2, 2, 8, 40, 16, gen=g)
    assert_stats_close(stats_qk(q * 30, k * 30, 1.0), R.entropy_stats_from_qk(q * 30, k * 30, 1.0), 1e-4)


def test_qk_equals_probs_of_softmax():
    g = torch.Generator().manual_seed(13)
    q, k = rand_qk(2, 4, 2, 19, 19, 8, gen=g)
    mask = torch.rand(2, 1, 19, 19, generator=g) > 0.2
    mask[..., 0] = True
    z = R.attention_logits(q, k, 0.4, mask, True)
    probs = torch.softmax(z, -1).float()
    assert_stats_close(stats_qk(q, k, 0.4, mask, True)[:, :3], stats_probs(probs, eps=0.0)[:, :3], 2e-5)


def test_chunked_accumulation_equals_one_shot():
    g = torch.Generator().manual_seed(17)
    q, k = rand_qk(6, 3, 3, 12, 12, 8, gen=g)
    one = stats_qk(q, k, 0.5, None, True)
    parts = torch.zeros_like(one)
    for i in range(0, 6, 2):
        ops.entropy_stats_from_qk_accumulate_(parts, q[i : i + 2], k[i : i + 2], 0.5, None, True)
    torch.testing.assert_close(parts, one, rtol=1e-13, atol=1e-12)


def test_nan_policy_raises_and_leaves_accumulators_unchanged():
    p = rand_probs(1, 2, 3, 5)
    p[0, 1, 2, 3] = float("nan")
    stats = torch.ones(2, NUM_STATS, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.entropy_stats_from_probs_accumulate_(stats, p)
    assert torch.equal(stats, torch.ones_like(stats))
    q, k = rand_qk(1, 2, 2, 4, 4, 8, gen=torch.Generator().manual_seed(23))
    q[..., 2] = q[..., 2].abs() + 0.1  # so the infinite key component gives +inf logits, not masked -inf
    k[0, 0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.entropy_stats_from_qk_accumulate_(stats, q, k, 1.0)
    q[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.entropy_stats_from_qk_accumulate_(stats, q, k * 0, 1.0)
    assert torch.equal(stats, torch.ones_like(stats))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_rule(dtype):
    """Kernel error vs float64 at most 2x that of a naive same-dtype PyTorch computation."""
    g = torch.Generator().manual_seed(19)
    q, k = rand_qk(1, 4, 4, 64, 300, 32, dtype, g)
    want = R.entropy_stats_from_qk(q, k, 32**-0.5, None, True)[:, 1]
    got = stats_qk(q, k, 32**-0.5, None, True)[:, 1]
    z = (q @ k.transpose(-1, -2)) * 32**-0.5
    z = z.masked_fill(torch.ones(64, 300, dtype=torch.bool).triu(300 - 64 + 1), float("-inf"))
    p = torch.softmax(z, -1)
    naive = (-torch.xlogy(p, p).sum(-1)).double().sum((0, 2))  # p log(p + 1e-8) is NaN in float16
    assert (got - want).abs().max() <= 2 * (naive - want).abs().max() + 1e-6


def _rest_entropy_exact(row, eps):
    """H_rest of one row of floats, by math.fsum over Python floats (float64 log of each
    entry, subnormals included): log(s) - sum (p / s) log(p + eps) over the entries after
    the first non-zero one."""
    rest = [p for p in row[next(i for i, p in enumerate(row) if p != 0) + 1 :] if p != 0]
    s = math.fsum(rest)
    return math.log(s) - math.fsum(p / s * math.log(p + eps) for p in rest)


@pytest.mark.parametrize("eps", [0.0, 1e-310])
def test_reference_rest_entropy_of_float64_subnormals(eps):
    """The float64 reference itself, where the rest of a row is subnormal in float64: no
    clamp of p + eps or of the rest's mass to a floor (which made it -2072 nats)."""
    tiny = torch.finfo(torch.float64).tiny
    rows = [
        [0.5, 0.25 * tiny, 0.5 * tiny, 3 * 2.0**-1074, 0.0, 2.0**-1074],
        [1.0, 0.0, 2.0**-1074, 2.0**-1074],  # the smallest subnormal twice: log 2
        [0.0, 0.3 * tiny, 0.9 * tiny, 1e-5, 0.7],  # normal and subnormal mixed
    ]
    for row in rows:
        p = torch.tensor(row, dtype=torch.float64).view(1, 1, 1, -1)
        H, n, p_first, H_rest = R.row_stats_from_probs(p, eps)
        assert n.item() == sum(x != 0 for x in row)
        assert H_rest.item() == pytest.approx(_rest_entropy_exact(row, eps), rel=1e-12, abs=1e-12)
