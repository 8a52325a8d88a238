"""Where a model argument is read from: a GGUF named in any letter case, and a folder that holds
one GGUF and no config.json (a GGUF repository's file downloaded into a folder)."""

import pytest

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from headprune.app.locate import locate  # noqa: E402


def _touch(path):
    path.write_bytes(b"GGUF")
    return path


def test_a_gguf_is_a_gguf_in_any_letter_case(tmp_path):
    _touch(tmp_path / "Model.Q4_0.GGUF")
    assert locate(str(tmp_path / "Model.Q4_0.GGUF")) == (tmp_path, "Model.Q4_0.GGUF", False)
    _touch(tmp_path / "w.bin")
    with pytest.raises(ValueError, match=r"MODEL: '.*w.bin' is a file but not a .gguf file"):
        locate(str(tmp_path / "w.bin"))


def test_a_folder_of_one_gguf_reads_it_and_of_several_names_them(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "README.md").write_text("a model card")
    _touch(folder / "m.Q8_0.gguf")
    assert locate(str(folder)) == (folder, "m.Q8_0.gguf", False)
    _touch(folder / "m.F16.gguf")
    with pytest.raises(FileNotFoundError, match=r"has no config.json \(it holds 2 GGUF files: pass the one to read, "
                                                r"e\.g\. '.*m\.F16\.gguf'\)"):
        locate(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"directory '.*empty' has no config.json$"):
        locate(str(tmp_path / "empty"))


def test_a_folder_of_one_gguf_loads_as_the_file_does(tmp_path, monkeypatch):
    import torch
    import transformers

    from headprune.app.commands import _out
    from headprune.app.load import load_model
    from headprune.hf.gguf_export import export_gguf
    from hf_tiny import tiny_batch
    from test_gguf_export import _llama
    from test_speed import _tokenizer_dir

    (tmp_path / "repo").mkdir()
    model = _llama()
    export_gguf(model, tmp_path / "repo" / "Tiny.GGUF")
    tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    ids = tiny_batch("llama")["input_ids"][:, :7]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for spec in (tmp_path / "repo", tmp_path / "repo" / "Tiny.GGUF"):
            loaded = load_model(str(spec))
            assert loaded.model.config._name_or_path == str(tmp_path / "repo" / "Tiny.GGUF")
            torch.testing.assert_close(loaded.model(input_ids=ids).logits, want, rtol=1e-3, atol=1e-3)

    class Args:
        out, model = None, str(tmp_path / "repo" / "Tiny.GGUF")
    assert _out(Args, "prune").name == "prune-Tiny"
