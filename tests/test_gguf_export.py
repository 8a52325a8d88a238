"""export_gguf: pruned Llama models as GGUF files that transformers' GGUF loader reads back to
the same function (llama.cpp itself is checked by benchmarks/bench_gguf.py)."""

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from hf_tiny import tiny_batch, tiny_config  # noqa: E402

from headprune.app.prune_command import _export_gguf  # noqa: E402
from headprune.hf import collect, prune_heads  # noqa: E402
from headprune.hf.gguf_export import export_gguf, gguf_architecture, gguf_attention_bias  # noqa: E402


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
    if refit:  # as the module doc and the README say: plain transformers drops the bias unless asked
        import transformers

        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
        asked = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                                                  attention_bias=True)
        assert not plain.config.attention_bias and plain.model.layers[0].self_attn.o_proj.bias is None
        torch.testing.assert_close(_logits(asked.eval(), ids), _logits(model, ids), rtol=0, atol=1e-6)


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


def _unpermute(w, heads):
    """The inverse of the exporter's rotary row order (llama.cpp's) for q and k."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("refit", [False, True])
def test_uneven_layers_are_written_as_deci_with_per_layer_head_counts(tmp_path, refit):
    """Layers that keep different head counts are written as llama.cpp's ``deci`` architecture:
    per-layer head-count arrays, each layer's tensors its own weights in llama.cpp's layout
    (llama.cpp itself runs it in benchmarks/bench_gguf.py)."""
    model = _llama()
    batch = tiny_batch("llama")
    kw = {"reconstruct": collect(model, [batch], progress=False, moments=True)} if refit else {}
    prune_heads(model, {0: [0, 1]}, **kw)  # layer 0 loses a whole KV group, layer 1 keeps all
    written = export_gguf(model, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.attention.head_count"].contents() == [2, 4]
    assert reader.fields["deci.attention.head_count_kv"].contents() == [1, 2]
    assert reader.fields["deci.block_count"].contents() == 2 and not any(k.startswith("llama.") for k in reader.fields)
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        hq, hkv = (2, 1) if i == 0 else (4, 2)
        assert torch.equal(_unpermute(tensors[f"blk.{i}.attn_q.weight"], hq), a.q_proj.weight)
        assert torch.equal(_unpermute(tensors[f"blk.{i}.attn_k.weight"], hkv), a.k_proj.weight)
        assert torch.equal(tensors[f"blk.{i}.attn_v.weight"], a.v_proj.weight)
        assert torch.equal(tensors[f"blk.{i}.attn_output.weight"], a.o_proj.weight)
        assert (f"blk.{i}.attn_output.bias" in written) == (refit and i == 0)  # the refit layer only
        if refit and i == 0:
            assert torch.equal(tensors[f"blk.{i}.attn_output.bias"], a.o_proj.bias)
    assert not any(n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias")) for n in written)  # o bias only
    assert torch.equal(tensors["blk.0.ffn_up.weight"], model.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match=r"^architecture: llama.cpp's llama architecture reads one head count for "
                                         r"every layer.*architecture='deci' \(--architecture deci"):
        export_gguf(model, tmp_path / "l.gguf", architecture="llama")
    from headprune.app.load import load_model

    with pytest.raises(ValueError, match="deci architecture .* which transformers does not read"):
        load_model(str(tmp_path / "m.gguf"))
    even = _llama()
    export_gguf(even, tmp_path / "e.gguf", architecture="deci")  # per-layer arrays on request
    assert gguf.GGUFReader(str(tmp_path / "e.gguf")).fields["deci.attention.head_count"].contents() == [4, 4]


def _with_tokenizer(src, dst):
    """``src`` rewritten as ``dst`` with tokenizer fields (an export without a source has none)."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=field.types[-1] if array else None)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(8)])
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_deci_file_from_a_source_renames_its_fields(tmp_path):
    model = _llama()
    export_gguf(model, tmp_path / "plain.gguf", dtype="float16")
    _with_tokenizer(tmp_path / "plain.gguf", tmp_path / "src.gguf")
    src = _read_back(tmp_path / "src.gguf")
    prune_heads(src, {1: [2, 3]})
    export_gguf(src, tmp_path / "out.gguf", source=tmp_path / "src.gguf")
    before = gguf.GGUFReader(str(tmp_path / "src.gguf")).fields
    after = gguf.GGUFReader(str(tmp_path / "out.gguf")).fields
    assert after["general.architecture"].contents() == "deci"
    for name, field in before.items():
        if name.startswith("llama.") and "head_count" not in name:
            assert after["deci." + name[len("llama."):]].contents() == field.contents()
    assert after["deci.attention.head_count"].contents() == [4, 2]
    for name in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):  # the tokenizer as the source has it
        assert after[name].contents() == before[name].contents()


