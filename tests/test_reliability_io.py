"""Bad inputs of saving and loading pruned models: corrupt or mismatching ``headprune.json``,
unwritable, non-empty or file targets. Every row asserts the error type and message, and
that nothing is left half-written."""

import json
import os
import shutil

import pytest

from hf_tiny import tiny_model
from model_snapshot import ModelSnapshot

from headprune.hf import kept_heads, load_pruned, prune_heads, save_pruned


# ---- saving and loading ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A non-uniform (rebuilt by re-pruning) and a uniform (plain-loadable) pruned model."""
    root = tmp_path_factory.mktemp("saved")
    gpt2 = tiny_model("gpt2")
    prune_heads(gpt2, {0: [0, 1]})
    save_pruned(gpt2, root / "uneven")
    llama = tiny_model("llama")
    prune_heads(llama, {0: [2, 3], 1: [2, 3]})
    save_pruned(llama, root / "uniform")
    return root


def _edit_meta(**changes):
    def edit(path):
        meta = json.loads((path / "headprune.json").read_text())
        for k, v in changes.items():
            if v is KeyError:
                del meta[k]
            else:
                meta[k] = v
        (path / "headprune.json").write_text(json.dumps(meta))

    return edit


def _write_meta(text):
    return lambda path: (path / "headprune.json").write_text(text)


LOAD_ERRORS = [
    ("uneven", lambda p: (p / "headprune.json").unlink(), FileNotFoundError, "has no headprune.json"),
    ("uneven", _write_meta("{not json"), ValueError, "headprune.json is not valid JSON"),
    ("uneven", _write_meta(""), ValueError, "headprune.json is not valid JSON"),
    ("uniform", _write_meta("[1, 2]"), ValueError, "has format 'list', expected 'headprune.pruned/1'"),
    ("uniform", _edit_meta(format="other/2"), ValueError, "has format 'other/2'"),
    ("uniform", _edit_meta(architecture=KeyError), ValueError, r"lacks \['architecture'\]"),
    ("uneven", _edit_meta(architecture="NoSuchModel"), ValueError, "unknown architecture 'NoSuchModel'"),
    ("uneven", _edit_meta(kept_heads=[[2, 3]]), ValueError, "lists 1 sites' kept_heads, the model has 2"),
    ("uneven", _edit_meta(kept_heads=[[0, 1, 2], [0, 1, 2, 3]]), ValueError, "saved weights do not match the heads"),
    ("uneven", _edit_meta(kept_heads=[[3, 2], [0, 1, 2, 3]]), ValueError, r"kept_heads of site 0 is \[3, 2\]"),
    ("uneven", _edit_meta(kept_heads=[[2, 2], [0, 1, 2, 3]]), ValueError, r"kept_heads of site 0 is \[2, 2\]"),
    ("uneven", _edit_meta(kept_heads=[[2, 9], [0, 1, 2, 3]]), ValueError, r"expected increasing indices below 4"),
    ("uniform", _edit_meta(kept_heads=[[0, 1, 2], [0, 1]]), ValueError, "lists 3 query / 1 KV heads for site 0, the weights hold 2 / 1"),
    ("uniform", _edit_meta(kv_heads=[[0, 1], [0]]), ValueError, "lists 2 query / 2 KV heads for site 0"),
]


@pytest.mark.parametrize("which, corrupt, exc, match", LOAD_ERRORS, ids=[str(i) for i in range(len(LOAD_ERRORS))])
def test_load_refuses(saved, tmp_path, which, corrupt, exc, match):
    path = tmp_path / which
    shutil.copytree(saved / which, path)
    corrupt(path)
    files = {f: (path / f).read_bytes() for f in os.listdir(path)}
    with pytest.raises(exc, match=match):
        load_pruned(path)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == files


def _read_only(path, monkeypatch):
    """A directory nobody may create entries in (root ignores modes, so refuse it in os)."""
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        real = os.mkdir

        def mkdir(p, *a, **k):
            if os.path.dirname(os.path.abspath(p)) == str(path):
                raise PermissionError(13, "Permission denied", str(p))
            return real(p, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
    return path / "out"


def _non_empty(path, monkeypatch):
    path.mkdir()
    (path / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    return path


def _a_file(path, monkeypatch):
    path.write_text("x")
    return path


SAVE_ERRORS = [
    (_read_only, PermissionError, "path: cannot write in .*ro"),
    (_non_empty, FileExistsError, "is not empty; pass overwrite=True to replace it"),
    (_a_file, FileExistsError, "exists and is not a directory"),
]


@pytest.mark.parametrize("where, exc, match", SAVE_ERRORS, ids=["read-only", "non-empty", "a-file"])
@pytest.mark.parametrize("family, heads", [("gpt2", {0: [1]}), ("llama", {0: [1], 1: [1]})])
def test_save_refuses(tmp_path, monkeypatch, where, exc, match, family, heads):
    model = tiny_model(family)
    prune_heads(model, heads)
    target = where(tmp_path / "ro", monkeypatch)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    snap = ModelSnapshot(model)
    try:
        with pytest.raises(exc, match=match):
            save_pruned(model, target)
    finally:
        (tmp_path / "ro").chmod(0o755) if (tmp_path / "ro").is_dir() else None
    snap.assert_same()
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing


def test_save_overwrite_replaces_a_non_empty_directory(tmp_path):
    model = tiny_model("gpt2")
    prune_heads(model, {0: [1]})
    (tmp_path / "stale.safetensors").write_bytes(b"stale")
    snap = ModelSnapshot(model)
    save_pruned(model, tmp_path, overwrite=True)
    snap.assert_same()  # save_pretrained's config.architectures / dtype edits do not leak
    assert not (tmp_path / "stale.safetensors").exists()
    assert kept_heads(load_pruned(tmp_path)) == kept_heads(model)
    assert [p.name for p in tmp_path.parent.iterdir() if ".tmp-" in p.name] == []
