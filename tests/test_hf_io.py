"""save_pruned / load_pruned round trips on tiny random models."""

import json
import os

import pytest
import torch

from hf_tiny import FAMILIES, GQA_FAMILIES, tiny_batch, tiny_model

from headprune.hf import collect, kept_heads, load_pruned, prune_heads, resolve_sites, save_pruned

# families whose config has a head_dim field, so a uniform pruned layout is expressible
PLAIN = set(GQA_FAMILIES) | {"vit", "t5"}


def _first(out):
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("uniform", [False, True])
def test_round_trip_is_bit_exact(family, uniform, tmp_path):
    import transformers

    model = tiny_model(family)
    n = len(resolve_sites(model))
    if uniform:
        heads = {i: ([2, 3] if family in GQA_FAMILIES else [1]) for i in range(n)}
    else:
        heads = {0: [0, 1, 2, 3], 1: [1]} if n == 2 else {0: [1], 1: [0, 1, 2, 3], 4: [0]}
    scores = collect(model, [tiny_batch(family)], progress=False)
    prune_heads(model, heads)
    batch = tiny_batch(family)
    with torch.no_grad():
        ref = _first(model(**batch))
    save_pruned(model, tmp_path, scores=scores, settings={"ratio": 0.25})
    meta = json.loads((tmp_path / "headprune.json").read_text())
    assert meta["plain_loadable"] == (uniform and family in PLAIN)
    assert meta["settings"] == {"ratio": 0.25} and meta["scores"]["names"] == scores.names
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pkl"))]
    again = load_pruned(tmp_path)
    with torch.no_grad():
        assert torch.equal(_first(again(**batch)), ref)
    assert kept_heads(again) == kept_heads(model)
    # a directory from_pretrained cannot read says how to load it
    assert (tmp_path / "README.md").exists() != meta["plain_loadable"]
    if not meta["plain_loadable"]:  # and what from_pretrained does with it, as the README says
        assert "headprune.load_pruned" in (tmp_path / "README.md").read_text()
        assert "headprune-model.safetensors" in (tmp_path / "README.md").read_text()
        with pytest.raises(OSError, match="no file named"):
            transformers.AutoModel.from_pretrained(tmp_path)
    if meta["plain_loadable"]:
        plain = transformers.AutoModel.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(_first(plain(**batch)), ref)


def test_a_float16_t5_keeps_its_float32_weights_through_a_round_trip(tmp_path):
    """transformers keeps T5's ``wo`` in float32 inside a float16 model; the reload built the
    model in float16 and cast them down, so its output changed."""
    import transformers

    tiny_model("t5").save_pretrained(tmp_path / "full")
    model = transformers.AutoModel.from_pretrained(tmp_path / "full", dtype=torch.float16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float16, torch.float32}
    prune_heads(model, {0: [1], 1: [0, 2]})
    batch = tiny_batch("t5")
    save_pruned(model, tmp_path / "pruned")
    again = load_pruned(tmp_path / "pruned")
    assert {n: p.dtype for n, p in again.named_parameters()} == {n: p.dtype for n, p in model.named_parameters()}
    with torch.no_grad():
        assert torch.equal(_first(again(**batch)), _first(model(**batch)))


