"""headprune.hf.collect on tiny random models of every family."""

import copy
import json

import pytest
import torch

from hf_tiny import FAMILIES, tiny_batch, tiny_model
from numerics import assert_same_function, float64_output

from headprune.hf import collect
from headprune.hf.attention import RECORDERS as _RECORDERS, model_configs as _configs
from headprune.stats import HeadScores


def _impls(model):
    return [c._attn_implementation_internal for c in _configs(model)]


def _first(out):
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_matches_eager_reference_and_outputs_are_untouched(family):
    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(2)]
    with torch.no_grad():
        before = [_first(model(**b)) for b in batches]
    impls = _impls(model)
    scores = collect(model, batches, progress=False)
    eager = collect(model, batches, method="eager", progress=False)
    assert _impls(model) == impls and not _RECORDERS
    with torch.no_grad():
        for b, ref in zip(batches, before):
            assert torch.equal(_first(model(**b)), ref)
    assert scores.entropy.shape == (scores.num_layers, 4)
    assert torch.equal(scores.count, eager.count)
    torch.testing.assert_close(scores.entropy, eager.entropy, atol=1e-4, rtol=0)
    for name in ("normalized", "sink", "rest"):  # rest: T5 was exempt, its probabilities' eps the cause (7.6e-3)
        torch.testing.assert_close(scores.score(name), eager.score(name), atol=1e-4, rtol=0)
    assert (scores.entropy > 0).all() and torch.isfinite(scores.std).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_float64_model_without_a_mask_computes_as_it_does_outside(family):
    """Float64 output-projection inputs with every token valid are not copied by the cast to
    float64: the statistics must not square the model's own activations in place."""
    model = tiny_model(family).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch(family).items()
             if not k.endswith("attention_mask")}
    with torch.no_grad():
        want = _first(model(**batch))
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(_first(out).clone()))
    try:
        collect(model, [batch], progress=False, moments=True)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_attention_matches_the_models_own(family, monkeypatch):
    """On CPU an sdpa model's attention calls are served by the fused op: the statistics and
    the model's outputs during collection equal the unfused path's to float rounding."""
    from headprune.core import ops as module

    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(2)]
    calls = []
    real = module.attention_stats_accumulate_
    monkeypatch.setattr(module, "attention_stats_accumulate_", lambda *a: calls.append(1) or real(*a))
    outs = {True: [], False: []}
    flag = [True]
    hook = model.register_forward_hook(lambda m, a, out: outs[flag[0]].append(_first(out).clone()))
    scores = {}
    for flag[0] in (True, False):
        scores[flag[0]] = collect(model, batches, progress=False, fused=flag[0])
    hook.remove()
    n_sites = scores[True].num_layers
    if all(i == "sdpa" for i in _impls(model)):
        assert len(calls) == n_sites * len(batches)  # every call fused, once
    else:  # gemma2 runs eager (soft-capping): nothing is fused
        assert not calls
    assert torch.equal(scores[True].count, scores[False].count)
    if not calls:  # one path: the same sums (a float64 gemma2 in eager attention gives NaN at padding)
        assert torch.equal(scores[True].stats, scores[False].stats)
        assert torch.equal(scores[True].outputs, scores[False].outputs)
        return
    # both float32 paths against the same statistics and outputs of a float64 copy (fused and
    # unfused kernels block their sums differently, by instruction set)
    wide = collect(copy.deepcopy(model).double(), batches, progress=False, fused=False)
    n = wide.count.clamp_min(1).unsqueeze(-1)
    assert_same_function({str(k): v.stats / n for k, v in scores.items()}, wide.stats / n)
    per_token = wide.outputs[..., :1].clamp_min(1)
    assert_same_function({str(k): v.outputs / per_token for k, v in scores.items()}, wide.outputs / per_token)
    for i, batch in enumerate(batches):
        assert_same_function({"fused": outs[True][i], "unfused": outs[False][i]},
                             float64_output(model, batch, lambda m, b: _first(m(**b))))


