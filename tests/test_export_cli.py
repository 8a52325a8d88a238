"""headprune export MODEL --gguf FILE: a pruned directory (or what prune and recover write) as a
GGUF that transformers' GGUF loader reads back to the same function, fields from a source GGUF."""

import json

import pytest
import torch

pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from hf_tiny import tiny_batch, tiny_config  # noqa: E402

from headprune.app.cli import main  # noqa: E402
from headprune.hf import collect, mask_heads, prune_heads, save_pruned  # noqa: E402
from headprune.hf.gguf_export import export_gguf, gguf_architecture  # noqa: E402

from test_gguf_export import _logits, _read_back  # noqa: E402


def _tokenizer():
    import transformers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("the a of and to in".split())}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A source GGUF of a tiny Llama, and the model pruned uniformly with a refit, saved."""
    import transformers

    t = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    export_gguf(model, t / "src.gguf", dtype="float16")
    batch = tiny_batch("llama")
    prune_heads(model, {0: [1, 3], 1: [0, 2]}, reconstruct=collect(model, [batch], progress=False, moments=True))
    save_pruned(model, t / "run" / "model", tokenizer=_tokenizer())
    return t, model


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_a_pruned_directory_exports_with_a_source(pruned, tmp_path, capsys):
    t, model = pruned
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "new" / "m.gguf", "--source",
                      t / "src.gguf", "--quiet"], capsys)
    assert code == 0 and "llama.cpp's llama architecture" in out.out and "src.gguf" in out.out
    assert gguf_architecture(tmp_path / "new" / "m.gguf") == "llama"
    ids = tiny_batch("llama")["input_ids"][:, :6]
    # attention tensors in the source's float16, so to float16 rounding
    torch.testing.assert_close(_logits(_read_back(tmp_path / "new" / "m.gguf"), ids), _logits(model, ids),
                               rtol=0, atol=2e-2)
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "new" / "m.gguf", "--source",
                      t / "src.gguf", "--quiet"], capsys)
    assert code == 2 and "--gguf: " in out.err and "exists; pass --force" in out.err
    # saved without a tokenizer (the GGUF takes the source's): it was refused for having none
    save_pruned(model, tmp_path / "notok")
    code, out = _run(["export", tmp_path / "notok", "--gguf", tmp_path / "n.gguf", "--source", t / "src.gguf",
                      "--quiet"], capsys)
    assert code == 0 and gguf_architecture(tmp_path / "n.gguf") == "llama", out.err


def test_a_prune_output_finds_its_source_in_its_report(pruned, tmp_path, capsys):
    t, model = pruned
    (t / "run" / "report.json").write_text(json.dumps({"model": "src.gguf", "model_path": str(t / "src.gguf")}))
    try:
        code, out = _run(["export", t / "run", "--gguf", tmp_path / "m.gguf", "--gguf-dtype", "float32",
                          "--architecture", "deci", "--quiet"], capsys)
    finally:
        (t / "run" / "report.json").unlink()
    assert code == 0 and gguf_architecture(tmp_path / "m.gguf") == "deci", out.err
    import gguf

    types = {x.name: x.tensor_type.name for x in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "F32" and types["blk.0.ffn_up.weight"] == "F16"  # the source's


def test_without_a_source_it_is_refused_before_anything_is_written(pruned, tmp_path, capsys):
    t, _ = pruned
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "m.gguf", "--quiet"], capsys)
    assert code == 2 and "export: error: --source: a GGUF needs the fields and the tokenizer" in out.err
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "m.gguf", "--source", t / "nope.gguf"],
                     capsys)
    assert code == 2 and "--source: " in out.err and "nope.gguf is not a file" in out.err
    assert list(tmp_path.iterdir()) == []


def test_failures_leave_nothing_behind(pruned, tmp_path, capsys):
    t, _ = pruned
    (tmp_path / "text.gguf").write_text("not a GGUF")
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "a" / "b" / "m.gguf", "--source",
                      tmp_path / "text.gguf", "--quiet"], capsys)
    assert code == 2 and "export: error: --source: " in out.err and "text.gguf is not a readable GGUF" in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.gguf"]  # the folders it made are gone
    (tmp_path / "d").mkdir()
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "d", "--source", t / "src.gguf",
                      "--force"], capsys)
    assert code == 2 and "--gguf: " in out.err and "is a directory" in out.err


def test_a_masked_model_is_written_without_its_masked_heads(pruned, tmp_path, capsys):
    """A masked model's heads are zero output columns: the GGUF leaves them out (original
    indices, after an earlier physical pruning) and computes what the masked model does."""
    import gguf
    import transformers

    t, _ = pruned
    torch.manual_seed(0)  # the source's weights: the tensors pruning does not touch come from it
    model = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    stats = collect(model, [tiny_batch("llama")], progress=False, moments=True)
    prune_heads(model, {0: [1, 3]}, reconstruct=stats)
    mask_heads(model, {1: [0, 2]}, reconstruct=collect(model, [tiny_batch("llama")], progress=False, moments=True))
    save_pruned(model, tmp_path / "masked", tokenizer=_tokenizer())
    code, out = _run(["export", tmp_path / "masked", "--gguf", tmp_path / "m.gguf", "--source", t / "src.gguf",
                      "--gguf-dtype", "float32", "--quiet"], capsys)
    assert code == 0 and "removed 2 heads whose output-projection columns are all zero" in out.out, out.err
    rows = {x.name: int(x.shape[-1]) for x in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    q = model.model.layers[1].self_attn.q_proj.weight
    assert rows["blk.0.attn_q.weight"] == rows["blk.1.attn_q.weight"] == q.shape[0] // 2  # 2 of 4 heads each
    ids = tiny_batch("llama")["input_ids"][:, :6]  # the source's untouched tensors are float16: to its rounding
    torch.testing.assert_close(_logits(_read_back(tmp_path / "m.gguf"), ids), _logits(model, ids), rtol=0, atol=2e-2)


def test_a_gguf_path_under_a_file_is_refused_before_the_model_loads(pruned, tmp_path, capsys, monkeypatch):
    """It failed after loading, naming a temporary file and not the argument."""
    import headprune.app.export_command as X

    t, _ = pruned
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(X, "load_model", lambda *a, **k: pytest.fail("loaded before --gguf was checked"))
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "afile" / "m.gguf", "--source",
                      t / "src.gguf", "--quiet"], capsys)
    assert code == 2 and f"export: error: --gguf: {tmp_path / 'afile'} is not a directory" in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    (tmp_path / "link.gguf").symlink_to(tmp_path / "afile")  # a link, --force or not (it was refused after the load)
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "link.gguf", "--source", t / "src.gguf",
                      "--force", "--quiet"], capsys)
    assert code == 2 and f"export: error: --gguf: {tmp_path / 'link.gguf'} is a symbolic link" in out.err
    assert (tmp_path / "afile").read_text() == "x"


def test_a_source_that_cannot_be_read_is_named_as_the_source(pruned, tmp_path, capsys, monkeypatch):
    """Any OSError in the write was reported as "--gguf: cannot write", a source that could not
    be read included."""
    import errno

    import gguf

    t, _ = pruned

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(gguf, "GGUFReader", denied)
    code, out = _run(["export", t / "run" / "model", "--gguf", tmp_path / "m.gguf", "--source", t / "src.gguf",
                      "--quiet"], capsys)
    assert code == 2 and f"export: error: --source: cannot read {t / 'src.gguf'} (Permission denied)" in out.err
    assert list(tmp_path.iterdir()) == []


def test_the_source_is_not_replaced_by_its_own_export(pruned, tmp_path, capsys):
    """--gguf naming the source GGUF (or a link to it) is refused even with --force: the export
    read the file it was replacing."""
    import shutil

    t, _ = pruned
    src = tmp_path / "src.gguf"
    shutil.copy(t / "src.gguf", src)
    (tmp_path / "link.gguf").symlink_to(src)
    before = src.read_bytes()
    for target in (src, tmp_path / "link.gguf"):
        code, out = _run(["export", t / "run" / "model", "--gguf", target, "--source", src, "--force", "--quiet"],
                         capsys)
        assert code == 2 and f"--gguf: {target} is {src}, which the export reads; write the GGUF elsewhere" in out.err
    assert src.read_bytes() == before


def test_a_file_of_the_model_read_is_not_replaced_by_the_export(pruned, tmp_path, capsys):
    """--gguf naming a file inside the directory the model is read from (MODEL, or a prune
    folder's model/) replaced the model's weights with the GGUF, --force given."""
    import shutil

    t, _ = pruned
    run = tmp_path / "run"
    shutil.copytree(t / "run" / "model", run / "model")
    (run / "report.json").write_text("{}")
    weights = next((run / "model").glob("*.safetensors"))
    before = weights.read_bytes()
    for model in (run, run / "model"):
        code, out = _run(["export", model, "--gguf", weights, "--source", t / "src.gguf", "--force", "--quiet"],
                         capsys)
        assert code == 2 and f"--gguf: {weights} is a file of {run / 'model'}, the model the export reads" in out.err
        assert weights.read_bytes() == before
    code, out = _run(["export", run, "--gguf", run / "report.json", "--source", t / "src.gguf", "--force", "--quiet"],
                     capsys)  # the report, which names the source and the record recover and eval read
    assert code == 2 and f"--gguf: {run / 'report.json'} is the report of {run}" in out.err
    assert (run / "report.json").read_text() == "{}"


def test_a_family_export_cannot_write_is_said_before_the_source(tmp_path, capsys):
    """A pruned GPT-2 was asked for --source first, and refused for its family only after."""
    from hf_tiny import tiny_model

    save_pruned(tiny_model("gpt2"), tmp_path / "gpt2", tokenizer=_tokenizer())
    code, out = _run(["export", tmp_path / "gpt2", "--gguf", tmp_path / "m.gguf", "--quiet"], capsys)
    assert code == 2 and "GGUF export writes llama models, got gpt2" in out.err and "--source" not in out.err
    assert not (tmp_path / "m.gguf").exists()


def test_refusals_name_the_commands_arguments(pruned, tmp_path, capsys):
    """The exporter's refusals reached the command line under the API's names (``model:``,
    ``architecture:``), which the command has no argument for."""
    import transformers

    t, _ = pruned
    torch.manual_seed(0)
    uneven = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    prune_heads(uneven, {0: [1]})
    save_pruned(uneven, tmp_path / "uneven", tokenizer=_tokenizer())
    code, out = _run(["export", tmp_path / "uneven", "--gguf", tmp_path / "m.gguf", "--source", t / "src.gguf",
                      "--architecture", "llama", "--quiet"], capsys)
    assert code == 2 and "export: error: --architecture: llama.cpp's llama architecture reads one" in out.err, out.err
    gpt2 = transformers.GPT2LMHeadModel(tiny_config("gpt2")).eval()
    save_pruned(gpt2, tmp_path / "gpt2", tokenizer=_tokenizer())
    code, out = _run(["export", tmp_path / "gpt2", "--gguf", tmp_path / "m.gguf", "--source", t / "src.gguf",
                      "--quiet"], capsys)
    assert code == 2 and "export: error: MODEL: GGUF export writes" in out.err, out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "uneven"]


def test_a_report_naming_a_folder_of_one_gguf_gives_the_source(pruned, tmp_path, capsys):
    """A model read from a folder holding one GGUF is recorded as the folder, where export looked
    for a name ending in .gguf and asked for --source."""
    import shutil

    t, model = pruned
    (tmp_path / "repo").mkdir()
    shutil.copyfile(t / "src.gguf", tmp_path / "repo" / "src.gguf")
    save_pruned(model, tmp_path / "run" / "model", tokenizer=_tokenizer())
    (tmp_path / "run" / "report.json").write_text(json.dumps({"model": str(tmp_path / "repo"),
                                                              "model_path": str(tmp_path / "repo")}))
    code, out = _run(["export", tmp_path / "run", "--gguf", tmp_path / "m.gguf", "--quiet"], capsys)
    assert code == 0 and f"fields and tokenizer from {tmp_path / 'repo' / 'src.gguf'}" in out.out, out.err
