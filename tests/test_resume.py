"""Checkpointed, resumable collection: ``headprune.hf.collect(checkpoint=..., resume=True)``."""

import json
import os
import re

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model

from headprune.hf import collect
from headprune.hf.checkpoint import weights_digest
from headprune.hf.attention import RECORDERS as _RECORDERS, model_configs as _configs

N = 6
SETTINGS = {"data": "tiny", "samples": N, "seq_len": 9}


def _batches(family="llama"):
    return [tiny_batch(family, seed=s) for s in range(N)]


def _interrupted(batches, after):
    """Yields ``after`` batches, then raises as a Ctrl-C in the data loader would."""
    yield from batches[:after]
    raise KeyboardInterrupt


def _impls(model):
    return [c._attn_implementation_internal for c in _configs(model)]


@pytest.mark.parametrize("family, method", [("llama", "qk"), ("t5", "qk"), ("llama", "eager")])
def test_resume_after_interrupt_equals_an_uninterrupted_run(tmp_path, family, method):
    model, batches = tiny_model(family), _batches(family)
    path = tmp_path / "scan.ckpt.json"
    full = collect(model, batches, method=method, progress=False)
    impls = _impls(model)
    with pytest.raises(KeyboardInterrupt):
        collect(model, _interrupted(batches, 3), method=method, progress=False, checkpoint=path,
                fingerprint=SETTINGS)
    assert _impls(model) == impls and not _RECORDERS
    assert json.loads(path.read_text())["batches_done"] == 3
    forwards = []
    hook = model.register_forward_pre_hook(lambda *a: forwards.append(1))
    resumed = collect(model, batches, method=method, progress=False, checkpoint=path, resume=True,
                      fingerprint=SETTINGS)
    assert len(forwards) == N - 3  # the checkpointed batches are not run again
    assert torch.equal(resumed.stats, full.stats)
    assert torch.equal(resumed.outputs, full.outputs)  # output statistics resume bit-exactly too
    assert resumed.names == full.names and resumed.method == method
    assert json.loads(path.read_text())["batches_done"] == N
    # a finished checkpoint resumes to the same scores without a forward pass
    again = collect(model, [*batches], progress=False, method=method, checkpoint=path, resume=True,
                    fingerprint=SETTINGS)
    hook.remove()
    assert torch.equal(again.stats, full.stats) and len(forwards) == N - 3


def test_second_moments_resume_bit_exactly_from_a_file_beside_the_checkpoint(tmp_path):
    model, batches = tiny_model("llama"), _batches()
    path = tmp_path / "c.json"
    full = collect(model, batches, progress=False, moments=True)
    with pytest.raises(KeyboardInterrupt):
        collect(model, _interrupted(batches, 3), progress=False, checkpoint=path, fingerprint=SETTINGS, moments=True)
    name = json.loads(path.read_text())["moments"]
    assert re.fullmatch(r"c\.json\.moments-3-[0-9a-f]{8}\.safetensors", name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", name]
    resumed = collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS, moments=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed.moments.gram, full.moments.gram))
    assert torch.equal(resumed.moments.sequences, full.moments.sequences)  # the batches before the resume too
    (left,) = [p.name for p in tmp_path.iterdir() if p.name != "c.json"]
    assert left == json.loads(path.read_text())["moments"] and left.startswith(f"c.json.moments-{N}-")
    # a checkpoint without moments does not resume a collection that gathers them
    plain = tmp_path / "p.json"
    with pytest.raises(KeyboardInterrupt):
        collect(model, _interrupted(batches, 2), progress=False, checkpoint=plain, fingerprint=SETTINGS)
    with pytest.raises(ValueError, match=r"written for no second moments, and this collection asks for second "
                                         r"moments \(moments=\)"):
        collect(model, batches, progress=False, checkpoint=plain, resume=True, fingerprint=SETTINGS, moments=True)
    # nor do float32 moments resume a float64 collection
    narrow = tmp_path / "f.json"
    with pytest.raises(KeyboardInterrupt):
        collect(model, _interrupted(batches, 2), progress=False, checkpoint=narrow, fingerprint=SETTINGS,
                moments="float32")
    with pytest.raises(ValueError, match=r"f\.json holds float32 second moments, and this collection asks for "
                                         r"float64 \(moments=\); delete it or drop resume \(--resume\)"):
        collect(model, batches, progress=False, checkpoint=narrow, resume=True, fingerprint=SETTINGS, moments=True)
    # a damaged moments file is refused like a damaged checkpoint
    (tmp_path / json.loads(narrow.read_text())["moments"]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"f\.json is corrupt \(ValueError: moments file f\.json\.moments-2-\w+"
                                         r"\.safetensors holds other bytes than the checkpoint wrote\)"):
        collect(model, batches, progress=False, checkpoint=narrow, resume=True, fingerprint=SETTINGS,
                moments="float32")
    data = json.loads(narrow.read_text())
    del data["moments_sha256"]  # as a checkpoint written before the digest: the file itself is checked
    narrow.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"f\.json is corrupt \(ValueError: moments: .* is not a readable safetensors"):
        collect(model, batches, progress=False, checkpoint=narrow, resume=True, fingerprint=SETTINGS,
                moments="float32")