def test_reloaded_model_can_be_pruned_again(tmp_path):
    model = tiny_model("llama")
    prune_heads(model, {0: [0]})
    save_pruned(model, tmp_path / "a")
    again = load_pruned(tmp_path / "a")
    prune_heads(again, {1: [3]})
    save_pruned(again, tmp_path / "b")
    assert kept_heads(load_pruned(tmp_path / "b")) == {0: [1, 2, 3], 1: [0, 1, 2]}


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_a_reloaded_masked_model_keeps_its_masked_heads_out_of_a_refit(family, tmp_path):
    """A refit keeps the heads an earlier mask zeroed out of the kept columns, also after the
    masked model is saved and loaded (no handle left): it gave them columns again, and the
    reloaded model computed something else than the one in memory."""
    from headprune.hf import mask_heads
    from headprune.hf.prune import zeroed_heads

    model = tiny_model(family)
    batches = [tiny_batch(family, seed=s) for s in range(3)]
    mask_heads(model, {0: [1]})
    save_pruned(model, tmp_path / "m")
    again = load_pruned(tmp_path / "m")
    for m in (model, again):
        mask_heads(m, {0: [2]}, reconstruct=collect(m, batches, progress=False, moments=True))
        assert zeroed_heads(m) == {0: [1, 2]}
    with torch.no_grad():
        assert torch.equal(_first(model(**batches[0])), _first(again(**batches[0])))
    # prune_heads refits the same way: its zeroed head stays zero, and it computes what the mask does
    pruned = load_pruned(tmp_path / "m")
    prune_heads(pruned, {0: [2]}, reconstruct=collect(pruned, batches, progress=False, moments=True))
    assert zeroed_heads(pruned) == {0: [1]}
    with torch.no_grad():
        torch.testing.assert_close(_first(pruned(**batches[0])), _first(again(**batches[0])), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("uniform", [False, True])
def test_saved_files_have_the_users_usual_mode(tmp_path, uniform):
    """safetensors and save_pretrained write through private temporary files (0600); the
    saved directory's files get the mode the user's umask gives any other new file."""
    model = tiny_model("llama")
    prune_heads(model, {i: [0] for i in range(len(resolve_sites(model)))} if uniform else {0: [0]})
    old = os.umask(0o022)
    try:
        save_pruned(model, tmp_path / "m")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}


def test_tokenizer_is_saved(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    import transformers

    vocab = {f"w{i}": i for i in range(100)}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    )
    save_pruned(tiny_model("bert"), tmp_path, tokenizer=tok)
    assert (tmp_path / "tokenizer.json").exists()


def test_missing_metadata_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="headprune.json"):
        load_pruned(tmp_path)
    with pytest.raises(TypeError, match="path: expected a directory"):
        save_pruned(tiny_model("bert"), 3)
    for bad, message in [("abc", "settings: expected a dict or None, got str"),
                         ({"steps": torch.tensor(3)}, "settings: expected values JSON can hold"),
                         ({"loss": float("nan")}, r"settings: expected values JSON can hold \(settings\['loss'\] = nan is not"),
                         ({"runs": [1, float("inf")]}, r"can hold \(settings\['runs'\]\[1\] = inf is not a finite"),
                         # JSON turned them into strings: read back as {"0": ...}, silently
                         ({"per_layer": {0: 2}}, r"^settings: expected string keys, as JSON holds them; the key 0 of "
                                                 r"settings\['per_layer'\] is not a string")]:
        with pytest.raises(TypeError, match=message):
            save_pruned(tiny_model("bert"), tmp_path / "m", settings=bad)
        assert not (tmp_path / "m").exists()
    model = tiny_model("bert")  # as the tokenizer: its save_pretrained wrote over the directory's config
    for wrong in (model, model.config):
        with pytest.raises(TypeError, match="tokenizer: expected a tokenizer or processor with save_pretrained, got Bert"):
            save_pruned(model, tmp_path / "m", tokenizer=wrong)


@pytest.mark.parametrize("family, build, heads", [
    ("bert", dict(add_pooling_layer=False), None),
    ("bert", dict(add_pooling_layer=False), {0: [1]}),
    ("roberta", dict(add_pooling_layer=False), {0: [0, 2], 1: [3]}),
    ("vit", dict(add_pooling_layer=False), {0: [1], 1: [1]}),
    ("vit", dict(use_mask_token=True), {0: [1]}),
], ids=["bert-unpruned", "bert-uneven", "roberta-uneven", "vit-uniform", "vit-mask-token"])
def test_optional_parts_are_rebuilt_as_saved(family, build, heads, tmp_path):
    """A model built without its pooler (or with ViT's mask token) reloads the same way, not
    with a random pooler it never had, and not refused."""
    import transformers

    from hf_tiny import tiny_config

    torch.manual_seed(0)
    cls = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel, "vit": transformers.ViTModel}[family]
    model = cls(tiny_config(family), **build).eval()
    if heads:
        prune_heads(model, heads)
    save_pruned(model, tmp_path)
    again = load_pruned(tmp_path)
    assert again.state_dict().keys() == model.state_dict().keys()
    batch = tiny_batch(family)
    with torch.no_grad():
        assert torch.equal(_first(again(**batch)), _first(model(**batch)))


