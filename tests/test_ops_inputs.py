"""What the ops refuse, and that a refusal leaves the accumulators as they were: negative
probabilities, tensors on different devices, inputs that require grad (with opcheck on
such inputs), and scale / eps outside the range of the type the kernels compute in."""

import math

import pytest
import torch

from headprune import NUM_STATS
from headprune.core import ops
from headprune.core import reference as R
from headprune.core.build import load_extension

load_extension()  # the tests call torch.ops.headprune.* directly


NEGATIVE = {  # name: (index of the negative entry in a [2, 3, 4, 40] tensor, value)
    "first entry": ((1, 2, 3, 0), -0.5),
    "first non-zero": ((0, 1, 2, 6), -0.5),  # entries 0..5 of that row are zero
    "vector body": ((1, 0, 1, 17), -1e-3),
    "row tail": ((0, 2, 0, 39), -1e-3),
    "subnormal": ((1, 1, 1, 20), -1e-45),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NEGATIVE)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_negative_probability_is_refused(dtype, name, strided):
    index, value = NEGATIVE[name]
    p = torch.softmax(torch.randn(2, 3, 4, 40, generator=torch.Generator().manual_seed(3)), -1).to(dtype)
    p[0, 1, 2, :6] = 0.0
    if name == "subnormal":  # the dtype's own least subnormal (-1e-45 rounds to 0 in the 16-bit types)
        value = -torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    p[index] = value
    if strided:
        p = p.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert p[index] < 0
    stats = torch.ones(3, NUM_STATS, dtype=torch.float64)
    sums, counts = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.int64)
    where = r"at \[" + ", ".join(map(str, index)) + r"\]"
    with pytest.raises(ValueError, match=r"probs: expected probabilities >= 0, got -.* " + where):
        ops.entropy_stats_from_probs_accumulate_(stats, p)
    with pytest.raises(ValueError, match=r"probs: expected probabilities >= 0, got -.* " + where):
        ops.entropy_from_probs_accumulate_(sums, counts, p, None, 0.0)
    assert torch.equal(stats, torch.ones_like(stats))
    assert torch.equal(sums, torch.ones_like(sums)) and torch.equal(counts, torch.ones_like(counts))


def test_rows_the_query_mask_excludes():
    """As the docstring says: NaN in an excluded row is not read, a negative value there raises."""
    p = torch.softmax(torch.randn(2, 3, 4, 10, generator=torch.Generator().manual_seed(5)), -1)
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[1, 2] = False
    sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)
    ops.entropy_from_probs_accumulate_(sums, counts, p, keep, 0.0)
    q = p.clone()
    q[1, :, 2] = float("nan")
    s2, c2 = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)
    ops.entropy_from_probs_accumulate_(s2, c2, q, keep, 0.0)
    assert torch.equal(s2, sums) and torch.equal(c2, counts) and int(counts[0]) == 7
    with pytest.raises(ValueError, match="NaN or infinite"):
        ops.entropy_from_probs_accumulate_(s2, c2, q, None, 0.0)
    q[1, :, 2] = -0.25
    with pytest.raises(ValueError, match=r"probs: expected probabilities >= 0, got -0.25 at \[1, 0, 2, 0\]"):
        ops.entropy_from_probs_accumulate_(s2, c2, q, keep, 0.0)
    assert torch.equal(s2, sums) and torch.equal(c2, counts)