def test_refusals(tmp_path):
    model = _llama()
    prune_heads(model, {0: [1]})
    with pytest.raises(ValueError, match="reads one head count for every layer"):
        export_gguf(model, tmp_path / "m.gguf", architecture="llama")
    with pytest.raises(ValueError, match="architecture: expected one of auto, llama, deci"):
        export_gguf(model, tmp_path / "m.gguf", architecture="mistral")
    with pytest.raises(ValueError, match="dtype: expected one of auto, float32, float16"):
        export_gguf(_llama(), tmp_path / "m.gguf", dtype="int8")
    from hf_tiny import tiny_model

    with pytest.raises(ValueError, match="GGUF export writes llama models, got bert"):
        export_gguf(tiny_model("bert"), tmp_path / "m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_gguf(_llama(), tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    with pytest.raises(TypeError, match="overwrite: expected True or False, got 'false'"):
        export_gguf(_llama(), tmp_path / "m.gguf", overwrite="false")  # truthy: it replaced the file
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(IsADirectoryError, match="path: .*d.gguf is a directory"):
        export_gguf(_llama(), tmp_path / "d.gguf", overwrite=True)
    (tmp_path / "l.gguf").symlink_to(tmp_path / "m.gguf")  # overwrite=True replaced the link by a file
    with pytest.raises(FileExistsError, match="path: .*l.gguf is a symbolic link"):
        export_gguf(_llama(), tmp_path / "l.gguf", overwrite=True)
    assert (tmp_path / "l.gguf").is_symlink() and (tmp_path / "m.gguf").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "l.gguf", "m.gguf"]  # no temporary left


