"""Loading a GGUF: a file without the fields that give the model's shape, or with a weight
missing, is refused (transformers would build default sizes, or fill the weight randomly)."""

import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from headprune.hf.gguf_export import export_gguf  # noqa: E402
from test_gguf_export import _llama  # noqa: E402


def test_loading_refuses_a_gguf_without_its_shape_or_with_a_weight_missing(tmp_path, monkeypatch):
    """transformers builds its config's default sizes for a GGUF that does not declare its
    own (a 7B Llama for ``llama``: about 20 GB before it fails) and fills a weight the file
    lacks with random values, warning only: both are refused, the first before any weight."""
    import transformers

    from headprune.app.load import load_model
    from headprune.hf import gguf_export
    from test_speed import _tokenizer_dir

    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"bare.gguf' lacks llama.feed_forward_length, tensor token_embd.weight"):
        load_model(str(tmp_path / "bare.gguf"))

    tensors = gguf_export._attention_tensors

    def without_a_query(*args, **kwargs):
        out = tensors(*args, **kwargs)
        del out["blk.1.attn_q.weight"]
        return out

    monkeypatch.setattr(gguf_export, "_attention_tensors", without_a_query)
    export_gguf(_llama(), tmp_path / "m.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    with pytest.raises(ValueError, match=r"m.gguf' lacks weights .*\(1: model.layers.1.self_attn.q_proj.weight\)"):
        load_model(str(tmp_path / "m.gguf"))
    monkeypatch.setattr(gguf_export, "_attention_tensors", tensors)
    export_gguf(_llama(), tmp_path / "whole.gguf")
    assert load_model(str(tmp_path / "whole.gguf")).kind == "causal"  # the complete file loads


def test_feed_forward_biases_are_read_back(tmp_path, monkeypatch):
    """A Llama with ``mlp_bias`` exports its feed-forward biases; transformers' GGUF config does not
    declare them, and its loader dropped them without a word (logits off by 1.5 here)."""
    import torch
    import transformers

    from headprune.app.load import load_model
    from hf_tiny import tiny_batch, tiny_config
    from test_speed import _tokenizer_dir

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", mlp_bias=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    export_gguf(model, tmp_path / "m.gguf")
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    back = load_model(str(tmp_path / "m.gguf")).model
    assert back.config.mlp_bias is True
    ids = tiny_batch("llama")["input_ids"][:, :7]
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("heads", [{0: [2, 3], 1: [2, 3]}, {0: [0], 1: [1, 2]}], ids=["uniform", "uneven"])
def test_a_model_transformers_read_from_a_gguf_saves_as_its_floats(tmp_path, heads):
    """transformers keeps a GGUF quantizer on the model it reads (its weights are floats):
    save_pretrained refused a uniform layout ("quantized with gguf ... not serializable"), and
    the configs asked for a GGUF. The model saves as the floats it holds and keeps its quantizer."""
    import json

    import torch
    import transformers

    from headprune.hf import load_pruned, prune_heads, save_pruned

    export_gguf(_llama(), tmp_path / "m.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    quantizer = model.hf_quantizer
    prune_heads(model, heads)
    save_pruned(model, tmp_path / "out")
    assert model.hf_quantizer is quantizer and model.is_quantized and hasattr(model.config, "quantization_config")
    for name in ("config.json", "headprune.json"):
        assert "quantization_config" not in (tmp_path / "out" / name).read_text()
    assert json.loads((tmp_path / "out" / "headprune.json").read_text())["plain_loadable"] == (heads[0] == [2, 3])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path / "out")(input_ids=ids).logits, model(input_ids=ids).logits)
