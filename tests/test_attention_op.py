"""attention_stats_accumulate_: the attention output and its rows' statistics in one pass,
against the float64 reference (output and statistics) and against the statistics op."""

import math

import pytest
import torch

from headprune import NUM_STATS, EntropyAccumulator
from headprune.core import ops
from headprune.core import reference as R
from headprune.core.build import load_extension
from numerics import assert_same_function

load_extension()  # the tests call torch.ops.headprune.* directly

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Statistics: absolute tolerance on per-row means (nats), as for the qk op (float32 math,
# plus the ~2e-6 relative error of the fused kernel's exponentials).
STATS_ATOL = {torch.float32: 2e-4, torch.float16: 2e-4, torch.bfloat16: 2e-4, torch.float64: 1e-9}
# Output: float32 accumulation; reduced-precision outputs are rounded to their dtype.
OUT_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def rand_qkv(B, Hq, Hkv, Q, K, D, Dv=None, dtype=torch.float32, gen=None):
    f = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return f(B, Hq, Q, D), f(B, Hkv, K, D), f(B, Hkv, K, Dv or D)


def fused(q, k, v, scale, attn_mask=None, is_causal=False, query_mask=None, stats=None):
    stats = torch.zeros(q.shape[1], NUM_STATS, dtype=torch.float64) if stats is None else stats
    out = ops.attention_stats_accumulate_(stats, q, k, v, scale, attn_mask, is_causal, query_mask)
    return out, stats


def assert_matches_reference(q, k, v, scale, attn_mask=None, is_causal=False, query_mask=None, dtype=torch.float32):
    out, stats = fused(q, k, v, scale, attn_mask, is_causal, query_mask)
    want_out, want = R.attention_stats(q, k, v, scale, attn_mask, is_causal, query_mask)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=OUT_ATOL[dtype] * max(1.0, v.abs().max().item()))
    assert torch.equal(stats[:, 0], want[:, 0])
    n = want[:, :1].clamp_min(1)
    torch.testing.assert_close(stats[:, 1:] / n, want[:, 1:] / n, rtol=0, atol=STATS_ATOL[dtype])
    return out, stats