def test_a_failed_save_of_another_run_leaves_a_checkpoint_its_moments(tmp_path, monkeypatch):
    """A run that does not resume writes over the checkpoint at its path; when its write fails
    after its moments file and before its JSON (a full disk, a kill), the JSON there is still the
    earlier run's, and so are the moments it names: that run still resumes bit-exactly."""
    import headprune.hf.checkpoint as C

    model, batches = tiny_model("llama"), _batches()
    other = [tiny_batch("llama", seed=100 + i) for i in range(len(batches))]
    path = tmp_path / "c.json"
    full = collect(model, batches, progress=False, moments=True)
    with pytest.raises(KeyboardInterrupt):
        collect(model, _interrupted(batches, 2), progress=False, checkpoint=path, fingerprint=SETTINGS, moments=True,
                checkpoint_every=2)
    real = C.atomic.write_file

    def full_disk(p, data, **kw):
        if os.fspath(p).endswith("c.json"):
            raise OSError(28, "No space left on device")
        return real(p, data, **kw)

    monkeypatch.setattr(C.atomic, "write_file", full_disk)
    with pytest.raises(OSError, match="checkpoint: cannot write"):
        collect(model, other, progress=False, checkpoint=path, fingerprint={**SETTINGS, "data": "other"},
                moments=True, checkpoint_every=2)
    monkeypatch.setattr(C.atomic, "write_file", real)
    resumed = collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS, moments=True)
    assert torch.equal(resumed.stats, full.stats)
    assert all(torch.equal(a, b) for a, b in zip(resumed.moments.gram, full.moments.gram))
    assert torch.equal(resumed.moments.sequences, full.moments.sequences)  # the batches before the resume too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", json.loads(path.read_text())["moments"]]


def test_checkpoint_every_k_batches_and_at_the_end(tmp_path):
    model, batches = tiny_model("llama"), _batches()
    path = tmp_path / "c.json"
    with pytest.raises(KeyboardInterrupt):
        collect(model, _interrupted(batches, 5), progress=False, checkpoint=path, checkpoint_every=2)
    assert json.loads(path.read_text())["batches_done"] == 4
    resumed = collect(model, batches[:5], progress=False, checkpoint=path, checkpoint_every=2, resume=True)
    assert json.loads(path.read_text())["batches_done"] == 5
    assert torch.equal(resumed.stats, collect(model, batches[:5], progress=False).stats)
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind


