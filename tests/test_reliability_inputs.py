"""Bad and edge-case inputs of collection, ranking, masking and pruning (save/load:
``test_reliability_io.py``).

One table per stage, one parametrized test per row. Every row asserts the error type and
message (or, for an accepted edge case, the result) and that the model is exactly as before
(``ModelSnapshot``: weights bit for bit, configs, attention implementation, hooks).
Op-level bad inputs live in ``test_ops_contract.py``; numerical edge cases at model level
in ``test_reliability_numerics.py``.
"""


import pytest
import torch

from hf_tiny import tiny_batch, tiny_config, tiny_model
from model_snapshot import ModelSnapshot, registry_keys

from headprune.hf import collect, kept_heads, mask_heads, prune_heads
from headprune.ranking import select_heads
from headprune.core.schema import NUM_STATS
from headprune.stats import HeadScores


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """The first collection registers headprune's attention functions for good; do it
    up front so snapshots compare the rest (registry pollution has its own test)."""
    collect(tiny_model("bert"), [tiny_batch("bert")], progress=False)
    collect(tiny_model("bert"), [tiny_batch("bert")], method="eager", progress=False)


def _ids(n):
    return torch.randint(3, 99, n, generator=torch.Generator().manual_seed(0))


def _meta_llama():
    import transformers

    with torch.device("meta"):
        return transformers.AutoModel.from_config(tiny_config("llama"), attn_implementation="sdpa")


def _gpt_neox():
    import transformers

    cfg = transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=50)
    return transformers.AutoModel.from_config(cfg).eval()


def _xfail(reason):
    return pytest.mark.xfail(strict=True, reason=reason)


# ---- collection: refused inputs ------------------------------------------------------------

COLLECT_ERRORS = [
    pytest.param(lambda: tiny_model("llama"), [{"input_ids": _ids((0, 5)), "attention_mask": torch.ones(0, 5)}],
                 ValueError, "batches: .*(empty|no sequences)", id="empty-batch"),
    pytest.param(lambda: tiny_model("llama"), [{"input_ids": _ids((2, 0))}], ValueError, "batches: .*(empty|no tokens)",
                 id="zero-length-sequences"),
    pytest.param(_meta_llama, [tiny_batch("llama")], ValueError, "model: .*meta", id="meta-device"),
    pytest.param(_gpt_neox, [{"input_ids": _ids((1, 4))}], ValueError, "unsupported model_type 'gpt_neox'.*bert",
                 id="unsupported-architecture"),
    pytest.param(lambda: tiny_model("llama"), [{"input_ids": _ids((1, 6)), "attention_mask": torch.zeros(1, 1, 6, 6)}],
                 ValueError, "batches: 'attention_mask' has 4 dimensions; collection reads the padding mask", id="4d-mask"),
    pytest.param(lambda: tiny_model("bert"), [{"attention_mask": torch.ones(1, 3)}], ValueError,
                 "batches: a batch needs input_ids", id="no-input-ids"),
]


@pytest.mark.parametrize("make, batches, exc, match", COLLECT_ERRORS)
def test_collect_refuses(make, batches, exc, match):
    model = make()
    snap = ModelSnapshot(model)
    with pytest.raises(exc, match=match):
        collect(model, batches, progress=False)
    snap.assert_same()


# ---- collection: accepted edge cases -------------------------------------------------------


def _without_mask(family):
    b = tiny_batch(family, pad=False)
    ref = collect(tiny_model(family), [b], progress=False)
    del b["attention_mask"]
    return [b], lambda s: torch.equal(s.count, ref.count) and torch.allclose(s.stats, ref.stats, atol=1e-9, rtol=1e-12)


def _length_one(family):
    b = {"input_ids": _ids((3, 1)), "attention_mask": torch.ones(3, 1, dtype=torch.long)}
    return [b], lambda s: bool((s.count == 3).all() and (s.entropy == 0).all() and torch.isfinite(s.std).all())


def _all_padding_row(family):
    b = tiny_batch(family)
    b["attention_mask"][1] = 0
    kept = {k: v[[0, 2]] for k, v in b.items()}
    ref = collect(tiny_model(family), [kept], progress=False)
    return [b], lambda s: torch.equal(s.count, ref.count) and torch.allclose(s.stats, ref.stats, atol=1e-6, rtol=1e-6)


COLLECT_ACCEPTS = [
    ("bert", _without_mask), ("llama", _without_mask),
    ("bert", _length_one), ("llama", _length_one), ("gpt2", _length_one),
    ("bert", _all_padding_row), ("llama", _all_padding_row),
]


