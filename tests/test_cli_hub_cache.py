"""MODEL as a Hugging Face repository id, read from its snapshot in the local cache (files linked
into the cache's blobs, as huggingface_hub stores them); nothing is downloaded."""

import hashlib
import json
import shutil

import pytest
import torch

from test_cli import run, tiny_dir  # noqa: F401 - fixtures

COMMON = ["--ratio", "0.25", "--samples", "8", "--seq-len", "16", "--no-speed", "--quiet"]


def _cache(root, repo: str, source) -> None:
    """``source``'s files as the snapshot of ``repo`` (revision ``main``) in the cache ``root``."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef" * 2 + "01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot, blobs = folder / "snapshots" / commit, folder / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in source.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blobs / digest)
        (snapshot / f.name).symlink_to(f"../../blobs/{digest}")


@pytest.fixture
def hub(tmp_path, monkeypatch, tiny_dir):  # noqa: F811
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    _cache(cache, "someone/tiny-bert", tiny_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_repository_id_is_read_from_the_local_cache(run, hub, tmp_path, tiny_dir):  # noqa: F811
    """A repository id was refused as "not a bundled name, a .gguf file or a directory" though
    from_pretrained reads it from the cache: the same pruning as the directory's, and the report's
    id finds the unpruned model again for eval."""
    from safetensors.torch import load_file

    code, err = run(["prune", "someone/tiny-bert", *COMMON, "--out", tmp_path / "by-id"])
    assert code == 0, err
    code, err = run(["prune", tiny_dir, *COMMON, "--out", tmp_path / "by-path"])
    assert code == 0, err
    from headprune.app.locate import cached_snapshot

    report = json.loads((tmp_path / "by-id" / "report.json").read_text())  # the snapshot read, for later commands
    assert report["model"] == "someone/tiny-bert" and report["model_path"] == str(cached_snapshot("someone/tiny-bert"))
    by_id, by_path = (load_file(tmp_path / d / "model" / "headprune-model.safetensors") for d in ("by-id", "by-path"))
    assert by_id.keys() == by_path.keys() and all(torch.equal(by_id[k], by_path[k]) for k in by_id)
    code, err = run(["eval", tmp_path / "by-id", "--quiet", "--no-speed"])
    assert code == 0 and not err, err  # the teacher the report names is found: no "no fidelity" warning


def test_a_repository_id_not_in_the_cache_names_the_cache(run, hub, tmp_path, tiny_dir):  # noqa: F811
    code, err = run(["prune", "someone/not-there", *COMMON, "--out", tmp_path / "o"])
    assert code == 2 and err == [
        "headprune prune: error: MODEL: 'someone/not-there' is not a bundled name (minilm, smollm2), a .gguf file, a "
        f"directory or a model in the local Hugging Face cache ({hub}; nothing is downloaded)"], err
    # a path here of the same name is read, not the cache's snapshot
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "tiny-bert").mkdir()
    code, err = run(["prune", "someone/tiny-bert", *COMMON, "--out", tmp_path / "o"])
    assert code == 2 and "directory 'someone/tiny-bert' has no config.json" in err[-1], err
