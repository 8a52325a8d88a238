"""export_gguf refuses what a GGUF would hold wrongly: a compiled model's wrapper names, a model
without its LM head, a source without one of the tensors the export copies from it; a llama
file's attention biases are all there or none."""

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_tiny import tiny_batch, tiny_config  # noqa: E402

from headprune.hf import collect, prune_heads  # noqa: E402
from headprune.hf.gguf_export import export_gguf  # noqa: E402
from test_gguf_export import _llama, _logits, _read_back  # noqa: E402


def test_a_compiled_model_is_written_as_the_model_it_wraps(tmp_path):
    """A torch.compile wrapper's weights are named _orig_mod.*, which map to no GGUF tensor: the
    file held the attention alone (no embeddings, norms or feed-forward) and said nothing."""
    model = _llama()
    prune_heads(model, {0: [1, 3], 1: [0, 2]})
    plain = export_gguf(model, tmp_path / "plain.gguf")
    assert export_gguf(torch.compile(model), tmp_path / "compiled.gguf") == plain
    assert "token_embd.weight" in plain and "blk.1.ffn_down.weight" in plain
    model.model.layers[1] = torch.compile(model.model.layers[1])
    with pytest.raises(ValueError, match=r"model: model.layers.1 is a torch.compile wrapper inside the model"):
        export_gguf(model, tmp_path / "nested.gguf")
    assert not (tmp_path / "nested.gguf").exists()


def test_a_model_without_its_lm_head_is_refused(tmp_path):
    """A base LlamaModel was written without output.weight, which readers take as tied embeddings."""
    import transformers

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"model: expected a causal LM with its LM head .* got LlamaModel"):
        export_gguf(transformers.LlamaModel(tiny_config("llama")), tmp_path / "base.gguf")
    assert not (tmp_path / "base.gguf").exists()


def _without(src, dst, name):
    """``src`` rewritten without the tensor ``name``."""
    import numpy as np

    r, w = gguf.GGUFReader(str(src)), gguf.GGUFWriter(str(dst), "llama")
    for key, field in r.fields.items():
        if not (key.startswith("GGUF.") or key == "general.architecture"):
            vt = field.types[0]
            w.add_key_value(key, field.contents(), vt, sub_type=field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name != name:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["blk.1.ffn_down.weight", "output.weight"])
def test_a_source_without_a_tensor_the_export_copies_is_refused(tmp_path, name):
    """Every tensor but the attention comes from the source: one it lacks was left out of the
    file (an untied model's output.weight then read as the embeddings, logits off by 2.5)."""
    model = _llama()
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied: output.weight is the model's own
    export_gguf(model, tmp_path / "whole.gguf")
    _without(tmp_path / "whole.gguf", tmp_path / "src.gguf", name)
    prune_heads(model, {0: [1, 3], 1: [0, 2]})
    with pytest.raises(ValueError, match=rf"source: .*src.gguf lacks the model's tensor {name}, which the export"):
        export_gguf(model, tmp_path / "out.gguf", source=tmp_path / "src.gguf")
    assert not (tmp_path / "out.gguf").exists()
    assert export_gguf(model, tmp_path / "out.gguf", source=tmp_path / "whole.gguf")  # the whole source is taken


def test_a_llama_file_has_every_layers_attention_biases_or_none(tmp_path):
    """One layer refit (an o bias) and one pruned without: the other layer's biases were left out,
    which transformers' single attention_bias reads as missing weights (headprune's loader
    refused the file it wrote); they are written as zeros."""
    from headprune.app.load import load_model
    from test_speed import _tokenizer_dir
    import transformers

    model = _llama()
    batch = tiny_batch("llama")
    prune_heads(model, {0: [1, 3]}, reconstruct=collect(model, [batch], progress=False, moments=True))
    prune_heads(model, {1: [0, 2]})
    assert model.model.layers[1].self_attn.o_proj.bias is None
    written = export_gguf(model, tmp_path / "m.gguf")
    assert all(f"blk.{i}.attn_{p}.bias" in written for i in (0, 1) for p in ("q", "k", "v", "output"))
    ids = batch["input_ids"][:, :7]
    torch.testing.assert_close(_logits(_read_back(tmp_path / "m.gguf"), ids), _logits(model, ids), rtol=0, atol=1e-6)
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
        loaded = load_model(str(tmp_path / "m.gguf"))
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model, ids), rtol=0, atol=1e-6)


def test_tensors_the_model_changed_are_written_from_the_model(tmp_path):
    """Tensors other than the attention were copied from the source whatever the model held (a
    feed-forward or norm changed after loading went back to the source's values, logits off by
    1.0); those the model changed are written from it, with a warning, the rest copied."""
    export_gguf(_llama(), tmp_path / "src.gguf", dtype="float16")
    model = _read_back(tmp_path / "src.gguf")
    batch = tiny_batch("llama")
    prune_heads(model, {0: [1, 3], 1: [0, 2]}, reconstruct=collect(model, [batch], progress=False, moments=True))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.3)
        model.model.layers[0].post_attention_layernorm.weight.add_(0.3)
    with pytest.warns(UserWarning, match=r"model: 2 of the tensors the export copies from source= hold other values"):
        written = export_gguf(model, tmp_path / "out.gguf", source=tmp_path / "src.gguf")
    assert written["blk.1.ffn_down.weight"] == "F16" and written["blk.0.ffn_norm.weight"] == "F32"
    before = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "src.gguf")).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    same = [n for n in before if ".attn_" not in n and n not in ("blk.1.ffn_down.weight", "blk.0.ffn_norm.weight")]
    assert same and all(bytes(after[n].data) == bytes(before[n].data) for n in same)
    ids = batch["input_ids"][:, :7]
    torch.testing.assert_close(_logits(_read_back(tmp_path / "out.gguf"), ids), _logits(model, ids), rtol=0, atol=2e-3)


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16])
def test_a_directory_saved_narrower_still_takes_its_sources_tensors(tmp_path, saved):
    """prune saves a model read from a quantised GGUF in bfloat16, and export reads that
    directory back in float32: its values are the source's rounded, not changed, so the source's
    tensors are copied as they are, without a warning (every one was rewritten from the model)."""
    import warnings

    export_gguf(_llama(), tmp_path / "src.gguf", dtype="float32")
    model = _read_back(tmp_path / "src.gguf")
    prune_heads(model, {0: [1, 3], 1: [0, 2]})
    with torch.no_grad():  # saved narrower, read back in float32
        for p in model.parameters():
            p.copy_(p.to(saved).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_gguf(model, tmp_path / "out.gguf", source=tmp_path / "src.gguf")
    before = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "src.gguf")).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    assert all(bytes(after[n].data) == bytes(t.data) for n, t in before.items() if ".attn_" not in n)