CASES = [
    # B, Hq, Hkv, Q, K, D, Dv, causal
    (2, 4, 4, 9, 9, 16, 16, False),
    (1, 6, 2, 33, 70, 8, 12, True),  # GQA, causal with Q < K, value head_dim != key's
    (2, 3, 3, 1, 1, 4, 4, False),  # K = 1
    (1, 2, 1, 1, 130, 32, 32, True),  # one query row against a long cache
    (1, 2, 2, 70, 600, 64, 64, True),  # several key blocks
    (1, 2, 2, 130, 65, 5, 7, False),  # Q > K, odd sizes
    (1, 3, 1, 800, 1100, 8, 8, True),  # long-sequence query blocks (256 rows)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(dtype, case):
    B, Hq, Hkv, Q, K, D, Dv, causal = case
    g = torch.Generator().manual_seed(Q * K + D)
    q, k, v = rand_qkv(B, Hq, Hkv, Q, K, D, Dv, dtype, g)
    assert_matches_reference(q, k, v, D**-0.5 * 2, None, causal, dtype=dtype)


@pytest.mark.parametrize("kind", ["bool", "additive_inf", "additive_finfo", "additive_real"])
def test_masks_and_padding(kind):
    g = torch.Generator().manual_seed(7)
    B, H, Q, K, D = 2, 4, 21, 45, 16
    q, k, v = rand_qkv(B, H, 2, Q, K, D, gen=g)
    keep = torch.rand(B, 1, Q, K, generator=g) > 0.4
    keep[0, 0, 3] = False  # a fully masked row: zero output, not counted, never NaN
    if kind == "bool":
        mask = keep
    elif kind == "additive_inf":
        mask = torch.zeros(B, 1, Q, K).masked_fill(~keep, -math.inf)
    elif kind == "additive_finfo":
        mask = torch.zeros(B, 1, Q, K).masked_fill(~keep, torch.finfo(torch.float32).min)
    else:
        mask = torch.randn(1, H, Q, K, generator=g)
    qm = torch.ones(B, Q, dtype=torch.bool)
    qm[1, -5:] = False
    out, stats = assert_matches_reference(q, k, v, 0.3, mask, True, qm)
    assert torch.isfinite(out).all()
    if kind != "additive_real":
        assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
        assert stats[0, 0] < B * Q


def test_equals_the_statistics_op_and_sdpa():
    g = torch.Generator().manual_seed(3)
    q, k, v = rand_qkv(2, 6, 3, 300, 300, 32, gen=g)
    mask = torch.rand(2, 1, 300, 300, generator=g) > 0.1
    out, stats = fused(q, k, v, 0.2, mask, False)
    want = torch.zeros_like(stats)
    ops.entropy_stats_from_qk_accumulate_(want, q, k, 0.2, mask, False)
    assert torch.equal(stats[:, 0], want[:, 0])
    torch.testing.assert_close(stats, want, rtol=1e-5, atol=0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=0.2, enable_gqa=True)
    # two kernels that block their sums by instruction set: each against the float64 reference
    assert_same_function({"fused": out, "sdpa": sdpa}, R.attention_stats(q, k, v, 0.2, mask, False)[0])


def test_non_contiguous_hf_layout():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 30, 6, 8, generator=g).transpose(1, 2)
    k = torch.randn(2, 30, 3, 8, generator=g).transpose(1, 2)
    v = torch.randn(2, 30, 3, 8, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    assert_matches_reference(q, k, v, 0.35, None, True)


def test_dominant_first_key_keeps_the_other_keys_statistics():
    """A sink 100+ nats above every other logit: the output weights of the other keys
    underflow float32 next to it, their statistics must not (they are kept apart)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = rand_qkv(1, 2, 2, 40, 700, 16, gen=g)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    q = q * 0.5 + 3 * u
    k[:, :, 0] = 80 * u  # every query aligns with key 0
    z = R.attention_logits(q, k, 1.0)
    assert ((z[..., 0] - z[..., 1:].amax(-1)) > 100).all()
    out, stats = assert_matches_reference(q, k, v, 1.0, None, False)
    want = R.entropy_stats_from_qk(q, k, 1.0)
    assert (want[:, 4] == want[:, 0]).all()  # the sink holds all the (float64) mass
    torch.testing.assert_close(stats[:, 5], want[:, 5], rtol=1e-5, atol=0)
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out), rtol=0, atol=0)


def test_long_rows_and_uniform_rows():
    g = torch.Generator().manual_seed(11)
    q, k, v = rand_qkv(1, 2, 2, 3, 8192, 16, gen=g)
    assert_matches_reference(q, k, v, 0.5)
    out, stats = fused(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 5000, 4), torch.ones(1, 1, 5000, 3), 1.0)
    assert stats[0, 1].item() / 2 == pytest.approx(math.log(5000), abs=1e-5)
    torch.testing.assert_close(out, torch.ones_like(out), rtol=0, atol=1e-5)


def test_accumulates_and_chunks_equal_one_shot():
    g = torch.Generator().manual_seed(17)
    q, k, v = rand_qkv(6, 3, 3, 12, 12, 8, gen=g)
    one_out, one = fused(q, k, v, 0.5, None, True)
    parts = torch.zeros_like(one)
    outs = [fused(q[i : i + 2], k[i : i + 2], v[i : i + 2], 0.5, None, True, stats=parts)[0] for i in range(0, 6, 2)]
    torch.testing.assert_close(parts, one, rtol=1e-13, atol=1e-12)
    assert torch.equal(torch.cat(outs), one_out)


def test_nan_raises_and_leaves_stats_unchanged():
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 8, gen=torch.Generator().manual_seed(31))
    q[0, 1, 0, 0] = float("nan")
    stats = torch.ones(2, NUM_STATS, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fused(q, k, v, 1.0, stats=stats)
    assert torch.equal(stats, torch.ones_like(stats))


def _qkv():
    g = torch.Generator().manual_seed(29)
    return torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 3, generator=g)


BAD = [
    ("value rank", lambda q, k, v: (q, k, v[0]), ValueError, "value: expected a 4-D"),
    ("value keys", lambda q, k, v: (q, k, v[:, :, :5]), ValueError, r"value: expected \[B, Hkv, K\]"),
    ("value heads", lambda q, k, v: (q, k, v[:, :1]), ValueError, r"value: expected \[B, Hkv, K\]"),
    ("value dtype", lambda q, k, v: (q, k, v.double()), TypeError, "value: expected the dtype"),
    ("key head_dim", lambda q, k, v: (q, k[..., :4], v), ValueError, "key: head_dim 4 does not match"),
    ("gqa", lambda q, k, v: (q[:, :3], k, v), ValueError, "must be a multiple of key heads"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_named(name, make, exc, msg):
    q, k, v = make(*_qkv())
    stats = torch.ones(q.shape[1], NUM_STATS, dtype=torch.float64)
    with pytest.raises(exc, match=msg):
        ops.attention_stats_accumulate_(stats, q, k, v, 0.5)
    assert torch.equal(stats, torch.ones_like(stats))


def test_opcheck_and_compile():
    g = torch.Generator().manual_seed(0)
    q, k, v = rand_qkv(2, 4, 2, 5, 7, 8, 6, gen=g)
    qm = torch.rand(2, 5, generator=g) > 0.3
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.2
    stats = torch.zeros(4, NUM_STATS, dtype=torch.float64)
    torch.library.opcheck(torch.ops.headprune.attention_stats_accumulate_, (stats, q, k, v, 0.3, mask, True, qm))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(stats, q, k, v):
        out = ops.attention_stats_accumulate_(stats, q, k, v, 0.5, None, True, None)
        return out * 1, stats * 1

    out, got = f(torch.zeros(4, NUM_STATS, dtype=torch.float64), q, k, v)
    want_out, want = R.attention_stats(q, k, v, 0.5, None, True)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_accumulator_attend():
    g = torch.Generator().manual_seed(37)
    q, k, v = rand_qkv(2, 4, 2, 9, 12, 8, 5, gen=g)
    acc = EntropyAccumulator(4)
    out = acc.attention_stats(q, k, v, 0.4, is_causal=True)
    want_out, want = R.attention_stats(q, k, v, 0.4, None, True)
    torch.testing.assert_close(out.double(), want_out, rtol=0, atol=2e-5)
    torch.testing.assert_close(acc.stats, want, rtol=0, atol=1e-4)
    assert torch.equal(acc.count, torch.full((4,), 2 * 9))