@pytest.mark.parametrize("change", [{"num_hidden_layers": 3}, {"intermediate_size": 48}, {"vocab_size": 80}])
def test_a_source_of_another_model_is_refused(tmp_path, change):
    import transformers

    config = tiny_config("llama")
    for key, value in change.items():
        setattr(config, key, value)
    export_gguf(transformers.LlamaForCausalLM(config).eval(), tmp_path / "other.gguf")
    model = _llama()
    prune_heads(model, {0: [1], 1: [1]})
    with pytest.raises(ValueError, match="source: .*other.gguf is a GGUF of another model: its "):
        export_gguf(model, tmp_path / "m.gguf", source=tmp_path / "other.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]  # nothing written
    export_gguf(_llama(seed=1), tmp_path / "same.gguf")  # the same shapes, other weights: refused too
    with pytest.raises(ValueError, match=r"same.gguf is a GGUF of another model: its tensor token_embd.weight "
                                         r"differs from the model's by 1\.\d\d of its norm"):
        export_gguf(model, tmp_path / "m.gguf", source=tmp_path / "same.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf", "same.gguf"]


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_a_source_quantised_from_the_model_is_its_source(tmp_path, kind):
    """The model's copied tensors are compared with the source's to its quantisation's error: a
    model whose feed-forward and embeddings went through a Q4_1 or Q8_0 round trip (as a GGUF's
    do) still takes the float GGUF of its weights as its source, and the other way round."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    model = _llama()
    export_gguf(model, tmp_path / "float.gguf")
    changed = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and p.shape[1] % 32 == 0 and "self_attn" not in name:
                q = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)
                p.copy_(torch.from_numpy(q.copy()))
                changed += 1
    assert changed >= 3  # the embeddings and each layer's feed-forward
    export_gguf(model, tmp_path / "quantised.gguf")
    prune_heads(model, {0: [1], 1: [1]})
    export_gguf(model, tmp_path / "a.gguf", source=tmp_path / "float.gguf")
    other = _llama()
    prune_heads(other, {0: [1], 1: [1]})
    export_gguf(other, tmp_path / "b.gguf", source=tmp_path / "quantised.gguf")

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


def test_the_report_says_what_the_gguf_is():
    from headprune.app.report import report_markdown

    report = {"model": "m", "heads_pruned": 1, "heads_total": 8, "recipe": "r", "saved_bytes": 2**20,
              "settings": {"mode": "physical", "samples": 4, "seq_len": 8, "data": "d", "held_out_paragraphs": 3,
                           "saved_dtype": "float32"}}
    assert "llama.cpp" not in report_markdown(report, "T")
    deci = report_markdown({**report, "gguf": "model.gguf", "gguf_architecture": "deci"}, "T")
    assert "`model.gguf` is the pruned model for llama.cpp" in deci and "per-layer head counts" in deci
    llama = report_markdown({**report, "gguf": "model.gguf", "gguf_architecture": "llama"}, "T")
    assert "(`llama` architecture)" in llama


def test_the_prune_commands_gguf_goes_where_the_output_will_be(tmp_path):
    """``prune X.gguf`` writes it beside ``--out``, making a parent that does not exist yet."""
    export_gguf(_llama(), tmp_path / "src.gguf")
    model = _llama()
    prune_heads(model, {0: [0, 2], 1: [1, 3]})
    loaded = SimpleNamespace(checkpoint_dtype="gguf", source=str(tmp_path / "src.gguf"), model=model)
    args = SimpleNamespace(out=str(tmp_path / "new" / "out"), model="src.gguf")
    path, arch, made = _export_gguf(args, lambda *a: contextlib.nullcontext(), loaded)
    assert os.path.dirname(path) == str(tmp_path / "new") and arch == "llama"
    assert made == [str(tmp_path / "new")]  # for prune to take back if the output is never written
    back = _read_back(tmp_path / "new" / os.path.basename(path))
    ids = tiny_batch("llama")["input_ids"][:, :5]
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("error", [ValueError("no layout"), KeyboardInterrupt()])
def test_a_gguf_not_written_leaves_no_folder_behind(tmp_path, monkeypatch, error):
    """Refused (a warning, the command goes on) or interrupted: no folder made for it is left."""
    import headprune.hf.gguf_export as ge

    def fail(model, path, **kw):
        open(path, "wb").close()
        raise error

    monkeypatch.setattr(ge, "export_gguf", fail)
    loaded = SimpleNamespace(checkpoint_dtype="gguf", source=str(tmp_path / "src.gguf"), model=_llama())
    args = SimpleNamespace(out=str(tmp_path / "new" / "deeper" / "out"), model="src.gguf")
    with pytest.raises(type(error)) if isinstance(error, KeyboardInterrupt) else contextlib.nullcontext():
        assert _export_gguf(args, lambda *a: contextlib.nullcontext(), loaded) is None
    assert list(tmp_path.iterdir()) == []


def _realigned(src, dst, alignment):
    """``src`` rewritten with another data alignment (fields and float tensors as they are)."""
    import numpy as np

    r, w = gguf.GGUFReader(str(src)), gguf.GGUFWriter(str(dst), "llama")
    w.add_custom_alignment(alignment)
    for name, field in r.fields.items():
        if not (name.startswith("GGUF.") or name in ("general.architecture", "general.alignment")):
            vt = field.types[0]
            w.add_key_value(name, field.contents(), vt, sub_type=field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_sources_data_alignment_is_kept(tmp_path):
    export_gguf(_llama(), tmp_path / "f32.gguf")
    _realigned(tmp_path / "f32.gguf", tmp_path / "src.gguf", 256)
    src = _read_back(tmp_path / "src.gguf")
    prune_heads(src, {0: [0, 2], 1: [1, 3]})
    export_gguf(src, tmp_path / "out.gguf", source=tmp_path / "src.gguf")
    out = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    assert int(out.fields["general.alignment"].contents()) == 256 and out.data_offset % 256 == 0
    assert all(t.data_offset % 256 == 0 for t in out.tensors)  # norms of 32 floats: padding needed
    ids = tiny_batch("llama")["input_ids"][:, :5]
    torch.testing.assert_close(_logits(_read_back(tmp_path / "out.gguf"), ids), _logits(src, ids), rtol=0, atol=1e-6)


def test_scaled_rope_without_a_source_is_refused(tmp_path):
    import transformers

    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"model: its RoPE is scaled \(rope_type 'linear'\).*pass source="):
        export_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_gguf_transformers_cannot_build_is_refused_by_name(tmp_path):
    """llama.cpp reads a uniform layout whose heads do not divide the hidden size (the head size
    is a field of its own), transformers' Llama config refuses it: the loader says so."""
    from headprune.app.load import load_model

    model = _llama()
    prune_heads(model, {0: [0], 1: [0]})  # 3 of 4 query heads (hidden 32 is not a multiple of 3)
    export_gguf(model, tmp_path / "m.gguf", architecture="llama")
    with pytest.raises(ValueError, match=r"MODEL: transformers cannot build a model from .*m\.gguf.*load the pruned "
                                         r"model's directory"):
        load_model(str(tmp_path / "m.gguf"))


def test_deci_files_carry_no_zero_qkv_biases(tmp_path):
    """A model read back from a ``llama`` GGUF with a refit's bias holds zero q/k/v biases
    (transformers' one ``attention_bias``); pruned again unevenly, its ``deci`` file leaves them
    out, as for any deci file, and keeps the ones that are not zero."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", attention_bias=True)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                lin.bias.zero_()
            layer.self_attn.v_proj.bias.normal_()
    prune_heads(model, {0: [0, 1]})
    written = export_gguf(model, tmp_path / "m.gguf")
    assert gguf_architecture(tmp_path / "m.gguf") == "deci"
    assert not any(n.endswith(("attn_q.bias", "attn_k.bias")) for n in written)
    assert "blk.0.attn_v.bias" in written and "blk.1.attn_output.bias" in written
