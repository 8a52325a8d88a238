"""export_gguf: pruned Llama models as GGUF files that transformers' GGUF loader reads back to
the same function (llama.cpp itself is checked by benchmarks/bench_gguf.py)."""

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_tiny import tiny_batch, tiny_config  # noqa: E402

from headprune.hf import collect, prune_heads  # noqa: E402
from headprune.hf.gguf_export import export_gguf, gguf_attention_bias  # noqa: E402


def _llama(seed=0):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config("llama")).eval()


def _read_back(path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.attention_bias = gguf_attention_bias(path)
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                             dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("refit", [False, True])
def test_uniform_pruned_model_reads_back_to_the_same_function(tmp_path, refit):
    model = _llama()
    batch = tiny_batch("llama")
    kw = {"reconstruct": collect(model, [batch], progress=False, moments=True)} if refit else {}
    prune_heads(model, {0: [1, 3], 1: [0, 2]}, **kw)  # one head of each KV group: 2 query / 2 KV per layer
    written = export_gguf(model, tmp_path / "m.gguf")
    assert ("blk.0.attn_output.bias" in written) == refit and gguf_attention_bias(tmp_path / "m.gguf") == refit
    back = _read_back(tmp_path / "m.gguf")
    assert back.config.num_attention_heads == 2 and back.config.num_key_value_heads == 2
    ids = batch["input_ids"][:, :7]
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=0, atol=1e-6)


def test_with_a_source_the_untouched_tensors_and_fields_are_copied(tmp_path):
    model = _llama()
    export_gguf(model, tmp_path / "src.gguf", dtype="float16")  # the "original" GGUF, float16 weights
    src = _read_back(tmp_path / "src.gguf")
    batch = tiny_batch("llama")
    prune_heads(src, {0: [0, 2], 1: [1, 3]}, reconstruct=collect(src, [batch], progress=False, moments=True))
    written = export_gguf(src, tmp_path / "out.gguf", source=tmp_path / "src.gguf")
    before = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "src.gguf")).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    for name, t in before.items():
        if ".attn_" not in name:
            assert after[name].tensor_type == t.tensor_type and bytes(after[name].data) == bytes(t.data)
    # kept q/k/v rows of a float16 tensor are written back in float16, exactly
    assert written["blk.0.attn_v.weight"] == "F16"
    src_v = torch.from_numpy(before["blk.0.attn_v.weight"].data.astype("float32"))
    out_v = torch.from_numpy(after["blk.0.attn_v.weight"].data.astype("float32"))
    assert all(any(torch.equal(row, r) for r in src_v) for row in out_v)  # rows of the original
    fields = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    assert fields["llama.attention.head_count"].contents() == 2
    assert fields["llama.block_count"].contents() == 2
    ids = batch["input_ids"][:, :7]
    torch.testing.assert_close(_logits(_read_back(tmp_path / "out.gguf"), ids), _logits(src, ids), rtol=0,
                               atol=2e-2)  # the refit o projection rounded to float16


def test_refusals(tmp_path):
    model = _llama()
    prune_heads(model, {0: [1]})
    with pytest.raises(ValueError, match="reads one head count for every layer"):
        export_gguf(model, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="dtype: expected one of auto, float32, float16"):
        export_gguf(_llama(), tmp_path / "m.gguf", dtype="int8")
    from hf_tiny import tiny_model

    with pytest.raises(ValueError, match="GGUF export writes llama models, got bert"):
        export_gguf(tiny_model("bert"), tmp_path / "m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_gguf(_llama(), tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left


def test_a_model_read_from_gguf_saves_like_any_other(tmp_path):
    """transformers leaves a GGUF quantizer on what it reads (its weights are plain floats), and
    save_pretrained refuses such a model: the loader drops it, so a uniformly pruned model read
    from a GGUF saves plainly and reloads."""
    import transformers

    from headprune.app.load import _dequantized
    from headprune.hf import save_pruned

    export_gguf(_llama(), tmp_path / "src.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="src.gguf", dtype=torch.float32)
    _dequantized(model)
    prune_heads(model, {0: [0, 2], 1: [1, 3]})
    save_pruned(model, tmp_path / "out")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tiny_batch("llama")["input_ids"][:, :5]
    assert torch.equal(_logits(plain, ids), _logits(model.eval(), ids))
