"""Layers pruned to no head at all, as the rest of transformers sees them: one attention map
per layer, and caches that are not transformers' own left alone."""

import pytest
import torch
import transformers
from hf_tiny import tiny_config

import headprune
from headprune.hf.empty import _advance_cache

CLASSES = {"llama": transformers.LlamaForCausalLM, "bert": transformers.BertModel,
           "t5": transformers.T5ForConditionalGeneration}


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_an_empty_layer_keeps_its_place_among_the_attention_maps(model_type):
    """Its weights were None, which transformers leaves out of ``output_attentions``: the tuple
    was a layer short, and every later layer's map sat at the index before its own."""
    layers = dict(num_layers=3, num_decoder_layers=3) if model_type == "t5" else dict(num_hidden_layers=3)
    torch.manual_seed(0)
    model = CLASSES[model_type]._from_config(tiny_config(model_type, **layers), attn_implementation="eager").eval()
    headprune.prune_heads(model, {1: [0, 1, 2, 3], 2: [0]})
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids} if model_type == "t5" else {}
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, **extra)
    maps = out.encoder_attentions if model_type == "t5" else out.attentions
    assert [tuple(a.shape) for a in maps] == [(2, 4, 6, 6), (2, 0, 6, 6), (2, 3, 6, 6)]


def test_a_cached_decode_step_gives_the_empty_layer_a_map_over_every_key():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(tiny_config("llama", num_hidden_layers=2),
                                                       attn_implementation="eager").eval()
    headprune.prune_heads(model, {0: [0, 1, 2, 3]})
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values, output_attentions=True)
    assert [tuple(a.shape) for a in step.attentions] == [(1, 0, 1, 6), (1, 4, 1, 6)]


def test_a_cache_that_is_not_transformers_cache_is_left_alone():
    """Continuous batching's paged cache takes positions from its scheduler and another
    ``update`` signature: the empty layer's call failed, and generate_batch returned nothing."""
    calls = []

    class Paged:
        def update(self, key, value, layer_idx, kwargs):  # noqa: ARG002
            calls.append(layer_idx)

    module = torch.nn.Module()
    module.layer_idx = 0
    _advance_cache(module, Paged(), torch.zeros(1, 3, 8), cross=False)
    assert calls == []
    cache = transformers.DynamicCache()
    _advance_cache(module, cache, torch.zeros(1, 3, 8), cross=False)
    assert cache.get_seq_length(0) == 3


def test_selection_on_a_model_with_an_emptied_layer():
    """A layer pruned to no head: select_heads(uniform=True, gqa="group") divided by its zero
    heads, select_measured(gqa="group") refused its unit size as another, and counts={layer: 0}
    was refused as out of [0, 0]."""
    from hf_tiny import tiny_batch

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(tiny_config("llama", num_hidden_layers=3)).eval()
    headprune.prune_heads(model, {1: [0, 1, 2, 3]})
    batches = [tiny_batch("llama", seed=s) for s in range(2)]
    scores = headprune.collect(model, batches, progress=False, moments=True)
    with pytest.raises(ValueError, match=r"^uniform: the sites have different head layouts"):
        headprune.select_heads(scores, ratio=0.5, gqa="group", uniform=True)
    chosen = headprune.select_heads(scores, counts={2: 2, 1: 0}, gqa="even")
    assert list(chosen) == [2] and len(chosen[2]) == 2
    heads, _ = headprune.select_measured(model, batches, scores, ratio=0.5, gqa="group")
    assert list(heads) == [2] and len(heads[2]) == 2  # a group of the one layer neither protected nor empty