def test_fused_attention_is_skipped_where_it_does_not_apply(monkeypatch):
    from headprune.core import ops as module

    calls = []
    real = module.attention_stats_accumulate_
    monkeypatch.setattr(module, "attention_stats_accumulate_", lambda *a: calls.append(1) or real(*a))
    model = tiny_model("llama")
    collect(model, [tiny_batch("llama")], progress=False, method="eager")
    collect(model, [tiny_batch("llama")], progress=False, fused=False)
    assert not calls
    eager = tiny_model("llama", attn_implementation="eager")
    collect(eager, [tiny_batch("llama")], progress=False)
    assert not calls


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_padded_queries_are_excluded(family):
    """A padded batch gives the statistics of its sequences run one by one, unpadded."""
    model = tiny_model(family)
    batch = tiny_batch(family)
    batched = collect(model, [batch], progress=False)
    singles = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        one = {"input_ids": batch["input_ids"][i : i + 1, :n], "attention_mask": batch["attention_mask"][i : i + 1, :n]}
        if family == "t5":
            m = int(batch["decoder_attention_mask"][i].sum())
            one["decoder_input_ids"] = batch["decoder_input_ids"][i : i + 1, :m]
            one["decoder_attention_mask"] = batch["decoder_attention_mask"][i : i + 1, :m]
        singles.append(one)
    separate = collect(model, singles, progress=False)
    assert torch.equal(batched.count, separate.count)
    expected_rows = int(batch["attention_mask"].sum())
    assert batched.count[0, 0] == expected_rows
    wide = collect(copy.deepcopy(model).double(), singles, progress=False)  # other shapes: a float64 reference
    n = wide.count.clamp_min(1).unsqueeze(-1)
    assert_same_function({"batched": batched.stats / n, "one by one": separate.stats / n}, wide.stats / n)


def test_t5_cross_attention_is_scored_separately():
    model = tiny_model("t5")
    scores = collect(model, [tiny_batch("t5")], progress=False)
    cross = scores.block("cross")
    assert cross.names == ["decoder.0.cross", "decoder.1.cross"]
    assert cross.count[0, 0] == int(tiny_batch("t5")["decoder_attention_mask"].sum())


def test_sliding_window_changes_the_scores():
    wide = tiny_model("mistral", sliding_window=64)
    narrow = tiny_model("mistral", sliding_window=2)
    b = [tiny_batch("mistral")]
    assert not torch.allclose(collect(wide, b, progress=False).entropy, collect(narrow, b, progress=False).entropy)
    eager = collect(narrow, b, method="eager", progress=False)
    torch.testing.assert_close(collect(narrow, b, progress=False).entropy, eager.entropy, atol=1e-4, rtol=0)


def test_head_scores_json_round_trip_and_merge():
    model = tiny_model("llama")
    a = collect(model, [tiny_batch("llama", seed=0)], progress=False)
    b = collect(model, [tiny_batch("llama", seed=1)], progress=False)
    both = collect(model, [tiny_batch("llama", seed=0), tiny_batch("llama", seed=1)], progress=False)
    torch.testing.assert_close(a.merge(b).stats, both.stats, atol=1e-9, rtol=1e-12)
    again = HeadScores.from_dict(json.loads(json.dumps(a.to_dict())))
    assert torch.equal(again.stats, a.stats) and again.names == a.names and again.num_kv_heads == [2, 2]
    with pytest.raises(ValueError, match="other: head layouts differ"):
        a.merge(collect(tiny_model("bert"), [tiny_batch("bert")], progress=False))


@pytest.mark.parametrize("heads", [[], [0, 0]], ids=["no sites", "no heads"])
def test_head_scores_without_any_head_round_trip(heads):
    """Scores of no site, or of sites all left without heads, with output statistics: the
    JSON lists hold no number to infer a shape from, and from_dict used to fail on them."""
    scores = HeadScores.empty(heads, heads, [4] * len(heads), [f"s{i}" for i in range(len(heads))],
                              ["self"] * len(heads), with_outputs=True)
    again = HeadScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    assert again.stats.shape == scores.stats.shape and again.outputs.shape == scores.outputs.shape
    assert again.num_heads == heads


@pytest.mark.parametrize("method", ["qk", "eager"])
def test_a_model_that_computes_nan_is_named_as_the_cause(method):
    """transformers' eager attention of a float64 Llama with left padding computes NaN (its
    softmax runs in float32); the refusal used to point at the inputs only. It names the site
    and says the model computed the NaN, and the model is left as it was."""
    model = tiny_model("llama").double()
    model.config._attn_implementation = "eager"
    batch = tiny_batch("llama")
    batch["attention_mask"][0, :2] = 0
    assert torch.isnan(model(**batch).last_hidden_state).any()  # the model's own forward
    with pytest.raises(ValueError, match=r"site \S+: the model's own attention (query and key|probs) here hold NaN "
                                         r"or inf.*float64 model in eager attention"):
        collect(model, [batch], method=method, progress=False)
    assert _impls(model) == ["eager"] and not _RECORDERS


def _bad_batches(family, exc):
    yield tiny_batch(family)
    raise exc


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("method", ["qk", "eager"])
def test_model_is_restored_when_interrupted(exc, method):
    model = tiny_model("t5")
    impls = _impls(model)
    with pytest.raises(type(exc)):
        collect(model, _bad_batches("t5", exc), method=method, progress=False)
    assert _impls(model) == impls and not _RECORDERS


