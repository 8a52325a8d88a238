"""Op contracts: opcheck, bad input, head masks, the accumulator, every CPU instruction set."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import headprune
from headprune import NUM_STATS, EntropyAccumulator
from headprune.core import ops
from headprune.core import reference as R
from headprune.core.build import load_extension

load_extension()  # the tests call torch.ops.headprune.* directly

OPS = torch.ops.headprune


def _acc(h):
    return torch.zeros(h, dtype=torch.float64), torch.zeros(h, dtype=torch.int64)


# ------------------------------------------------------------------------------- opcheck


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 5, 6, generator=g), -1)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 7, 8, generator=g)
    qm = torch.rand(2, 5, generator=g) > 0.3
    mask = torch.rand(2, 1, 5, 7, generator=g) > 0.2
    s3, c3 = _acc(3)
    s4, c4 = _acc(4)
    return [
        (OPS.entropy_from_probs_accumulate_, (s3, c3, p, qm, 1e-8)),
        (OPS.entropy_stats_from_probs_accumulate_, (torch.zeros(3, NUM_STATS, dtype=torch.float64), p, None, 1e-8)),
        (OPS.entropy_from_qk_accumulate_, (s4, c4, q, k, 0.3, mask, True, qm)),
        (OPS.entropy_stats_from_qk_accumulate_, (torch.zeros(4, NUM_STATS, dtype=torch.float64), q, k, 0.3, None, False, None)),
        (OPS.apply_head_mask_, (torch.randn(6, 12, generator=g), torch.tensor([1.0, 0.0, 0.5]), 4, 1)),
    ]


@pytest.mark.parametrize("sample", range(5))
def test_opcheck(sample):
    op, args = _opcheck_samples()[sample]
    torch.library.opcheck(op, args)


def test_ops_trace_under_torch_compile():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(stats, q, k):
        ops.entropy_stats_from_qk_accumulate_(stats, q, k, 0.5, None, True, None)
        return stats * 1

    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    got = f(torch.zeros(2, NUM_STATS, dtype=torch.float64), q, k)
    torch.testing.assert_close(got, R.entropy_stats_from_qk(q, k, 0.5, None, True), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- hypothesis


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 3), G=st.integers(1, 3), Hkv=st.integers(1, 3), Q=st.integers(1, 40),
    K=st.integers(1, 70), D=st.integers(1, 20), causal=st.booleans(), scale=st.floats(0.01, 3.0),
    seed=st.integers(0, 2**31 - 1), masked=st.booleans(),
)
def test_entropy_from_qk_property(B, G, Hkv, Q, K, D, causal, scale, seed, masked):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, G * Hkv, Q, D, generator=g)
    k = torch.randn(B, Hkv, K, D, generator=g)
    mask = (torch.rand(B, 1, Q, K, generator=g) > 0.3) if masked else None
    got = torch.zeros(G * Hkv, NUM_STATS, dtype=torch.float64)
    ops.entropy_stats_from_qk_accumulate_(got, q, k, scale, mask, causal, None)
    want = R.entropy_stats_from_qk(q, k, scale, mask, causal)
    assert torch.equal(got[:, 0], want[:, 0])
    n = want[:, :1].clamp_min(1)
    torch.testing.assert_close(got / n, want / n, rtol=0, atol=5e-5)
    assert torch.all(got[:, 1] >= -1e-6)  # entropies are non-negative


@settings(max_examples=40, deadline=None, derandomize=True)
@given(B=st.integers(1, 3), H=st.integers(1, 4), Q=st.integers(1, 20), K=st.integers(1, 300),
       sharp=st.floats(0.0, 20.0), seed=st.integers(0, 2**31 - 1))
def test_entropy_from_probs_property(B, H, Q, K, sharp, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, H, Q, K, generator=g) * sharp, -1)
    got = torch.zeros(H, NUM_STATS, dtype=torch.float64)
    ops.entropy_stats_from_probs_accumulate_(got, p)
    want = R.entropy_stats_from_probs(p)
    assert torch.equal(got[:, 0], want[:, 0])
    torch.testing.assert_close(got / want[:, :1], want / want[:, :1], rtol=0, atol=5e-5)


# ----------------------------------------------------------------------------- bad input


def _p():
    return torch.softmax(torch.randn(2, 3, 4, 5), -1)


def _qk():
    return torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8)


BAD_PROBS = [
    ("rank", lambda: (*_acc(3), _p()[0]), ValueError, "probs: expected a 4-D"),
    ("int dtype", lambda: (*_acc(3), _p().long()), TypeError, "probs: expected float16"),
    ("complex", lambda: (*_acc(3), _p().to(torch.complex64)), TypeError, "probs: expected float16"),
    ("sums dtype", lambda: (torch.zeros(3), _acc(3)[1], _p()), TypeError, "sums: expected a float64"),
    ("sums size", lambda: (*_acc(4), _p()), ValueError, r"sums: expected shape \[3\]"),
    ("counts dtype", lambda: (_acc(3)[0], torch.zeros(3, dtype=torch.float64), _p()), TypeError, "counts: expected an int64"),
    ("query_mask dtype", lambda: (*_acc(3), _p(), torch.ones(2, 4)), TypeError, "query_mask: expected a bool"),
    ("query_mask shape", lambda: (*_acc(3), _p(), torch.ones(2, 5, dtype=torch.bool)), ValueError, r"query_mask: expected shape \[2, 4\]"),
    ("eps", lambda: (*_acc(3), _p(), None, -1.0), ValueError, "eps: expected a finite value"),
]


@pytest.mark.parametrize("name,make,exc,msg", BAD_PROBS, ids=[c[0] for c in BAD_PROBS])
def test_entropy_from_probs_bad_input(name, make, exc, msg):
    args = make()
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args[:2]]
    with pytest.raises(exc, match=msg):
        ops.entropy_from_probs_accumulate_(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[:2], before))


BAD_QK = [
    ("query rank", lambda q, k: (q[0], k), {}, ValueError, "query: expected a 4-D"),
    ("key rank", lambda q, k: (q, k[0]), {}, ValueError, "key: expected a 4-D"),
    ("batch", lambda q, k: (q, k[:1]), {}, ValueError, "key: batch size 1 does not match"),
    ("head_dim", lambda q, k: (q, k[..., :4]), {}, ValueError, "key: head_dim 4 does not match"),
    ("heads", lambda q, k: (q[:, :3], k), {}, ValueError, r"query: expected 4 heads \(dim 1\) for this accumulator"),
    ("int dtype", lambda q, k: (q.long(), k.long()), {}, TypeError, "query: expected float16"),
    ("dtype mismatch", lambda q, k: (q, k.double()), {}, TypeError, "key: expected the dtype of query"),
    ("mask shape", lambda q, k: (q, k), {"attn_mask": torch.ones(2, 1, 5, 7, dtype=torch.bool)}, ValueError, "attn_mask: shape"),
    ("mask dtype", lambda q, k: (q, k), {"attn_mask": torch.ones(5, 6, dtype=torch.int32)}, TypeError, "attn_mask: expected a bool or floating"),
    ("scale", lambda q, k: (q, k), {"scale": float("nan")}, ValueError, "scale: expected a finite"),
]


@pytest.mark.parametrize("name,make,kw,exc,msg", BAD_QK, ids=[c[0] for c in BAD_QK])
def test_entropy_from_qk_bad_input(name, make, kw, exc, msg):
    q, k = make(*_qk())
    acc = EntropyAccumulator(4)
    acc.stats += 1
    kw = {"scale": 0.5, **kw}
    with pytest.raises(exc, match=msg):
        acc.entropy_stats_from_qk(q, k, kw.pop("scale"), **kw)
    assert torch.equal(acc.stats, torch.ones_like(acc.stats))


def test_wrong_accumulator_size_for_qk():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"stats: expected shape \[4, 6\]"):
        ops.entropy_stats_from_qk_accumulate_(torch.zeros(3, NUM_STATS, dtype=torch.float64), q, k, 1.0)
    with pytest.raises(ValueError, match=r"sums: expected shape \[4\]"):
        ops.entropy_from_qk_accumulate_(*_acc(2), q, k, 1.0)
    with pytest.raises(ValueError, match=r"must be a multiple of key heads"):
        ops.entropy_stats_from_qk_accumulate_(torch.zeros(3, NUM_STATS, dtype=torch.float64), q[:, :3], k, 1.0)


# ----------------------------------------------------------------------------- head mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_apply_head_mask_matches_reference(dtype, dim):
    g = torch.Generator().manual_seed(dim + 5)
    x = torch.randn(12, 12, generator=g).to(dtype)
    if dim == -1:
        x = x.t()  # non-contiguous
    mask = torch.tensor([1.0, 0.0, 0.3])  # 0.3: not exact in half types, rounded to x's type first
    want = R.apply_head_mask(x, mask, 4, dim)
    ptr = x.data_ptr()
    ops.apply_head_mask_(x, mask, 4, dim)
    assert x.data_ptr() == ptr
    assert torch.equal(x, want)


def test_apply_head_mask_autograd():
    x0 = torch.randn(3, 8, requires_grad=True)
    gate = torch.tensor([1.0, 0.5], requires_grad=True)
    x = x0 * 1  # non-leaf: masked in place inside the graph
    ops.apply_head_mask_(x, gate, 4, 1)
    x.sum().backward()
    torch.testing.assert_close(x0.grad, torch.tensor([1.0] * 4 + [0.5] * 4).expand(3, 8))
    torch.testing.assert_close(gate.grad, x0.detach().view(3, 2, 4).sum((0, 2)))


def test_apply_head_mask_leaf_requires_grad():
    w = torch.nn.Parameter(torch.randn(4, 6))
    before = w.detach().clone()
    with pytest.raises(ValueError, match="x: is a leaf tensor that requires grad"):
        ops.apply_head_mask_(w, torch.tensor([0.0, 1.0]), 3, 1)
    assert torch.equal(w.detach(), before)
    with torch.no_grad():
        ops.apply_head_mask_(w, torch.tensor([0.0, 1.0]), 3, 1)
    assert torch.all(w[:, :3] == 0) and torch.equal(w[:, 3:], before[:, 3:])


@pytest.mark.parametrize(
    "args,exc,msg",
    [
        ((torch.randn(4, 6), torch.ones(2), 4, 1), ValueError, "does not equal num_heads"),
        ((torch.randn(4, 6), torch.ones(2, 1), 3, 1), ValueError, "mask: expected a 1-D"),
        ((torch.randn(4, 6), torch.ones(2), 3, 2), IndexError, "dim: expected in"),
        ((torch.randn(4, 6), torch.ones(2), 0, 1), ValueError, "head_dim: expected >= 1"),
        ((torch.ones(4, 6, dtype=torch.long), torch.ones(2), 3, 1), TypeError, "x: expected a floating"),
        ((torch.randn(4, 6), torch.ones(2, dtype=torch.long), 3, 1), TypeError, "mask: expected a floating or bool"),
    ],
)
def test_apply_head_mask_bad_input(args, exc, msg):
    before = args[0].clone()
    with pytest.raises(exc, match=msg):
        ops.apply_head_mask_(*args)
    assert torch.equal(args[0], before)


# --------------------------------------------------------------------------- accumulator


def test_accumulator_merge_state_and_means():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 3, 9, 8, generator=g), torch.randn(4, 3, 9, 8, generator=g)
    a, b, both = EntropyAccumulator(3), EntropyAccumulator(3), EntropyAccumulator(3)
    a.entropy_stats_from_qk(q[:2], k[:2], 0.4, is_causal=True)
    b.entropy_stats_from_qk(q[2:], k[2:], 0.4, is_causal=True)
    both.entropy_stats_from_qk(q, k, 0.4, is_causal=True)
    a.merge(b)
    torch.testing.assert_close(a.stats, both.stats, rtol=1e-14, atol=1e-12)
    rows = R.row_stats_from_logits(R.attention_logits(q, k, 0.4, None, True))
    H = rows[0].permute(1, 0, 2).reshape(3, -1)
    torch.testing.assert_close(a.mean(), H.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(a.std(), H.std(1, unbiased=False), rtol=0, atol=1e-5)
    assert torch.equal(a.count, torch.full((3,), 4 * 9))
    c = EntropyAccumulator(3)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.stats, a.stats)
    with pytest.raises(ValueError, match="other: expected 3 heads"):
        a.merge(EntropyAccumulator(2))
    with pytest.raises(ValueError, match=r"state: expected 'stats' of shape \(3, \d+\), got \(2, \d+\)"):
        c.load_state_dict({"stats": torch.zeros(2, NUM_STATS)})
    with pytest.raises(ValueError, match="num_heads: expected a positive int"):
        EntropyAccumulator(0)
    assert torch.isnan(EntropyAccumulator(2).mean()).all()


def test_an_input_of_another_head_count_names_itself():
    """The op named its `stats` argument, which an accumulator's caller never passes."""
    q = torch.randn(1, 4, 5, 8)
    for call, name in [(lambda a: a.entropy_stats_from_qk(q, q, 0.3), "query"),
                       (lambda a: a.attention_stats(q, q, q, 0.3), "query"),
                       (lambda a: a.entropy_stats_from_probs(torch.softmax(q, -1)), "probs")]:
        a = EntropyAccumulator(3)
        with pytest.raises(ValueError, match=rf"{name}: expected 3 heads \(dim 1\) for this accumulator of 3 heads, "
                                             r"got shape \[1, 4, 5, 8\]"):
            call(a)
        assert torch.equal(a.stats, torch.zeros_like(a.stats))