@pytest.mark.parametrize("family, case", COLLECT_ACCEPTS, ids=[f"{f}-{c.__name__[1:]}" for f, c in COLLECT_ACCEPTS])
def test_collect_accepts(family, case):
    batches, check = case(family)
    model = tiny_model(family)
    snap = ModelSnapshot(model)
    scores = collect(model, batches, progress=False)
    assert check(scores)
    snap.assert_same()


@pytest.mark.parametrize("method", ["qk", "eager"])
def test_collect_in_training_mode_measures_the_eval_model(method):
    batches = [tiny_batch("bert", seed=s) for s in range(2)]
    kw = dict(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    ref = collect(tiny_model("bert", **kw), batches, progress=False)
    model = tiny_model("bert", **kw).train()
    snap = ModelSnapshot(model)
    scores = collect(model, batches, method=method, progress=False)
    snap.assert_same()  # still in training mode
    torch.testing.assert_close(scores.entropy, ref.entropy, atol=1e-4, rtol=0)


def test_collect_leaves_the_attention_registries_as_before(monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    for mapping in (AttentionInterface._global_mapping, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping):
        for key in [k for k in mapping if k.startswith("headprune_")]:
            monkeypatch.delitem(mapping, key)
    before = registry_keys()
    collect(tiny_model("llama"), [tiny_batch("llama")], progress=False)
    assert registry_keys() == before


def test_attention_registration_is_refcounted(monkeypatch):
    """Nested or concurrent collections share one registration; the last one out removes it."""
    from transformers import AttentionInterface
    from headprune.hf.attention import registered_name, release_name

    monkeypatch.delitem(AttentionInterface._global_mapping, "headprune_sdpa", raising=False)
    before = registry_keys()
    a = registered_name("sdpa")
    b = registered_name("sdpa")
    assert a == b == "headprune_sdpa" and a in AttentionInterface._global_mapping
    release_name(a)
    assert a in AttentionInterface._global_mapping  # still in use by the second user
    release_name(b)
    assert registry_keys() == before
    # A model mid-collection inside another collection's forward keeps the outer one working.
    outer, inner = tiny_model("llama"), tiny_model("llama")
    seen = []
    hook = outer.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append(collect(inner, [tiny_batch("llama")], progress=False)) and None)
    try:
        scores = collect(outer, [tiny_batch("llama")], progress=False)
    finally:
        hook.remove()
    assert len(seen) == 1 and torch.isfinite(scores.entropy).all() and torch.isfinite(seen[0].entropy).all()
    assert registry_keys() == before


# ---- ranking ----------------------------------------------------------------------------------


def _scores(nan=None, count0=None, kv=4):
    g = torch.Generator().manual_seed(0)
    stats = torch.zeros(2, 4, NUM_STATS, dtype=torch.float64)
    stats[..., 0] = 10
    stats[..., 1] = torch.rand(2, 4, generator=g, dtype=torch.float64) * 10
    if nan:
        stats[nan[0], nan[1], 1] = float("nan")
    if count0:
        stats[count0[0], count0[1]] = 0
    return HeadScores(stats, [4, 4], [kv, kv], [8, 8], ["0", "1"], ["self", "self"])


RANKING_ERRORS = [
    (dict(ratio=-0.1), ValueError, r"ratio: expected a number in \[0, 1\], got -0.1"),
    (dict(ratio=1.5), ValueError, r"ratio: expected a number in \[0, 1\], got 1.5"),
    (dict(ratio=float("nan")), ValueError, r"ratio: expected a number in \[0, 1\], got nan"),
    (dict(ratio=float("inf")), ValueError, r"ratio: expected a number in \[0, 1\], got inf"),
    (dict(ratio=True), ValueError, r"ratio: expected a number in \[0, 1\], got True"),
    (dict(count=9), ValueError, "count: 9 exceeds the 8 units of the model"),
    (dict(count=9, scope="per_layer"), ValueError, "count: 9 exceeds the 8 units of the model"),
    (dict(count=7, scope="per_layer"), ValueError, "7 units requested but .* allow at most 6 spread evenly over the layers"),
    (dict(count=5, gqa="group", kv=2), ValueError, "count: 5 exceeds the 4 units of the model"),
    (dict(count=7), ValueError, "7 units requested but protect_layers and min_heads_per_layer=1 allow at most 6"),
    (dict(ratio=1.0), ValueError, "8 units requested but .* allow at most 6"),
    (dict(count=4, protect_layers=[1]), ValueError, "4 units requested but .* allow at most 3"),
    (dict(count=1, protect_layers=[2]), ValueError, r"protect_layers: indices \[2\] out of range for 2 layers"),
    (dict(count=1, protect_layers=[-1]), ValueError, r"protect_layers: indices \[-1\] out of range"),
    (dict(count=1, protect_layers=[1.5]), TypeError, "protect_layers: expected an iterable of layer indices"),
    (dict(count=1, protect_layers=[True]), TypeError, "protect_layers: expected an iterable of layer indices"),
    (dict(count=1, protect_layers=5), TypeError, "protect_layers: expected an iterable"),
    (dict(count=1, nan=(1, 2), score="entropy"), ValueError, r"layer 1 \(1\) head\(s\) \[2\] have no statistics"),
    (dict(count=1, count0=(0, 3)), ValueError, r"layer 0 \(0\) head\(s\) \[3\] have no statistics"),
    (dict(count=1, nan=(0, 1), gqa="group", kv=2, score="entropy"), ValueError, r"layer 0 \(0\) head\(s\) \[0, 1\] have no statistics"),
    # a score tensor's NaN is its own (its repr was printed, and more data was advised)
    (dict(count=1, score=torch.tensor([[0.0, 1, 2, float("nan")], [1, 2, 3, 4]])), ValueError,
     r"^score: the score tensor is NaN at layer 0 \(0\) head\(s\) \[3\]$"),
    # +inf and -inf in one KV group: its mean, NaN, left the sort in no order
    (dict(count=1, gqa="group", kv=2, score=torch.tensor([[1.0, 2, 3, 4], [float("inf"), -float("inf"), 0.5, 0.6]])),
     ValueError, r"layer 1 \(1\) head\(s\) \[0, 1\] score \+inf and -inf \(the score tensor\), so the group has no score"),
]


@pytest.mark.parametrize("kwargs, exc, match", RANKING_ERRORS, ids=[str(i) for i in range(len(RANKING_ERRORS))])
def test_select_heads_refuses(kwargs, exc, match):
    kwargs = dict(kwargs)
    scores = _scores(**{k: kwargs.pop(k) for k in ("nan", "count0", "kv") if k in kwargs})
    before = scores.stats.clone()
    with pytest.raises(exc, match=match):
        select_heads(scores, **kwargs)
    assert torch.equal(scores.stats.nan_to_num(7.0), before.nan_to_num(7.0))


def test_per_layer_scope_spreads_a_total_and_keeps_min_heads():
    assert all(len(h) == 3 for h in select_heads(_scores(), count=6, scope="per_layer").values())
    assert [len(h) for h in select_heads(_scores(), count=5, scope="per_layer").values()] in ([3, 2], [2, 3])
    with pytest.raises(ValueError, match="allow at most 6 spread evenly"):
        select_heads(_scores(), count=8, scope="per_layer")
    assert sum(map(len, select_heads(_scores(), count=8, scope="per_layer", min_heads_per_layer=0).values())) == 8


# ---- masking and physical pruning --------------------------------------------------------------


def _masked(family, heads):
    def make():
        model = tiny_model(family)
        make.handle = mask_heads(model, heads)  # kept alive: an active mask
        return model

    return make


def _pruned(family, heads):
    def make():
        model = tiny_model(family)
        prune_heads(model, heads)
        return model

    return make


PRUNE_ERRORS = [
    (lambda: tiny_model("gpt2"), prune_heads, {0: [4]}, ValueError, r"heads: layer 0 has 4 heads, got indices \[4\]"),
    (lambda: tiny_model("gpt2"), mask_heads, {0: [-1]}, ValueError, r"heads: layer 0 has 4 heads, got indices \[-1\]"),
    (lambda: tiny_model("llama"), prune_heads, {2: [0]}, ValueError, r"heads: layer 2 is not an index in \[0, 2\)"),
    (lambda: tiny_model("llama"), mask_heads, {-1: [0]}, ValueError, r"heads: layer -1 is not an index"),
    (lambda: tiny_model("llama"), prune_heads, {"0": [0]}, ValueError, r"heads: layer '0' is not an index"),
    (lambda: tiny_model("t5"), prune_heads, {0: [1.5]}, TypeError, r"heads: layer 0: expected a list of head indices"),
    (lambda: tiny_model("t5"), mask_heads, {0: [True]}, TypeError, r"heads: layer 0: expected a list of head indices"),
    (lambda: tiny_model("bert"), prune_heads, {0: 1}, TypeError, r"heads: layer 0: expected a list"),
    (lambda: tiny_model("bert"), prune_heads, [(0, [1])], TypeError, r"heads: expected a dict"),
    # indices are the original ones after a pruning too: 4 is out of range, 3 (removed) is ignored
    (_pruned("gpt2", {0: [3]}), prune_heads, {0: [4]}, ValueError, r"heads: layer 0 has 4 heads, got indices \[4\]"),
    (_masked("gpt2", {0: [1]}), mask_heads, {0: [1, 2]}, ValueError, r"layer 0 head\(s\) \[1\] are already masked"),
    (_masked("llama", {1: [0]}), prune_heads, {0: [2]}, ValueError, r"heads \{1: \[0\]\} are masked by an active"),
    (_masked("t5", {4: [3]}), prune_heads, {4: [3]}, ValueError, r"heads \{4: \[3\]\} are masked by an active"),
]


@pytest.mark.parametrize("make, fn, heads, exc, match", PRUNE_ERRORS, ids=[str(i) for i in range(len(PRUNE_ERRORS))])
def test_mask_and_prune_refuse(make, fn, heads, exc, match):
    model = make()
    snap = ModelSnapshot(model)
    with pytest.raises(exc, match=match):
        fn(model, heads)
    snap.assert_same()


def test_duplicate_heads_are_pruned_once():
    a, b = tiny_model("gpt2"), tiny_model("gpt2")
    prune_heads(a, {0: [1, 1, 1]})
    prune_heads(b, {0: [1]})
    assert kept_heads(a) == kept_heads(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_layer_keys_take_the_integer_types_head_indices_take():
    import numpy as np

    a, b = tiny_model("gpt2"), tiny_model("gpt2")
    prune_heads(a, {np.int64(0): [1], torch.tensor(0): [np.int64(2)], 1: [torch.tensor(3)]})
    prune_heads(b, {0: [1, 2], 1: [3]})
    assert kept_heads(a) == kept_heads(b) == {0: [0, 3], 1: [0, 1, 2]}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_fractions_take_the_number_types_counts_take():
    """A fraction as a numpy or 0-d tensor number selects as the float does (np.float32 was
    refused as "expected a number in [0, 1]"); a bool, NaN or a 1-element tensor is still refused."""
    import numpy as np

    from headprune.app.texts import reference_samples

    scores = _scores(kv=2)
    for name, value in [("ratio", 0.5), ("kv_ratio", 0.5)]:
        other = {"score": "entropy", **({"ratio": 0.5, "gqa": "even"} if name == "kv_ratio" else {})}
        want = select_heads(scores, **{**other, name: value})
        for same in (np.float32(value), np.float64(value), torch.tensor(value)):
            assert select_heads(scores, **{**other, name: same}) == want
        for bad in (True, float("nan"), torch.tensor([value])):
            with pytest.raises(ValueError, match=f"{name}: expected a"):
                select_heads(scores, **{**other, name: bad})
    assert reference_samples(64, np.float32(0.25)) == reference_samples(64, 0.25) == 16


def test_mask_restore_then_prune_and_nested_masks():
    model = tiny_model("gpt2")
    w = model.h[0].attn.c_proj.weight.clone()
    with mask_heads(model, {0: [1]}), mask_heads(model, {0: [2]}):
        pass
    assert torch.equal(model.h[0].attn.c_proj.weight, w)
    h1, h2 = mask_heads(model, {0: [1]}), mask_heads(model, {0: [2]})
    h1.restore()  # disjoint heads restore in any order
    h2.restore()
    assert torch.equal(model.h[0].attn.c_proj.weight, w)
    prune_heads(model, {0: [1]})  # allowed once no mask is active
    assert kept_heads(model)[0] == [0, 2, 3]


def test_a_bundled_name_that_is_also_a_path_here_is_refused(tmp_path, monkeypatch):
    """After ``prune smollm2 --out smollm2``, ``eval smollm2`` could mean either: it is refused
    (naming both) rather than reading the bundled model silently."""
    from headprune.app.load import load_model
    from headprune.app.locate import BUNDLED_MODELS

    name = sorted(BUNDLED_MODELS)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    with pytest.raises(ValueError, match=rf"MODEL: '{name}' names both a bundled model and a path here; pass ./{name}"):
        load_model(name)
    with pytest.raises(FileNotFoundError, match=rf"MODEL: directory '\./{name}' has no config.json"):
        load_model(f"./{name}")

    class Bundled(Exception):
        pass

    def bundled_path(spec):
        raise Bundled(spec)

    monkeypatch.setattr("headprune.app.locate.bundled_path", bundled_path)
    with pytest.raises(Bundled):  # a name known to mean the bundled model (recover, from a report)
        load_model(name, bundled=True)