def test_resume_without_a_checkpoint_file_starts_afresh(tmp_path):
    model, batches = tiny_model("llama"), _batches()[:2]
    out = collect(model, batches, progress=False, checkpoint=tmp_path / "new.json", resume=True)
    assert torch.equal(out.stats, collect(model, batches, progress=False).stats)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_save(tmp_path):
    import subprocess
    import sys

    from headprune.atomic import owner_token

    script = "from headprune.atomic import owner_token; print(owner_token())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ended = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    killed = tmp_path / f".c.json.tmp-{ended.stdout.strip()}-0123abcd"  # as atomic.write_file names them
    live = tmp_path / f".c.json.tmp-{owner_token()}-4567abcd"  # this process's: not a leftover
    killed.write_text('{"format"')
    live.write_text("{")
    model, batches = tiny_model("llama"), _batches()[:2]
    collect(model, batches, progress=False, checkpoint=tmp_path / "c.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "c.json"]


def test_without_resume_an_old_checkpoint_is_overwritten(tmp_path):
    model, batches = tiny_model("llama"), _batches()[:2]
    path = tmp_path / "c.json"
    collect(model, batches[:1], progress=False, checkpoint=path, fingerprint={"other": "settings"})
    collect(model, batches, progress=False, checkpoint=path)
    assert json.loads(path.read_text())["batches_done"] == 2
    path.write_text("garbage")  # not a checkpoint (they are written whole): not written over
    with pytest.raises(ValueError, match=r"c\.json exists and is not a headprune checkpoint"):
        collect(model, batches, progress=False, checkpoint=path)
    assert path.read_text() == "garbage"


def _checkpoint_after(tmp_path, n=2, **kw):
    model, batches = tiny_model("llama"), _batches()
    path = tmp_path / "c.json"
    collect(model, batches[:n], progress=False, checkpoint=path, fingerprint=SETTINGS, **kw)
    return model, batches, path


def test_mismatched_fingerprint_is_refused(tmp_path):
    model, batches, path = _checkpoint_after(tmp_path)
    other = dict(SETTINGS, seq_len=10)
    with pytest.raises(ValueError, match=r"checkpoint .*c\.json was written with other settings \(seq_len: 9 in the "
                                         r"checkpoint, 10 now\); delete it or drop resume \(--resume\)"):
        collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint=other)
    with pytest.raises(ValueError, match=r"with other settings \(data: tiny in the checkpoint, None now; fingerprint: "
                                         r"None in the checkpoint, opaque now"):
        collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint="opaque")
    with torch.no_grad():  # the same layout with other weights (a directory pruned again, a fine-tune)
        model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    refused = r"with other settings \(weights and config: [0-9a-f]{16} in the checkpoint, [0-9a-f]{16} now\)"
    with pytest.raises(ValueError, match=refused):
        collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[0, 0] -= 1e-3
    eps = model.config.rms_norm_eps  # the same weights under another config (an edited config.json)
    model.config.rms_norm_eps = eps * 10
    with pytest.raises(ValueError, match=refused):
        collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS)
    model.config.rms_norm_eps = eps
    model.config._name_or_path = "elsewhere"  # where it was read from is the caller's fingerprint, not the model's
    assert weights_digest(model) == json.loads(json.loads(path.read_text())["fingerprint"])["weights and config"]
    with pytest.raises(ValueError, match=r"was written for another model \(its attention sites or heads differ\)"):
        collect(tiny_model("llama", num_hidden_layers=3), batches, progress=False, checkpoint=path, resume=True,
                fingerprint=SETTINGS)
    # the method and the moments are part of the layout: each named as itself (both read "another model/data")
    with pytest.raises(ValueError, match=r"was written for another method \('qk' in the checkpoint, 'eager' now\);"):
        collect(model, batches, method="eager", progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS)
    with pytest.raises(ValueError, match=r"was written for no second moments, and this collection asks for second "
                                         r"moments \(moments=\); delete it"):
        collect(model, batches, moments=True, progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS)
    assert not _RECORDERS and _impls(model) == ["sdpa"]


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda t: t[: len(t) // 2], r"is not a readable headprune checkpoint \(JSONDecodeError"),
        (lambda t: "", r"is not a readable headprune checkpoint"),
        (lambda t: b"\xff\xfe\x00".decode("latin-1"), r"is not a readable headprune checkpoint"),
        (lambda t: json.dumps([1, 2]), r"is not a headprune checkpoint"),
        (lambda t: t.replace('"batches_done": 2', '"batches_done": -1'), r"is corrupt"),
        (lambda t: t.replace('"stats": [[[', '"stats": [[["x", '), r"is corrupt"),
        (lambda t: t.replace('"num_heads": [4, 4]', '"num_heads": [4, 4, 4]'), r"is corrupt"),
        # another version's checkpoint: its own, so replaced without resume (it was refused as no checkpoint)
        (lambda t: t.replace('"headprune.checkpoint/2"', '"headprune.checkpoint/9"'),
         r"was written by another headprune \(format 'headprune.checkpoint/9'; this one reads"),
    ],
)
def test_corrupt_checkpoint_is_refused(tmp_path, damage, match):
    model, batches, path = _checkpoint_after(tmp_path)
    text = path.read_text()
    path.write_text(damage(text), encoding="latin-1")
    # a file of the checkpoint's format is written over without resume; any other file is not
    ours = "corrupt" in match or "another headprune" in match
    end = r"delete it or drop resume \(--resume\)" if ours else "pass another path"  # not "delete": it may be anything
    with pytest.raises(ValueError, match=rf"checkpoint .*c\.json {match}.*; {end}$"):
        collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS)
    assert not _RECORDERS and _impls(model) == ["sdpa"]
    if not ours:
        with pytest.raises(ValueError, match=r"c\.json exists and is not a headprune checkpoint; a collection would "
                                             "write over it"):
            collect(model, batches, progress=False, checkpoint=path, fingerprint=SETTINGS)
    else:
        collect(model, batches, progress=False, checkpoint=path, fingerprint=SETTINGS)
        assert json.loads(path.read_text())["batches_done"] == len(batches)