def test_std_of_identical_rows_is_zero_and_of_no_rows_nan():
    # E[H^2] - E[H]^2 of identical rows is rounding, not spread: reported as 0, not ~1e-8
    rows = torch.softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(5)), -1)
    probs = rows[None, :, None].expand(4, 3, 50, 7).contiguous()
    a = EntropyAccumulator(3).entropy_stats_from_probs(probs)
    assert torch.equal(a.std(), torch.zeros(3, dtype=torch.float64)) and (a.mean() > 0).all()
    assert EntropyAccumulator(2).std().isnan().all()


# ------------------------------------------------------------------- instruction sets


def _isas():
    info = headprune.build_info()["cpu_isas"].split(",")
    best = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    return [i for i in info if i in order and order.index(i) <= order.index(best if best in order else "DEFAULT")]


def _run_on_isa(isa, code):
    """Runs ``code`` in a fresh process on the instruction set ``isa`` (ATEN_CPU_CAPABILITY);
    it must print ok."""
    code = "import headprune\nisa = headprune.core.build.load_extension().cpu_isa()\nassert isa == {!r}, isa\n".format(isa) + code
    env = {**os.environ, "ATEN_CPU_CAPABILITY": isa.lower()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("isa", _isas())
def test_every_cpu_isa_matches_reference(isa):
    """Each compiled instruction set, forced through ATEN_CPU_CAPABILITY, in a fresh process."""
    _run_on_isa(isa, """
import torch
from headprune.core import ops, reference as R
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.float64, torch.bfloat16):
    q = torch.randn(2, 4, 37, 24, generator=g).to(dt); k = torch.randn(2, 2, 555, 24, generator=g).to(dt)
    m = torch.rand(2, 1, 37, 555, generator=g) > 0.2
    s = torch.zeros(4, 6, dtype=torch.float64)
    ops.entropy_stats_from_qk_accumulate_(s, q, k, 0.3, m, True, None)
    w = R.entropy_stats_from_qk(q, k, 0.3, m, True)
    assert torch.equal(s[:, 0], w[:, 0]) and ((s - w)[:, 1:] / w[:, :1]).abs().max() < 2e-5
    v = torch.randn(2, 2, 555, 20, generator=g).to(dt)
    s = torch.zeros(4, 6, dtype=torch.float64)
    out = ops.attention_stats_accumulate_(s, q, k, v, 0.3, m, True, None)
    wo, w = R.attention_stats(q, k, v, 0.3, m, True)
    assert torch.equal(s[:, 0], w[:, 0]) and ((s - w)[:, 1:] / w[:, :1]).abs().max() < 1e-4
    assert (out.double() - wo).abs().max() < (2e-5 if dt != torch.bfloat16 else 2e-2)
    p = torch.softmax(torch.randn(2, 3, 7, 1001, generator=g) * 4, -1).to(dt)
    s = torch.zeros(3, 6, dtype=torch.float64)
    ops.entropy_stats_from_probs_accumulate_(s, p)
    w = R.entropy_stats_from_probs(p)
    assert ((s - w)[:, 1:] / w[:, :1]).abs().max() < 2e-5
    if dt != torch.bfloat16:
        # The log near 1 (p log p of peaked rows): every float within 2048 steps of 1, one
        # head each, eps = 0. Relative accuracy, since log(x) -> 0 there.
        n = torch.arange(1, 2049, dtype=torch.float64)
        x = torch.cat([1 - n * 2.0**-24, 1 + n * 2.0**-23]).to(dt)
        p = x.view(1, -1, 1, 1).expand(1, x.numel(), 1, 32).contiguous()
        s = torch.zeros(x.numel(), 6, dtype=torch.float64)
        ops.entropy_stats_from_probs_accumulate_(s, p, None, 0.0)
        w = R.entropy_stats_from_probs(p.double(), eps=0.0)
        assert ((s - w)[:, 1] / w[:, 1]).abs().max() < 1e-6, ((s - w)[:, 1] / w[:, 1]).abs().max()
        # Rows of equal terms, whose float roundings all go one way: long rows too
        for K in (2048, 4097, 100000):
            p = torch.full((1, 1, 1, K), 1.0 / K).to(dt)
            s = torch.zeros(1, 6, dtype=torch.float64)
            ops.entropy_stats_from_probs_accumulate_(s, p)
            w = R.entropy_stats_from_probs(p)
            assert ((s - w)[:, 1] / w[:, 1]).abs().max() < 1e-6, (K, ((s - w)[:, 1] / w[:, 1]).abs().max())
print("ok")
""")


@pytest.mark.parametrize("isa", _isas())
def test_every_cpu_isa_probs_edge_values(isa):
    """Probabilities that are subnormal in the dtype the kernels compute in, eps = 0 and 1e-8:
    every statistic (the rest entropy included) as the float64 reference, one head per row.
    A negative probability anywhere in a row (first entry, vector body, tail, subnormal) is
    refused."""
    _run_on_isa(isa, """
import torch
from headprune.core import ops, reference as R
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    fi = torch.finfo(dt)
    tiny, least = fi.tiny, fi.tiny * fi.eps  # smallest normal, smallest subnormal
    K = 70
    sub = lambda n: (torch.rand(n, generator=g, dtype=torch.float64) * tiny).to(dt)
    rows = torch.zeros(7, K, dtype=dt)
    rows[0, 0], rows[0, 1:] = 0.5, sub(K - 1)  # subnormal rest (the reported 0.40 vs 3.87 nats)
    rows[1, 0], rows[1, 1:] = 1.0, least  # the smallest subnormal: rest entropy log(K - 1)
    rows[2] = sub(K)  # subnormal from the first entry on
    rows[3, 0], rows[3, 1:40], rows[3, 40:] = 0.75, sub(39), torch.full((K - 40,), 1e-37).to(dt)
    rows[4] = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 3, -1).to(dt)
    rows[4, 10:15] = sub(5)  # a few subnormals in a normal row
    rows[5, 3], rows[5, 4:] = 0.5, sub(K - 4)
    rows[5, 4::3] = 0.0  # zeros among them
    rows[6, 0], rows[6, 1:8] = 1.0, least * torch.arange(1, 8, dtype=torch.float64).to(dt)
    long = torch.zeros(1, 5000, dtype=dt)
    long[0, 0], long[0, 1:] = 0.5, sub(4999)  # past the float partial sums' flush
    for p in (rows.view(1, 7, 1, K), long.view(1, 1, 1, -1), rows.t().contiguous().t().view(1, 7, 1, K)):
        for eps in (0.0, 1e-8):
            s = torch.zeros(p.shape[1], 6, dtype=torch.float64)
            ops.entropy_stats_from_probs_accumulate_(s, p, None, eps)
            w = R.entropy_stats_from_probs(p, eps=eps)
            err = (s - w).abs().max(0).values
            # float16's subnormals are normal floats: the float32 sums' usual rounding
            tol = 1e-5 if dt == torch.float16 else 1e-6
            assert torch.equal(s[:, 0], w[:, 0]) and err.max() < tol, (dt, eps, p.shape, err, s[:, 5], w[:, 5])
    for j, value in ((0, -0.25), (1, -least), (37, -1.0), (69, -tiny)):
        p = rows.clone().view(1, 7, 1, K)
        p[0, 4, 0, j] = value
        s = torch.ones(7, 6, dtype=torch.float64)
        try:
            ops.entropy_stats_from_probs_accumulate_(s, p, None, 0.0)
            raise AssertionError(("negative accepted", dt, j))
        except ValueError as e:
            assert str(e).startswith("probs: expected probabilities >= 0"), e
        assert torch.equal(s, torch.ones_like(s))
print("ok")
""")

