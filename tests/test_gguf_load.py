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


def _rewrite(src, dst, *, arch=None, fields=None, tensors=None):
    """``src`` written again as ``dst``: the architecture renamed, fields added or overridden
    (``{name: (value, GGUFValueType)}``), tensors added."""
    import numpy as np

    r = gguf.GGUFReader(str(src))
    a0 = r.fields["general.architecture"].contents()
    arch, fields = arch or a0, dict(fields or {})
    w = gguf.GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        new = arch + name[len(a0):] if name.startswith(a0 + ".") else name
        if name.startswith("GGUF.") or name == "general.architecture" or new in fields:
            continue
        vt = f.types[0]
        w.add_key_value(new, f.contents(), vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for name, (value, vt) in fields.items():
        w.add_key_value(name, value, vt)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=None if t.tensor_type in (0, 1) else np.array(t.data).shape,
                     raw_dtype=None if t.tensor_type in (0, 1) else t.tensor_type)
    for name, data in (tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_what_transformers_would_read_otherwise_is_refused_before_the_weights(tmp_path, monkeypatch):
    """Scaled RoPE (Llama 3's rope_freqs tensor, or rope.scaling fields), which transformers'
    GGUF loader drops, loaded as an unscaled model without a word; a block count above the
    blocks the file holds took hours to build; a family headprune does not prune was read and
    dequantised whole before it was refused, as an encoder."""
    import numpy as np

    from headprune.app.load import load_model

    export_gguf(_llama(), tmp_path / "m.gguf", dtype="float32")
    V = gguf.GGUFValueType
    cases = {"rope_freqs": ({"tensors": {"rope_freqs.weight": np.full(4, 8.0, np.float32)}},
                            r"holds scaled RoPE \(a rope_freqs tensor\), which transformers' GGUF loader drops"),
             "linear": ({"fields": {"llama.rope.scaling.type": ("linear", V.STRING)}},
                        r"holds scaled RoPE \(llama.rope.scaling.type linear\)"),
             "blocks": ({"fields": {"llama.block_count": (2000, V.UINT32)}},
                        r"holds llama.block_count 2000 against the 2 blocks its tensors hold \(a damaged file\)"),
             "falcon": ({"arch": "falcon"}, r"is a GGUF of 'falcon', which headprune does not prune; it prunes bert")}
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("read"))
    for name, (kw, match) in cases.items():
        _rewrite(tmp_path / "m.gguf", tmp_path / f"{name}.gguf", **kw)
        with pytest.raises(ValueError, match=match):
            load_model(str(tmp_path / f"{name}.gguf"))


def test_a_weight_of_another_shape_than_the_fields_say_is_refused_naming_it(tmp_path, monkeypatch):
    """transformers raised its own RuntimeError (ignore_mismatched_sizes) before the refusal that
    names the weights; a tokenizer transformers fails to build with a KeyError was a traceback."""
    import transformers

    from headprune.app.load import load_model
    from test_speed import _tokenizer_dir

    export_gguf(_llama(), tmp_path / "m.gguf", dtype="float32")
    width = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["llama.feed_forward_length"].contents()
    _rewrite(tmp_path / "m.gguf", tmp_path / "s.gguf",
             fields={"llama.feed_forward_length": (width - 16, gguf.GGUFValueType.UINT32)})
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    with pytest.raises(ValueError, match=r"s.gguf' lacks weights its model needs, or holds them in another shape "
                                         r"\(\d+: \('model.layers.\d.mlp"):
        load_model(str(tmp_path / "s.gguf"))

    def broken(*a, **k):
        raise KeyError("scores")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(ValueError, match=r"MODEL: transformers cannot read a tokenizer from .*m.gguf' \('scores'\)"):
        load_model(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_an_unquantised_gguf_is_saved_in_its_own_float_type(tmp_path, monkeypatch, dtype):
    """Every GGUF counted as quantised, so an F16 file's pruned model was saved in bfloat16
    (lossy where float16 is exact); a quantised one still saves in bfloat16."""
    import transformers

    from headprune.app.load import load_model, stored_type_name
    from test_speed import _tokenizer_dir

    export_gguf(_llama(), tmp_path / "m.gguf", dtype=dtype)
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    loaded = load_model(str(tmp_path / "m.gguf"))
    assert (loaded.checkpoint_dtype, stored_type_name(loaded)) == ("gguf", dtype)
    loaded.gguf_float = None  # a quantised file's
    assert stored_type_name(loaded) == "bfloat16"


def test_a_gguf_beside_a_pruned_models_record_takes_head_indices(tmp_path, monkeypatch):
    """A GGUF in a pruned model's folder (an export shipped with the weights) was taken for that
    folder's model loaded without its record, and every pruning of it refused."""
    import transformers

    from headprune.app.load import load_model
    from headprune.hf import kept_heads, prune_heads, save_pruned
    from test_speed import _tokenizer_dir

    model = _llama()
    prune_heads(model, {0: [1, 2], 1: [1, 2]})  # (heads that divide the hidden size: transformers' check)
    save_pruned(model, tmp_path / "d")
    export_gguf(model, tmp_path / "d" / "m.gguf", dtype="float32")
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    loaded = load_model(str(tmp_path / "d" / "m.gguf"))
    prune_heads(loaded.model, {0: [0]})
    assert kept_heads(loaded.model)[0] == [1]