def test_checkpoint_with_more_batches_than_the_data_is_refused(tmp_path):
    model, batches, path = _checkpoint_after(tmp_path, n=4)
    with pytest.raises(ValueError, match=r"records 4 batches done but batches has only 3"):
        collect(model, batches[:3], progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS)
    assert not _RECORDERS and _impls(model) == ["sdpa"]


def test_a_failed_write_keeps_the_previous_checkpoint_and_restores_the_model(tmp_path, monkeypatch):
    model, batches, path = _checkpoint_after(tmp_path)
    before = path.read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]
    assert not _RECORDERS and _impls(model) == ["sdpa"]


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(resume=True), ValueError, "resume: needs a checkpoint path"),
        (dict(checkpoint="c.json", checkpoint_every=0), ValueError, "checkpoint_every: expected a positive int"),
        (dict(checkpoint="c.json", fingerprint=3), TypeError, "fingerprint: expected a str or a dict"),
    ],
)
def test_bad_checkpoint_arguments_are_named(tmp_path, monkeypatch, kw, exc, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=match):
        collect(tiny_model("llama"), _batches()[:1], progress=False, **kw)


def test_plain_torch_models_refuse_a_checkpoint(tmp_path):
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    with pytest.raises(ValueError, match="checkpoint: resumable collection needs a transformers model"):
        collect(layer, [torch.randn(2, 5, 16)], progress=False, checkpoint=tmp_path / "c.json")


def test_a_checkpoint_of_an_earlier_digest_is_refused_as_such_and_the_digest_outlives_upgrades(tmp_path, monkeypatch):
    """A checkpoint whose fingerprint left the config out (key ``weights``, written by an earlier
    headprune) is refused saying so, not as another model; the digest itself does not change
    with the installed transformers version that the config's JSON names."""
    import transformers.configuration_utils as CU

    model, batches, path = _checkpoint_after(tmp_path)
    data = json.loads(path.read_text())
    fingerprint = json.loads(data["fingerprint"])
    fingerprint["weights"] = fingerprint.pop("weights and config")
    data["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"c\.json was written by an earlier headprune, whose fingerprint did not "
                                         r"cover the model's config; delete it or drop resume"):
        collect(model, batches, progress=False, checkpoint=path, resume=True, fingerprint=SETTINGS)
    before = weights_digest(model)
    monkeypatch.setattr(CU, "__version__", "99.0.0")
    assert json.loads(model.config.to_json_string())["transformers_version"] == "99.0.0"
    assert weights_digest(model) == before


