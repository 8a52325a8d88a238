"""Masking and physical pruning on tiny random models of every family."""

import copy

import pytest
import torch

from hf_tiny import FAMILIES, GQA_FAMILIES, tiny_batch, tiny_model
from numerics import assert_same_function, float64_output

from headprune.hf import kept_heads, load_pruned, mask_heads, prune_heads, resolve_sites, save_pruned
from headprune.hf.adapters import get_adapter, head_counts


def _first(out):
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def uneven_heads(family):
    """Uneven per-layer pruning with a fully removed layer (and partial GQA groups)."""
    if family == "t5":
        return {0: [1], 1: [0, 1, 2, 3], 2: [2, 3], 4: [0], 5: [0, 1, 2, 3]}
    return {0: [0, 1, 2, 3], 1: [1]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["uneven", "second"])
def test_masked_and_pruned_models_agree(family, layout):
    model = tiny_model(family)
    heads = uneven_heads(family) if layout == "uneven" else {i: [2] for i in range(len(resolve_sites(model)))}
    batch = tiny_batch(family)
    with torch.no_grad():
        original = _first(model(**batch))
        with mask_heads(model, heads):
            masked = _first(model(**batch))
        assert torch.equal(_first(model(**batch)), original)  # restored bit-exactly
        pruned = copy.deepcopy(model)
        report = prune_heads(pruned, heads)
        out = _first(pruned(**batch))
    assert_same_function({"masked": masked, "pruned": out}, float64_output(pruned, batch, lambda m, b: _first(m(**b))))
    removed = sum(map(len, heads.values()))
    assert report.before["query_heads"] - report.after["query_heads"] == removed
    # a partly pruned GQA group repeats its KV head, which can cost what the query saved
    assert report.flops_ratio < 1 and (family in GQA_FAMILIES or report.parameters_removed > 0)
    kept = kept_heads(pruned)
    for layer, hs in heads.items():
        assert kept[layer] == [h for h in range(4) if h not in hs]


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_gqa_group_pruning_shrinks_kv(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    prune_heads(model, {0: [0, 1], 1: [2, 3]})  # one whole KV group per layer
    assert [head_counts(s, adapter) for s in resolve_sites(model)] == [(2, 1), (2, 1)]
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1


def test_partial_groups_repeat_kv_heads():
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
    prune_heads(model, {0: [0], 1: [0, 1]})
    counts = [head_counts(s, get_adapter(model)) for s in resolve_sites(model)]
    assert counts == [(7, 7), (6, 3)]  # groups of 3+4 -> gcd 1; 2+4 -> gcd 2


def test_repeated_pruning_composes():
    model = tiny_model("gpt2")
    batch = tiny_batch("gpt2")
    with torch.no_grad(), mask_heads(model, {0: [1, 3], 1: [0]}):
        ref = _first(model(**batch))
    prune_heads(model, {0: [1]})
    report = prune_heads(model, {0: [1, 3], 1: [0]})  # original indices: head 1 is gone already
    assert kept_heads(model)[0] == [0, 2] and report.removed == {0: [3], 1: [0]}
    assert report.already_removed == {0: [1]}
    again = prune_heads(model, {0: [1]})  # transformers 4: a second call with the same heads is a no-op
    assert again.removed == {} and again.after == again.before
    with mask_heads(model, {0: [1, 2]}) as masked:  # a mask says so too: it had no report to
        assert masked.heads == {0: [2]} and masked.already_removed == {0: [1]}
    with torch.no_grad():
        out = _first(model(**batch))
    assert_same_function({"masked": ref, "pruned": out}, float64_output(model, batch, lambda m, b: _first(m(**b))))


def test_failed_pruning_leaves_the_model_unchanged(monkeypatch):
    from headprune.hf import prune as prune_mod

    model = tiny_model("t5")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    calls = []

    def fail_late(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    original = prune_mod._prune_site
    monkeypatch.setattr(prune_mod, "_prune_site", fail_late)
    with pytest.raises(KeyboardInterrupt):
        prune_heads(model, uneven_heads("t5"))
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert model.config.to_dict() == config and not hasattr(model, prune_mod.STATE_ATTR)
    assert all(not m._forward_pre_hooks for m in model.modules())
    batch = tiny_batch("t5")
    with torch.no_grad():
        model(**batch)


@pytest.mark.parametrize(
    "heads, exc, match",
    [
        ([0, 1], TypeError, "heads: expected a dict"),
        ({5: [0]}, ValueError, "heads: layer 5 is not an index"),
        ({0: [9]}, ValueError, "heads: layer 0 has 4 heads"),
        ({0: "ab"}, TypeError, "heads: layer 0: expected a list"),
    ],
)
@pytest.mark.parametrize("fn", [mask_heads, prune_heads])
def test_bad_heads_are_named(fn, heads, exc, match):
    with pytest.raises(exc, match=match):
        fn(tiny_model("bert"), heads)


def test_indices_stay_original_across_pruning_collection_and_reload(tmp_path):
    """As in transformers 4: scores collected on a pruned model, select_heads, kept_heads and
    prune_heads all speak the original head indices, also after save and reload."""
    from headprune import select_heads
    from headprune.hf import collect, load_pruned, save_pruned

    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2)
    prune_heads(model, {0: [0, 5], 1: [7]})
    save_pruned(model, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    scores = collect(back, [tiny_batch("llama")], progress=False)
    assert scores.head_ids == [[1, 2, 3, 4, 6, 7], [0, 1, 2, 3, 4, 5, 6]]
    chosen = select_heads(scores, count=2, score="entropy", scope="global")
    assert all(set(hs) <= set(kept_heads(back)[site]) for site, hs in chosen.items())
    report = prune_heads(back, chosen)
    assert report.removed == chosen
    assert all(not set(hs) & set(kept_heads(back)[site]) for site, hs in chosen.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroed_heads_are_what_a_mask_left(family):
    """``zeroed_heads`` finds the heads a mask zeroed, by original index after a physical
    pruning, in every family's output-projection layout (GPT-2's Conv1D included)."""
    from headprune.hf.prune import zeroed_heads

    model = tiny_model(family)
    assert zeroed_heads(model) == {}
    prune_heads(model, {1: [0]})
    mask_heads(model, {0: [1, 3], 1: [2]})
    assert zeroed_heads(model) == {0: [1, 3], 1: [2]}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_a_mask_zeroes_non_finite_weights_and_restores_them(family):
    """A mask multiplied the head's columns by 0, so a NaN or inf weight there stayed NaN and
    the masked head still reached the output; it writes zeros, and restore() puts them back."""
    from headprune.hf.adapters import head_dim

    model = tiny_model(family)
    site = resolve_sites(model)[0]
    d, dim = head_dim(site, get_adapter(model)), 0 if family == "gpt2" else 1  # GPT-2's Conv1D is [in, out]
    w = site.o.weight
    with torch.no_grad():
        w.select(dim, d + 1)[0] = float("nan")
        w.select(dim, d + 2)[1] = float("inf")
    broken = w.detach().clone()
    handle = mask_heads(model, {0: [1]})
    assert torch.equal(w.narrow(dim, d, d), torch.zeros_like(w.narrow(dim, d, d)))
    rest = torch.cat([torch.arange(d), torch.arange(2 * d, w.shape[dim])])
    assert torch.equal(w.index_select(dim, rest), broken.index_select(dim, rest))
    assert torch.isfinite(_first(model(**tiny_batch(model)))).all()
    handle.restore()
    assert torch.equal(w.isnan(), broken.isnan()) and torch.equal(w.nan_to_num(7.0), broken.nan_to_num(7.0))


def test_masks_and_their_refusals_name_original_indices():
    """After a pruning, position 1 of layer 0 is original head 3: the handle and the messages
    say 3, the index the call was given, not the position."""
    model = tiny_model("bert")
    prune_heads(model, {0: [0, 1]})
    handle = mask_heads(model, {0: [3]})
    assert handle.heads == {0: [3]}
    with pytest.raises(ValueError, match=r"model: heads \{0: \[3\]\} are masked"):
        prune_heads(model, {1: [0]})
    with pytest.raises(ValueError, match=r"heads: layer 0 head\(s\) \[3\] are already masked"):
        mask_heads(model, {0: [3]})
    handle.restore()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2", "phi3", "qwen3"])
def test_cached_decoding_with_a_first_layer_without_heads(family):
    """transformers reads where the next token's position starts from the cache's first layer:
    a first layer left with no head recorded nothing, so every cached step started at 0."""
    import transformers

    from hf_tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    prune_heads(model, {0: list(range(head_counts(resolve_sites(model)[0], get_adapter(model))[0]))})
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        assert cache.get_seq_length() == 9
        step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_a_pruned_phi3_follows_the_models_attention_implementation(tmp_path):
    """Phi-3 reads its head counts from its config in forward, so a pruned layer holds a
    config of its own; a copy kept the old implementation after ``set_attn_implementation``,
    and ``output_attentions`` came back one layer short (the pruned layer's map missing)."""
    import pickle

    import transformers

    from hf_tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("phi3"), attn_implementation="sdpa").eval()
    batch = tiny_batch("phi3")
    with torch.no_grad():
        before = model(**batch).logits
    prune_heads(model, {0: [1]})
    model.set_attn_implementation("eager")
    attn = [layer.self_attn for layer in model.model.layers]
    assert [a.config._attn_implementation for a in attn] == ["eager", "eager"]
    assert attn[0].config.num_attention_heads == 3 and attn[1].config.num_attention_heads == 4
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    assert [a.shape[1] for a in out.attentions] == [3, 4]
    clone = copy.deepcopy(model)  # still one config behind each layer
    clone.set_attn_implementation("sdpa")
    assert [layer.self_attn.config._attn_implementation for layer in clone.model.layers] == ["sdpa", "sdpa"]
    assert model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.equal(clone(**batch).logits, model(**batch).logits)
    own = pickle.loads(pickle.dumps(attn[0].config))
    mine = attn[0].config
    assert (own.num_attention_heads, own.num_key_value_heads, own.hidden_size) == \
        (3, mine.num_key_value_heads, model.config.hidden_size)
    assert not torch.equal(before, out.logits)  # the pruned model, not the original


def test_an_encoder_only_t5_is_its_encoders_sites(tmp_path):
    """``T5EncoderModel`` (model_type ``t5``, used as a text encoder on its own) was refused for
    having no decoder blocks."""
    import transformers

    from hf_tiny import tiny_config

    from headprune import select_heads
    from headprune.hf import collect, load_pruned, save_pruned

    torch.manual_seed(0)
    model = transformers.T5EncoderModel(tiny_config("t5")).eval()
    batch = {k: v for k, v in tiny_batch("t5").items() if k in ("input_ids", "attention_mask")}
    assert [s.name for s in resolve_sites(model)] == [f"encoder.{i}.self" for i in range(model.config.num_layers)]
    scores = collect(model, [batch], progress=False, moments=True)
    assert scores.causal == [False] * model.config.num_layers
    heads = select_heads(scores, ratio=0.3)
    with torch.no_grad(), mask_heads(model, heads, reconstruct=scores):
        masked = model(**batch).last_hidden_state
    prune_heads(model, heads, reconstruct=scores)
    save_pruned(model, tmp_path / "p")
    back = load_pruned(tmp_path / "p")
    assert type(back) is transformers.T5EncoderModel and kept_heads(back) == kept_heads(model)
    with torch.no_grad():
        pruned = model(**batch).last_hidden_state
    assert_same_function({"masked": masked, "pruned": pruned},
                         float64_output(model, batch, lambda m, b: m(**b).last_hidden_state))
    with torch.no_grad():
        assert torch.equal(back(**batch).last_hidden_state, model(**batch).last_hidden_state)
    with pytest.raises(ValueError, match="has no 'encoder.block'"):  # a model with neither stack is still refused
        resolve_sites(model.encoder, get_adapter(model))


def test_a_mask_through_a_compile_wrapper_is_the_models_own(tmp_path):
    """The mask was recorded on the wrapper: a save of the wrapper (which saves the model inside)
    missed the refit's biases and wrote a directory load_pruned refuses, and prune_heads of the
    model under the mask copied its zeros instead of refusing."""
    model = tiny_model("llama")
    batches = [tiny_batch("llama", seed=i) for i in range(2)]
    from headprune.hf import collect

    scores = collect(model, batches, progress=False, moments=True)
    with mask_heads(torch.compile(model), {0: [1]}, reconstruct=scores):
        save_pruned(torch.compile(model), tmp_path / "m")
        with pytest.raises(ValueError, match="are masked by an active mask_heads handle"):
            prune_heads(model, {0: [2]})
        with torch.no_grad():
            masked = model(**batches[0]).last_hidden_state
    with torch.no_grad():
        back = load_pruned(tmp_path / "m")(**batches[0]).last_hidden_state
    torch.testing.assert_close(back, masked, rtol=0, atol=1e-5)


def test_a_model_holding_a_compile_wrapper_is_not_saved(tmp_path):
    """Its weights were written as ..._orig_mod.* keys, which load_pruned then refused."""
    model = tiny_model("llama")
    model.layers[0] = torch.compile(model.layers[0])
    with pytest.raises(ValueError, match=r"^model: layers.0 is a torch.compile wrapper inside the model"):
        save_pruned(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_model_with_weights_on_the_meta_device_is_refused_by_name():
    """Offloaded to disk by accelerate (its layers' weights meta placeholders): the pruning sliced
    the placeholders and returned, leaving a model whose forward failed; the mask failed inside."""
    model = tiny_model("llama")
    model.layers[0].self_attn.to("meta")
    for call in (lambda: mask_heads(model, {0: [1]}), lambda: prune_heads(model, {0: [1]})):
        with pytest.raises(ValueError, match=r"^model: parameters are on the meta device \(offloaded by accelerate"):
            call()
    assert model.layers[0].self_attn.o_proj.weight.shape[1] == model.layers[1].self_attn.o_proj.weight.shape[1]
    model = tiny_model("llama")
    model.embed_tokens.to("meta")  # offloaded elsewhere than the attention: nothing of it is edited
    mask_heads(model, {0: [1]}).restore()
    prune_heads(model, {0: [1]})


def test_a_uniform_pruning_writes_its_head_counts_into_its_own_config():
    """from_config(cfg) twice gives two models one config object: a uniform pruning of one wrote
    the new head counts into the other's config too (a teacher then failed in its forward)."""
    import transformers

    from hf_tiny import tiny_config

    from headprune.hf.attention import config_of

    cfg = tiny_config("phi3")
    teacher, student = (transformers.AutoModelForCausalLM.from_config(cfg).eval() for _ in range(2))
    assert teacher.config is student.config
    batch = tiny_batch("phi3")
    with torch.no_grad():
        before = teacher(**batch).logits
    prune_heads(student, {i: [0, 1] for i in range(cfg.num_hidden_layers)})
    assert teacher.config.num_attention_heads == cfg.num_attention_heads == 4
    assert student.config.num_attention_heads == 2 and config_of(student.model.layers[0].self_attn) is student.config
    with torch.no_grad():
        assert torch.equal(teacher(**batch).logits, before)
        student(**batch)