def test_model_is_restored_when_the_forward_fails():
    model = tiny_model("gpt2")
    bad = {"input_ids": torch.full((1, 4), 10_000), "attention_mask": torch.ones(1, 4)}
    with pytest.raises(ValueError, match="batches: token ids run from 10000 to 10000"):  # refused midway
        collect(model, [tiny_batch("gpt2"), bad], progress=False)
    assert _impls(model) == ["sdpa"] and not _RECORDERS
    broken = model.h[1].mlp.register_forward_hook(lambda *a: (_ for _ in ()).throw(IndexError("inside")))
    with pytest.raises(IndexError, match="inside"):  # a forward that fails
        collect(model, [tiny_batch("gpt2")], progress=False)
    broken.remove()
    assert _impls(model) == ["sdpa"] and not _RECORDERS


def test_interrupt_from_inside_the_attention_call():
    model = tiny_model("llama")
    site = model.layers[1].self_attn
    site.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        collect(model, [tiny_batch("llama")], progress=False)
    assert _impls(model) == ["sdpa"] and not _RECORDERS


@pytest.mark.parametrize(
    "batches, exc, match",
    [
        ({"input_ids": torch.ones(1, 3, dtype=torch.long)}, TypeError, "batches: expected an iterable"),
        ([torch.ones(1, 3)], TypeError, "batches: expected dicts"),
        ([{"labels": torch.ones(1, 3)}], ValueError, "batches: a batch needs input_ids"),
        ([], ValueError, "batches: no attention call"),
    ],
)
def test_bad_input_is_named(batches, exc, match):
    with pytest.raises(exc, match=match):
        collect(tiny_model("bert"), batches, progress=False)


def test_bad_method_is_named():
    with pytest.raises(ValueError, match="method: expected one of"):
        collect(tiny_model("bert"), [tiny_batch("bert")], method="flash", progress=False)


def test_only_the_collecting_threads_forwards_are_recorded():
    """Forwards of the same model in another thread during a collection are neither counted
    nor altered (with the fused op too)."""
    import threading
    import time

    model = tiny_model("llama")
    batches = [tiny_batch("llama", seed=s) for s in range(3)]
    other = tiny_batch("llama", seed=9)
    want = collect(model, batches, progress=False)
    with torch.no_grad():
        ref = _first(model(**other))
    started, stop, outs, errors = threading.Event(), threading.Event(), [], []

    def forwards():
        started.wait()
        try:
            with torch.no_grad():
                while not stop.is_set():
                    outs.append(_first(model(**other)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def interleaved():  # each batch waits until the other thread has run forwards meanwhile
        for b in batches:
            started.set()
            n, deadline = len(outs), time.monotonic() + 30
            while len(outs) < n + 2 and time.monotonic() < deadline and not errors:
                time.sleep(0.001)
            yield b

    thread = threading.Thread(target=forwards)
    thread.start()
    try:
        got = collect(model, interleaved(), progress=False)
    finally:
        stop.set()
        thread.join()
    assert not errors and len(outs) >= 2 * len(batches)
    assert torch.equal(got.count, want.count)
    torch.testing.assert_close(got.stats, want.stats, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.outputs, want.outputs, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(o, ref) for o in outs)


def test_gpt2_keeps_its_upcast_attention_during_collection():
    """GPT-2 with reorder_and_upcast_attn takes its float32 path only under the name "eager":
    under collection's wrapper it ran the plain one (bfloat16: outputs 1e-4 apart)."""
    from headprune.hf import resolve_sites
    from headprune.hf.batches import forward_kwargs

    model = tiny_model("gpt2", attn_implementation="eager", reorder_and_upcast_attn=True).to(torch.bfloat16)
    batch = tiny_batch("gpt2")
    seen = []
    hook = resolve_sites(model)[0].module.register_forward_hook(lambda m, a, o: seen.append(o[0].detach().clone()))
    with torch.no_grad():
        model(**forward_kwargs(model, batch))  # the arguments collection passes (no KV cache)
    collect(model, [batch], progress=False, fused=False)
    hook.remove()
    assert torch.equal(seen[0], seen[1])


def test_a_four_dimensional_mask_is_refused_by_name_and_the_model_restored():
    """A 4-D attention mask (packed sequences' blocks), which transformers takes, failed midway as
    a shape the site does not attend with."""
    model = tiny_model("llama")
    batch = tiny_batch("llama")
    b, s = batch["input_ids"].shape
    blocks = torch.ones(b, 1, s, s, dtype=torch.bool).tril()
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"^batches: 'attention_mask' has 4 dimensions; collection reads the padding "
                                         r"mask \[batch, tokens\]"):
        collect(model, [{"input_ids": batch["input_ids"], "attention_mask": blocks}], progress=False)
    assert model.config._attn_implementation == impl