def test_a_checkpoint_of_other_batches_is_refused_whatever_the_fingerprint_says(tmp_path):
    """A resume skips the batches the checkpoint holds unread by the model; with the same
    fingerprint (the API's default, none) on other batches it summed the checkpoint's first
    two with the new batches' last four without a word. A checkpoint that recorded no batches
    is refused."""
    model, batches = tiny_model("llama"), _batches()
    path = tmp_path / "c.json"
    collect(model, batches[:2], progress=False, checkpoint=path)
    other = [tiny_batch("llama", seed=s) for s in range(10, 10 + N)]
    with pytest.raises(ValueError, match=r"c\.json was written for other batches \(the first 2 of these differ "
                                         r"from those it holds\); delete it or drop resume"):
        collect(model, other, progress=False, checkpoint=path, resume=True)
    with pytest.raises(ValueError, match="other batches"):  # the same sequences in another order
        collect(model, [batches[1], batches[0], *batches[2:]], progress=False, checkpoint=path, resume=True)
    full = collect(model, batches, progress=False)
    resumed = collect(model, batches, progress=False, checkpoint=path, resume=True)
    assert torch.equal(resumed.stats, full.stats)
    import transformers

    from hf_tiny import tiny_config

    t5 = transformers.T5ForConditionalGeneration(tiny_config("t5")).eval()  # labels give its decoder's input
    ids = [tiny_batch("t5", seed=s)["input_ids"] for s in range(3)]
    labelled = [[{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": torch.randint(
        1, 100, (i.shape[0], 5), generator=torch.Generator().manual_seed(seed + k))} for k, i in enumerate(ids)]
        for seed in (1, 50)]
    collect(t5, labelled[0][:2], progress=False, checkpoint=tmp_path / "t5.json")
    with pytest.raises(ValueError, match="other batches"):
        collect(t5, labelled[1], progress=False, checkpoint=tmp_path / "t5.json", resume=True)
    data = json.loads(path.read_text())
    del data["batches_sha256"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="written by an earlier headprune, which did not record which batches"):
        collect(model, batches, progress=False, checkpoint=path, resume=True)


def test_the_weights_digest_is_the_same_on_any_number_of_threads():
    """It hashed each tensor's float64 sum, whose rounding depends on how the sum is split over
    threads for tensors of millions of values: ranks on machines of other core counts, or a
    resume with another thread count, were refused as holding other weights. It still tells
    one changed value apart."""
    model = torch.nn.Embedding(50257, 128)
    torch.nn.init.normal_(model.weight, std=0.02)
    threads = torch.get_num_threads()
    try:
        digests = set()
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            digests.add(weights_digest(model))
    finally:
        torch.set_num_threads(threads)
    assert len(digests) == 1
    with torch.no_grad():
        model.weight[12345, 7] += 1e-3  # not in the strided sample
    assert weights_digest(model) not in digests


def test_the_batches_digest_reads_what_a_batch_holds():
    """Values that are no tensor were digested by their text: an object's holds its address (every
    resume refused), and a large tensor inside a list is abridged (other batches taken as the same).
    Other objects count by their type."""
    from headprune.hf.checkpoint import BatchesDigest

    def digest(batch):
        d = BatchesDigest()
        d.update(batch)
        return d.hexdigest()

    big = torch.zeros(10_000)
    other = big.clone()
    other[5_000] = 1.0
    assert digest({"extra": [big]}) != digest({"extra": [other]})
    assert digest({"extra": [big], "flag": True}) == digest({"flag": True, "extra": [big.clone()]})
    assert digest({"extra": object()}) == digest({"extra": object()}) != digest({"extra": 1})