def test_weights_under_module_names_load(tmp_path):
    """ViT's save_pretrained writes its historical tensor names; a directory whose weights use
    the module names (as other transformers versions write them) loads too."""
    from safetensors.torch import save_file

    model = tiny_model("vit")
    prune_heads(model, {0: [1], 1: [1]})
    save_pruned(model, tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    batch = tiny_batch("vit")
    with torch.no_grad():
        assert torch.equal(_first(load_pruned(tmp_path)(**batch)), _first(model(**batch)))


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_uniform_refit_saves_plain_where_the_config_declares_biases(family, tmp_path):
    """A uniform layout with least-squares compensation (an o bias the family lacks): families
    whose config can switch on attention biases save it plainly (zero q/k/v biases), the
    others for load_pruned only; both reload to the same function."""
    import transformers

    from headprune.hf import ADAPTERS

    model = tiny_model(family)
    n = len(resolve_sites(model))
    scores = collect(model, [tiny_batch(family)], progress=False, moments=True)
    prune_heads(model, {i: [2, 3] for i in range(n)}, reconstruct=scores)
    batch = tiny_batch(family)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = _first(model(**batch))
    save_pruned(model, tmp_path)
    assert {k: v for k, v in model.state_dict().items()}.keys() == params.keys()  # the model is as it was
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    meta = json.loads((tmp_path / "headprune.json").read_text())
    declares = ADAPTERS[family].config_bias is not None
    assert meta["plain_loadable"] == declares and bool(meta["o_bias"]) != declares
    again = load_pruned(tmp_path)
    with torch.no_grad():
        assert torch.equal(_first(again(**batch)), ref)
        if declares:
            plain = transformers.AutoModel.from_pretrained(tmp_path).eval()
            assert torch.equal(_first(plain(**batch)), ref)
    # pruned further (no longer uniform) and saved again: still the same function on reload
    prune_heads(again, {0: [0]})
    with torch.no_grad():
        ref = _first(again(**batch))
    save_pruned(again, tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(_first(load_pruned(tmp_path / "b")(**batch)), ref)


def test_a_uniform_layout_loaded_plainly_refuses_head_indices(tmp_path):
    """Plain from_pretrained keeps no pruning record, so the heads' positions are not the
    original indices headprune.json keeps: pruning or masking that model is refused (it removed
    original head 3 for a request of 2, and saved the pruned config as the original); a
    layout whose positions are its original indices (the last heads removed) is not."""
    import transformers

    from headprune.hf import mask_heads

    for removed, refused in (([1], True), ([3], False)):
        model = tiny_model("qwen3")
        prune_heads(model, {0: removed, 1: removed})
        save_pruned(model, tmp_path / str(removed))
        plain = transformers.AutoModel.from_pretrained(tmp_path / str(removed))
        if refused:
            with pytest.raises(ValueError, match=r"model: loaded from .* without its pruning record"):
                save_pruned(plain, tmp_path / "again")  # the record it would write holds no original indices
            for fn in (prune_heads, mask_heads):
                with pytest.raises(ValueError, match=r"model: loaded from .* without its pruning record \(plain "
                                                     r"from_pretrained\), .*layer 0 keeps original heads \[0, 2, "
                                                     r"3\].*; load it with headprune.load_pruned"):
                    fn(plain, {0: [2]})
        else:
            prune_heads(plain, {0: [2]})
            assert kept_heads(plain)[0] == [0, 1]
        again = load_pruned(tmp_path / str(removed))
        prune_heads(again, {0: [2]})  # with its record: original indices
        assert kept_heads(again)[0] == ([0, 3] if refused else [0, 1])


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_reloaded_uniform_layouts_keep_the_original_heads(family, tmp_path):
    """Reloading a uniform layout rebuilds the original model from a copy of its config (the
    pruning writes the new counts into the model's config) and keeps the original head count,
    so original indices work across reloads, plain or not: an already removed head is ignored,
    as transformers 4 did."""
    from headprune.hf.prune import STATE_ATTR

    model = tiny_model(family)
    n = len(resolve_sites(model))
    heads_before = model.config.num_attention_heads
    scores = collect(model, [tiny_batch(family)], progress=False, moments=True)
    batch = tiny_batch(family)
    for name, kw in [("plain", {}), ("refit", {"reconstruct": scores})]:
        pruned = tiny_model(family)
        prune_heads(pruned, {i: [1] for i in range(n)}, **kw)  # kept [0, 2, 3]: an index above the new count
        with torch.no_grad():
            ref = _first(pruned(**batch))
        save_pruned(pruned, tmp_path / name)
        again = load_pruned(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(_first(again(**batch)), ref)
        state = getattr(again, STATE_ATTR)
        assert state["original_config"]["num_attention_heads"] == heads_before
        assert state["num_heads"] == [heads_before] * n
        prune_heads(again, {0: [1, 3]})  # 1 is gone already; 3 is original head 3
        assert kept_heads(again)[0] == [0, 2]
        save_pruned(again, tmp_path / f"{name}_b")
        meta = json.loads((tmp_path / f"{name}_b" / "headprune.json").read_text())
        assert meta["original_config"]["num_attention_heads"] == heads_before
        assert kept_heads(load_pruned(tmp_path / f"{name}_b")) == kept_heads(again)


def test_a_directory_plain_loading_cannot_read_names_its_architecture(tmp_path):
    """A model read from a GGUF has no ``config.architectures``; its non-plain directory's
    config.json said ``"architectures": null``."""
    model = tiny_model("llama")
    model.config.architectures = None
    prune_heads(model, {0: [0, 1, 2, 3], 1: [1]})
    save_pruned(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [type(model).__name__]
    assert type(load_pruned(tmp_path)) is type(model)


def test_a_directory_only_load_pruned_reads_keeps_the_sampling_settings_and_says_its_dtype(tmp_path):
    """Uneven layouts saved config.json and the weights, not generation_config.json: the
    model came back with transformers' default sampling settings; and config.json said
    float32 beside bfloat16 weights."""
    import transformers

    from hf_tiny import tiny_config

    model = transformers.LlamaForCausalLM(tiny_config("llama")).to(torch.bfloat16).eval()
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.3
    model.generation_config.top_k, model.generation_config.max_new_tokens = 7, 17
    prune_heads(model, {0: [0, 1], 1: [3]})
    save_pruned(model, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "headprune.json").read_text())["plain_loadable"] is False
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_pruned(tmp_path / "p")
    g = back.generation_config
    assert (g.do_sample, g.temperature, g.top_k, g.max_new_tokens) == (True, 0.3, 7, 17)
    (tmp_path / "p" / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"path: .*generation_config.json is not a generation config"):
        load_pruned(tmp_path / "p")


@pytest.mark.parametrize("how", ["unpruned", "masked", "pruned"])
def test_a_model_of_mixed_float_types_comes_back_as_it_was(tmp_path, how):
    """Float32 norms beside bfloat16 weights: a directory plain loading reads (unpruned, masked)
    came back all in bfloat16 (the norms rounded), as from_pretrained(dtype=) casts every tensor
    to one type."""
    from headprune.hf import mask_heads

    model = tiny_model("bert").to(torch.bfloat16)
    for name, module in model.named_modules():
        if name.endswith("LayerNorm"):
            module.float()
            with torch.no_grad():
                module.weight.add_(1e-3)  # not a bfloat16 number
    handle = mask_heads(model, {0: [1]}) if how == "masked" else None
    if how == "pruned":
        prune_heads(model, {0: [1], 1: [0, 2]})
    save_pruned(model, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "headprune.json").read_text())["plain_loadable"] is (how != "pruned")
    want, got = model.state_dict(), load_pruned(tmp_path / "p").state_dict()
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    assert all(torch.equal(got[k], want[k]) for k in want)
    if handle is not None:
        handle.restore()


def test_a_compiled_model_saves_as_the_model_it_compiles(tmp_path):
    """torch.compile's wrapper shares the model's parameters; its class and its ``_orig_mod.``
    keys name no model, so the directory records the model inside, and loads bit-exactly."""
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="eager")
    prune_heads(compiled, {1: [0, 1]})
    save_pruned(compiled, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "headprune.json").read_text())["architecture"] == type(model).__name__
    back = load_pruned(tmp_path / "c")
    assert kept_heads(back) == kept_heads(model)
    batch = tiny_batch("llama")
    with torch.no_grad():
        assert torch.equal(_first(back(**batch)), _first(model(**batch)))
