"""load_pruned reads the weights as saved: from the files transformers would read, and into
parameters untied where the saved tensors of a tied group differ."""

import json

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model

from headprune.hf import load_pruned, prune_heads, save_pruned


def test_an_output_layer_untied_from_a_tied_config_reloads_as_saved(tmp_path):
    """The config ties the embeddings, the model's lm_head was trained apart: both tensors are
    saved, and a layout only load_pruned reads loaded them into one tied parameter (the input
    embedding silently became the lm_head). They load untied, as transformers loads a plain one."""
    import transformers

    from hf_tiny import tiny_batch, tiny_config

    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(tiny_config("llama", tie_word_embeddings=True)).eval()
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach() * 2)
    prune_heads(m, {0: [0], 1: [1, 2]})  # uneven: rebuilt from the original config
    save_pruned(m, tmp_path / "p")
    back = load_pruned(tmp_path / "p")
    assert torch.equal(back.model.embed_tokens.weight, m.model.embed_tokens.weight)
    assert torch.equal(back.lm_head.weight, m.lm_head.weight) and back.lm_head.weight is not back.model.embed_tokens.weight
    assert back.config.tie_word_embeddings is False
    b = tiny_batch("llama")
    with torch.no_grad():
        assert torch.equal(back(**b).logits, m(**b).logits)
    tied = transformers.LlamaForCausalLM(tiny_config("llama", tie_word_embeddings=True)).eval()  # tied stays tied
    prune_heads(tied, {0: [0], 1: [1, 2]})
    save_pruned(tied, tmp_path / "t")
    again = load_pruned(tmp_path / "t")
    assert again.lm_head.weight is again.model.embed_tokens.weight and again.config.tie_word_embeddings is True


def test_weights_are_checked_where_transformers_reads_them(tmp_path):
    """A directory with ``model.safetensors`` and a shard index: transformers loads the first, and
    the checks read the index's shards (which may be other weights, or none)."""
    import shutil

    from headprune.hf.files import SAFE_INDEX, safetensors_files

    model = tiny_model("llama")
    prune_heads(model, {0: [2, 3], 1: [2, 3]})  # uniform: a plain directory
    save_pruned(model, tmp_path / "p")
    shutil.copytree(tmp_path / "p", tmp_path / "both")
    (tmp_path / "both" / SAFE_INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": "gone.safetensors"}}))
    assert safetensors_files(tmp_path / "both", "path") == [str(tmp_path / "both" / "model.safetensors")]
    back = load_pruned(tmp_path / "both")
    b = tiny_batch("llama")
    with torch.no_grad():
        assert torch.equal(back(**b).last_hidden_state, model(**b).last_hidden_state)


def test_a_folder_prune_wrote_loads_as_its_model(tmp_path):
    """``load_pruned`` of the folder ``headprune prune`` writes (the CLI reads it as MODEL) asked
    whether save_pruned had written it; then it said where the model is; it loads that model,
    as the command line does. Reading its metadata still says where the model is."""
    import pytest

    from headprune.hf import kept_heads
    from headprune.hf.metadata import read_metadata

    model = tiny_model("llama")
    prune_heads(model, {0: [1]})
    save_pruned(model, tmp_path / "out" / "model")
    (tmp_path / "out" / "report.json").write_text("{}")
    assert kept_heads(load_pruned(tmp_path / "out")) == kept_heads(load_pruned(tmp_path / "out" / "model"))
    with pytest.raises(FileNotFoundError, match=r"is a folder headprune wrote \(prune or recover\); the model is its model/: load "):
        read_metadata(tmp_path / "out")


def test_a_class_without_sdpa_falls_back_to_eager(tmp_path):
    """Gemma 2 has no SDPA path: a model saved with an attention that does not run here failed to
    load with the sdpa fallback (the warning promised it)."""
    import pytest

    model = tiny_model("gemma2")
    prune_heads(model, {0: [1]})
    save_pruned(model, tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "headprune.json").read_text())
    (tmp_path / "g" / "headprune.json").write_text(json.dumps({**meta, "attn_implementation": "org/kernel"}))
    with pytest.warns(UserWarning, match="does not run here; the model is loaded with eager"):
        back = load_pruned(tmp_path / "g")
    assert back.config._attn_implementation == "eager"
    b = tiny_batch("gemma2")
    with torch.no_grad():
        assert torch.equal(back(**b).last_hidden_state, model(**b).last_hidden_state)


def test_config_set_after_pruning_is_saved_with_the_original_head_counts(tmp_path):
    """A directory only load_pruned reads wrote, and rebuilt from, the config recorded at the
    first pruning: labels, token ids and the problem type set afterwards were lost. A uniform
    layout (written into the config) saved plain keeps them too; GPT-2's config names its head
    count n_head."""
    import transformers

    from hf_tiny import tiny_config

    edits = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1},
             "pad_token_id": 5, "problem_type": "single_label_classification"}
    for family, cls, heads in (("bert", transformers.BertForSequenceClassification, {0: [1], 1: [0, 3]}),
                               ("gpt2", transformers.GPT2ForSequenceClassification, {0: [1], 1: [0, 3]}),
                               ("llama", transformers.LlamaForSequenceClassification, {0: [1], 1: [2]})):
        torch.manual_seed(0)
        model = cls(tiny_config(family, num_labels=2)).eval()
        prune_heads(model, heads)
        for k, v in edits.items():
            setattr(model.config, k, v)
        save_pruned(model, tmp_path / family)
        loaded = load_pruned(tmp_path / family)
        assert {k: getattr(loaded.config, k) for k in edits} == edits, family
        assert loaded.config.num_attention_heads == 4  # the original count: load_pruned prunes it again
        batch = tiny_batch(family)
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, model(**batch).logits), family


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", ["bert", "roberta", "opt", "vit"])
def test_a_model_in_the_plain_layout_reloads_bit_exactly(family, dtype, tmp_path):
    """from_pretrained leaves the weights in the file's memory map at addresses its header's
    length decides; float64 products there, and float32 ones of a single row (one token),
    rounded otherwise (1 ulp) than in the saved model."""
    from headprune.hf import mask_heads

    model = tiny_model(family).to(dtype)
    mask_heads(model, {0: [1]})
    save_pruned(model, tmp_path / "m")
    back = load_pruned(tmp_path / "m")
    assert not [n for n, p in back.named_parameters() if p.data_ptr() % 64]
    batch = tiny_batch(family)
    one = {k: v[:1, :1] for k, v in batch.items()} if "input_ids" in batch else {k: v[:1] for k, v in batch.items()}
    for inputs in (batch, one):
        with torch.no_grad():
            a, b = model(**inputs), back(**inputs)
        key = "logits" if "logits" in a else "last_hidden_state"
        assert torch.equal(a[key], b[key])
