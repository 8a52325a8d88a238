"""Contract: every adapter resolves on a tiny random model of its family."""

import pytest
import torch

from hf_tiny import FAMILIES, GQA_FAMILIES, tiny_batch, tiny_config, tiny_model

from headprune.hf import collect
from headprune.hf.adapters import ADAPTERS, check_layout, get_adapter, head_counts, head_dim, resolve_sites


def test_every_family_has_a_tiny_config():
    assert set(FAMILIES) == set(ADAPTERS)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_resolves(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    expected = 6 if family == "t5" else 2
    assert [s.index for s in sites] == list(range(expected))
    for site in sites:
        hq, hkv = head_counts(site, adapter)
        assert hq == 4
        assert hkv == (2 if family in GQA_FAMILIES else 4)
        assert head_dim(site, adapter) * hq == site.o.weight.shape[0 if adapter.conv1d else 1]
    check_layout(model)
    if family == "t5":
        assert [s.block.kind for s in sites] == ["self"] * 4 + ["cross"] * 2
        assert sites[4].name == "decoder.0.cross"


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_adapter_resolves_through_task_heads(family):
    import transformers

    cls = transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForMaskedLM
    model = cls.from_config(tiny_config(family))
    assert len(resolve_sites(model)) == 2


def test_unsupported_model_lists_supported_types():
    import transformers

    cfg = transformers.GPTNeoXConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=50)
    model = transformers.AutoModel.from_config(cfg)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'.*bert.*t5"):
        get_adapter(model)


def test_non_model_is_rejected():
    with pytest.raises(ValueError, match="model: unsupported"):
        get_adapter(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", FAMILIES)
def test_first_layer_of_each_causal_stack_is_what_the_default_keeps(family):
    """The adapter record says which blocks attend causally; the default recipe keeps the first
    layer of each causal stack whole: layer 0 of a decoder-only LM, the decoder's first
    self-attention of T5, nothing in an encoder."""
    from headprune.ranking import default_protected

    model = tiny_model(family)
    scores = collect(model, [tiny_batch(family)], progress=False)
    sites = resolve_sites(model)
    assert scores.depth == [s.depth for s in sites]
    kind = get_adapter(model).kind
    want = {"causal": (0,), "encoder": (), "seq2seq": tuple(s.index for s in sites if s.name == "decoder.0.self")}
    assert default_protected(scores) == want[kind]
    assert kind != "seq2seq" or want[kind] == (2,)  # sites: encoder 0-1, decoder self 2-3, cross 4-5


def test_attention_shared_between_layers_is_refused_by_name():
    """One module in two layers (ALBERT-style sharing) would be sliced twice by a pruning of
    both sites, and once for both by a pruning of one: refused before anything changes."""
    from headprune.hf import prune_heads

    from headprune.hf import mask_heads

    for share, said in [(lambda m: setattr(m.layers[1], "self_attn", m.layers[0].self_attn), "one attention module"),
                        # one output projection, or its weight: a mask of one site masked both, a pruning sliced one
                        # and untied them, and the collection counted both layers' tokens in each site
                        (lambda m: setattr(m.layers[1].self_attn, "o_proj", m.layers[0].self_attn.o_proj),
                         "their self_attn.o_proj"),
                        (lambda m: setattr(m.layers[1].self_attn.o_proj, "weight", m.layers[0].self_attn.o_proj.weight),
                         "their self_attn.o_proj.weight")]:
        model = tiny_model("llama")
        share(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for call in (lambda: resolve_sites(model), lambda: collect(model, [tiny_batch("llama")]),
                     lambda: prune_heads(model, {0: [1]}), lambda: mask_heads(model, {0: [1]})):
            with pytest.raises(ValueError, match=rf"sites 0 \(.*\) and 1 \(.*\) share {said};"):
                call()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_flex_attention_is_refused_naming_its_mask():
    """Flex attention hands a BlockMask, which the refusal called a "?-D or non-tensor mask".
    (Its own stand-in: building a flex-attention model compiles, and aborted under AVX2 kernels.)"""
    from headprune.hf.sdpa_mirror import effective_mask

    class BlockMask:
        pass

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match=r"^attention implementation 'flex_attention' hands a mask of type "
                                                  r"BlockMask, not the 4-D tensor headprune reads; collect with"):
        effective_mask("flex_attention", None, q, q, BlockMask(), {})


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_cross_attention_the_adapter_does_not_list_is_said(family):
    """A BERT or GPT-2 with add_cross_attention has cross-attention layers no site names: they were
    neither collected nor prunable, and nothing said so."""
    import warnings

    from headprune.hf import collect

    model = tiny_model(family, add_cross_attention=True, is_decoder=True)
    batch = {**tiny_batch(family), "encoder_hidden_states": torch.randn(3, 5, model.config.hidden_size)}
    with pytest.warns(UserWarning, match=r"has cross-attention layers \(add_cross_attention\), which headprune "
                                         r"neither collects nor masks nor prunes") as seen:
        collect(model, [batch], progress=False)
    assert len([w for w in seen if "cross-attention" in str(w.message)]) == 1  # once per model: it came 8-12 times
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same families without cross-attention: no word
        collect(tiny_model(family), [tiny_batch(family)], progress=False)
        collect(model, [batch], progress=False)  # said once for this model
        llama = tiny_model("llama", add_cross_attention=True)  # a flag its code ignores: no such layer
        collect(llama, [tiny_batch("llama")], progress=False)