def test_what_the_fused_op_reads_for_its_statistics():
    """As docs/native.md says: a NaN in ``value`` reaches the output and leaves the statistics
    as they are with a clean value; a key whose logits are all -inf is a masked key; a NaN
    logit raises naming the inputs the statistics read, with nothing accumulated."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    clean = torch.zeros(2, NUM_STATS, dtype=torch.float64)
    ops.attention_stats_accumulate_(clean, q, k, v, 0.3)
    bad = v.clone()
    bad[0, 1, 3, 2] = float("nan")
    s = torch.zeros(2, NUM_STATS, dtype=torch.float64)
    out = ops.attention_stats_accumulate_(s, q, k, bad, 0.3)
    assert torch.equal(s, clean) and out[0, 1].isnan().any() and not out[0, 0].isnan().any()
    ones = torch.ones(1, 1, 5, 8).expand(1, 2, 5, 8)
    far = k.clone()
    far[:, :, 6, 0] = -float("inf")  # q . k = -inf for every query (q is all ones): key 6 is masked
    s, masked = torch.zeros(2, NUM_STATS, dtype=torch.float64), torch.zeros(2, NUM_STATS, dtype=torch.float64)
    ops.attention_stats_accumulate_(s, ones, far, v, 0.3)
    ops.attention_stats_accumulate_(masked, ones, k[:, :, :6], v[:, :, :6], 0.3)
    torch.testing.assert_close(s, masked, rtol=1e-12, atol=1e-12)
    far[:, :, 6, 1] = float("inf")  # -inf + inf: a NaN logit
    s = torch.zeros(2, NUM_STATS, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"NaN or infinite entropies \(NaN/inf in query/key/attn_mask\)"):
        ops.attention_stats_accumulate_(s, ones, far, v, 0.3)
    assert not s.any()


def test_negative_zero_is_a_zero():
    p = torch.softmax(torch.randn(1, 2, 3, 20, generator=torch.Generator().manual_seed(4)), -1)
    p[..., 3::4] = 0.0
    q = p.clone()
    q[..., 3::4] = -0.0
    assert torch.equal(stats_of(q), stats_of(p))


def stats_of(p, eps=1e-8):
    s = torch.zeros(p.shape[1], NUM_STATS, dtype=torch.float64)
    ops.entropy_stats_from_probs_accumulate_(s, p, None, eps)
    return s


# ------------------------------------------------------------------------------- samples

OPS = torch.ops.headprune
ACCUMULATORS = ("sums", "counts", "stats")


def _probs_tensors(acc):
    g = torch.Generator().manual_seed(0)
    t = {"probs": torch.softmax(torch.randn(2, 3, 4, 5, generator=g), -1), "query_mask": torch.rand(2, 4, generator=g) > 0.3}
    if acc == "stats":
        return {"stats": torch.zeros(3, NUM_STATS, dtype=torch.float64), **t}
    return {"sums": torch.zeros(3, dtype=torch.float64), "counts": torch.zeros(3, dtype=torch.int64), **t}


def _qk_tensors(acc, value=False):
    g = torch.Generator().manual_seed(1)
    t = {"query": torch.randn(2, 4, 5, 8, generator=g), "key": torch.randn(2, 2, 6, 8, generator=g)}
    if value:
        t["value"] = torch.randn(2, 2, 6, 3, generator=g)
    t["attn_mask"] = torch.randn(1, 4, 5, 6, generator=g)  # additive, so it can require grad
    t["query_mask"] = torch.rand(2, 5, generator=g) > 0.3
    if acc == "stats":
        return {"stats": torch.zeros(4, NUM_STATS, dtype=torch.float64), **t}
    return {"sums": torch.zeros(4, dtype=torch.float64), "counts": torch.zeros(4, dtype=torch.int64), **t}


# op name: (its tensor arguments by name, a call of the op on such a dict)
SAMPLES = {
    "entropy_from_probs_accumulate_": (
        lambda: _probs_tensors("sums"),
        lambda t: OPS.entropy_from_probs_accumulate_(t["sums"], t["counts"], t["probs"], t["query_mask"], 1e-8)),
    "entropy_stats_from_probs_accumulate_": (
        lambda: _probs_tensors("stats"),
        lambda t: OPS.entropy_stats_from_probs_accumulate_(t["stats"], t["probs"], t["query_mask"], 1e-8)),
    "entropy_from_qk_accumulate_": (
        lambda: _qk_tensors("sums"),
        lambda t: OPS.entropy_from_qk_accumulate_(t["sums"], t["counts"], t["query"], t["key"], 0.3, t["attn_mask"],
                                                  True, t["query_mask"])),
    "entropy_stats_from_qk_accumulate_": (
        lambda: _qk_tensors("stats"),
        lambda t: OPS.entropy_stats_from_qk_accumulate_(t["stats"], t["query"], t["key"], 0.3, t["attn_mask"], True,
                                                        t["query_mask"])),
    "attention_stats_accumulate_": (
        lambda: _qk_tensors("stats", value=True),
        lambda t: OPS.attention_stats_accumulate_(t["stats"], t["query"], t["key"], t["value"], 0.3, t["attn_mask"],
                                                  True, t["query_mask"])),
}


def _accumulators(t):
    return {n: x.detach().clone() for n, x in t.items() if n in ACCUMULATORS}


def _assert_unchanged(t, before):
    for n, x in before.items():
        assert torch.equal(t[n].detach(), x), f"{n} was changed"


# ------------------------------------------------------------------------------- devices


DEVICE_CASES = [(op, name) for op, (make, _) in SAMPLES.items() for name in make()]


@pytest.mark.parametrize("op,name", DEVICE_CASES, ids=[f"{o}-{n}" for o, n in DEVICE_CASES])
def test_device_mismatch_is_refused(op, name):
    """One tensor on the meta device, the others on the CPU: the call dispatches to the meta
    (fake) kernel, which refuses it as the CPU and CUDA kernels do, naming a tensor."""
    make, call = SAMPLES[op]
    t = make()
    t[name] = t[name].to("meta")
    before = {n: x for n, x in _accumulators(t).items() if x.device.type == "cpu"}
    with pytest.raises(ValueError, match=r"^\w+: expected (the )?device"):
        call(t)
    _assert_unchanged(t, before)


@pytest.mark.parametrize("op", SAMPLES)
def test_all_on_meta_infers_shapes(op):
    make, call = SAMPLES[op]
    t = {n: x.to("meta") for n, x in make().items()}
    out = call(t)
    if op == "attention_stats_accumulate_":
        assert out.device.type == "meta" and out.shape == (2, 4, 5, 3)


# ----------------------------------------------------------------------------- autograd


GRAD_CASES = [(op, name) for op, (make, _) in SAMPLES.items() for name, x in make().items() if x.is_floating_point()]


@pytest.mark.parametrize("op,name", GRAD_CASES, ids=[f"{o}-{n}" for o, n in GRAD_CASES])
def test_requires_grad_is_refused_under_grad_mode(op, name):
    """The ops are not differentiable: an input (or accumulator) that requires grad while grad
    mode is on is refused by name, before anything is accumulated; under torch.no_grad() the
    same call computes what it computes on detached tensors."""
    make, call = SAMPLES[op]
    t = make()
    t[name].requires_grad_(True)
    before = _accumulators(t)
    with pytest.raises(ValueError, match=rf"^{name}: requires grad; .* not differentiable: call .* under "
                                         r"torch.no_grad\(\) or on detached tensors"):
        call(t)
    _assert_unchanged(t, before)
    with torch.no_grad():
        out = call(t)
    detached = {n: x.detach().clone() if n in ACCUMULATORS else x.detach() for n, x in make().items()}
    want = call(detached)
    for n in before:
        assert torch.equal(t[n].detach(), detached[n])
    if out is not None:
        assert not out.requires_grad and torch.equal(out, want)


@pytest.mark.parametrize("op,name", GRAD_CASES, ids=[f"{o}-{n}" for o, n in GRAD_CASES])
def test_a_forward_mode_tangent_is_refused(op, name):
    """Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) ran the ops below autograd
    and dropped the tangent (a jvp came back zero); refused by name, under no_grad too."""
    import torch.autograd.forward_ad as fwAD

    make, call = SAMPLES[op]
    t = make()
    before = _accumulators(t)
    with fwAD.dual_level(), torch.no_grad(), pytest.raises(ValueError, match=rf"^{name}: carries a forward-mode"):
        call({**t, name: fwAD.make_dual(t[name], torch.ones_like(t[name]))})
    _assert_unchanged(t, before)


@pytest.mark.parametrize("op", SAMPLES)
def test_opcheck_with_inputs_that_require_grad(op):
    """opcheck's every test, with every floating input requiring grad. The eager calls run
    under torch.no_grad() (under grad mode the op refuses these inputs, see above); the
    autograd-registration test then finds the Autograd kernel, also under grad mode."""
    make, call = SAMPLES[op]
    t = make()
    for n, x in t.items():
        if x.is_floating_point() and n not in ACCUMULATORS:
            x.requires_grad_(True)
    overload = getattr(OPS, op).default
    args = tuple(t[a.name] if a.name in t else None for a in overload._schema.arguments)
    args = tuple(_SCALARS.get(a.name, x) if x is None else x for a, x in zip(overload._schema.arguments, args))
    with torch.no_grad():
        torch.library.opcheck(overload, args)
    torch.library.opcheck(overload, args, test_utils="test_autograd_registration")


_SCALARS = {"eps": 1e-8, "scale": 0.3, "is_causal": True}


def test_accumulator_version_is_bumped():
    """An accumulator saved for backward somewhere and then added to must be detected."""
    make, call = SAMPLES["entropy_stats_from_qk_accumulate_"]
    t = make()
    version = t["stats"]._version
    call(t)
    assert t["stats"]._version > version


# --------------------------------------------------------------------------- scale / eps

QK_OPS = ["entropy_from_qk_accumulate_", "entropy_stats_from_qk_accumulate_", "attention_stats_accumulate_"]


def _call_with(op, t, scale):
    args = dict(t)
    if op == "entropy_from_qk_accumulate_":
        return OPS.entropy_from_qk_accumulate_(args["sums"], args["counts"], args["query"], args["key"], scale)
    if op == "entropy_stats_from_qk_accumulate_":
        return OPS.entropy_stats_from_qk_accumulate_(args["stats"], args["query"], args["key"], scale)
    return OPS.attention_stats_accumulate_(args["stats"], args["query"], args["key"], args["value"], scale)


@pytest.mark.parametrize("op", QK_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e300, -1e300, 3.5e38])
def test_scale_beyond_the_compute_type_is_refused(op, dtype, scale):
    """float32 math for float32 / float16 / bfloat16 inputs: a scale beyond float32's range is
    named (it used to be ATen's "value cannot be converted to type float without overflow")."""
    t = {n: (x.to(dtype) if n in ("query", "key", "value") else x) for n, x in SAMPLES[op][0]().items()}
    before = _accumulators(t)
    with pytest.raises(ValueError, match=r"^scale: expected a finite number of magnitude at most 3.40282e\+38 "
                                         r"\(float32, the type .* computed in\), got -?[0-9.e+]+"):
        _call_with(op, t, scale)
    _assert_unchanged(t, before)


@pytest.mark.parametrize("op", QK_OPS)
def test_large_scale_in_float64(op):
    """float64 inputs compute in float64, where 1e300 is a scale like any other."""
    t = {n: (x.double() if n in ("query", "key", "value") else x) for n, x in SAMPLES[op][0]().items()}
    t["query"] = t["query"] * 1e-300
    _call_with(op, t, 1e300)
    got = t["stats"] if "stats" in t else torch.stack([t["counts"].double(), t["sums"]], 1)
    want = R.entropy_stats_from_qk(t["query"], t["key"], 1e300)
    torch.testing.assert_close(got, want[:, : got.shape[1]], rtol=0, atol=1e-9)


@pytest.mark.parametrize("stats", [False, True], ids=["sums", "stats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eps_beyond_the_compute_type_is_refused(stats, dtype):
    """It used to be blamed on the probabilities ("NaN/inf in probs")."""
    t = _probs_tensors("stats" if stats else "sums")
    t["probs"] = t["probs"].to(dtype)
    before = _accumulators(t)
    with pytest.raises(ValueError, match=r"^eps: expected a finite value >= 0 and at most 3.40282e\+38 "
                                         r"\(float32, the type .* computed in\), got 1e\+300"):
        if stats:
            OPS.entropy_stats_from_probs_accumulate_(t["stats"], t["probs"], None, 1e300)
        else:
            OPS.entropy_from_probs_accumulate_(t["sums"], t["counts"], t["probs"], None, 1e300)
    _assert_unchanged(t, before)


def test_large_eps_in_float64():
    p = _probs_tensors("stats")["probs"].double()
    s = torch.zeros(3, NUM_STATS, dtype=torch.float64)
    OPS.entropy_stats_from_probs_accumulate_(s, p, None, 1e300)
    torch.testing.assert_close(s, R.entropy_stats_from_probs(p, eps=1e300), rtol=1e-12, atol=1e-9)


# --------------------------------------------------------------------------- accumulators


@pytest.mark.parametrize("op", ["entropy_from_probs_accumulate_", "entropy_from_qk_accumulate_"])
@pytest.mark.parametrize("which", ["sums", "counts"])
def test_an_expanded_accumulator_is_refused_before_either_is_written(op, which):
    """Both accumulators are written in turn: an expanded one failed at its write, after the
    other had been added to."""
    g = torch.Generator().manual_seed(0)
    sums, counts = torch.full((2,), 0.5, dtype=torch.float64), torch.full((2,), 3, dtype=torch.int64)
    if which == "sums":
        sums = torch.full((1,), 0.5, dtype=torch.float64).expand(2)
    else:
        counts = torch.full((1,), 3, dtype=torch.int64).expand(2)
    before = (sums.clone(), counts.clone())
    with pytest.raises(ValueError, match=f"{which}: expected an accumulator whose elements do not share memory"):
        if op == "entropy_from_probs_accumulate_":
            ops.entropy_from_probs_accumulate_(sums, counts, torch.softmax(torch.randn(1, 2, 3, 5, generator=g), -1))
        else:
            ops.entropy_from_qk_accumulate_(sums, counts, torch.randn(1, 2, 3, 4, generator=g),
                                            torch.randn(1, 2, 5, 4, generator=g), 0.5)
    assert torch.equal(sums, before[0]) and torch.equal(counts, before[1])


ACCUMULATOR_CASES = [(op, name) for op, (make, _) in SAMPLES.items() for name in make() if name in ACCUMULATORS]


@pytest.mark.parametrize("op,name", ACCUMULATOR_CASES, ids=[f"{o}-{n}" for o, n in ACCUMULATOR_CASES])
def test_an_inference_tensor_accumulator_is_refused_before_it_is_written(op, name):
    """Made under torch.inference_mode() and updated outside it, the accumulators were written
    and then refused by the dispatcher: counts grew on every failed call."""
    make, call = SAMPLES[op]
    t = make()
    with torch.inference_mode():
        t[name] = t[name].clone()
    before = _accumulators(t)
    with pytest.raises(ValueError, match=f"{name}: an inference tensor .* cannot be updated outside inference mode"):
        call(t)
    _assert_unchanged(t, before)
    with torch.inference_mode():  # inside it, the same call works
        call(t)


def test_an_inference_tensor_is_refused_by_the_head_mask_before_it_is_masked():
    with torch.inference_mode():
        x = torch.ones(3, 4)
    with pytest.raises(ValueError, match="x: an inference tensor"):
        ops.apply_head_mask_(x, torch.tensor([0.0, 1.0]), 2, -1)
    assert torch.equal(x, torch.ones(3, 4))


def test_the_reference_masks_float64_logits_at_the_ops_bound():
    """The ops mask logits at or below float32's nearest value to -1e37 in every input type;
    the float64 reference compared with -1e37 itself, so a logit between the two was visible
    to it and masked by the op."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64), torch.randn(1, 2, 5, 4, generator=g,
                                                                                  dtype=torch.float64)
    mask = torch.zeros(1, 1, 3, 5, dtype=torch.float64)
    mask[..., 0] = -9.999999995e36  # below float32(-1e37) = -9.99999993e36, above -1e37
    stats = torch.zeros(2, NUM_STATS, dtype=torch.float64)
    ops.entropy_stats_from_qk_accumulate_(stats, q, k, 0.5, mask)
    torch.testing.assert_close(stats, R.entropy_stats_from_qk(q, k, 0.5, attn_mask=mask), rtol=1e-12, atol=1e-12)
    assert torch.all(stats[:, 0] / 3 < math.log(5) - 0.1)  # key 0 masked: at most log 4 per row
