"""Faults midway: an exception or KeyboardInterrupt raised inside collection, masking,
physical pruning or saving leaves the model exactly as before the call (``ModelSnapshot``)
and leaves no output directory, half-written or temporary, behind."""

import importlib
import os

import pytest
import torch
import transformers

import headprune.core.ops
from hf_tiny import tiny_batch, tiny_model
from model_snapshot import ModelSnapshot

from headprune import atomic
from headprune.hf import collect, mask_heads, prune_heads, save_pruned
from headprune.hf.prune import STATE_ATTR

prune_mod = importlib.import_module("headprune.hf.prune")
report_mod = importlib.import_module("headprune.hf.report")
mask_mod = importlib.import_module("headprune.prune.mask")

FAULTS = [pytest.param(lambda: RuntimeError("injected"), id="error"),
          pytest.param(lambda: KeyboardInterrupt(), id="interrupt")]
ERROR, INTERRUPT = (p.values[0] for p in FAULTS)


def both_faults_first(points):
    """``(point, fault)`` params: both faults at the first point, an interrupt at the others
    (every undo path catches ``BaseException``; the interrupt is the harder one)."""
    out = [pytest.param(points[0], ERROR, id=f"{points[0]}-error")]
    return out + [pytest.param(p, INTERRUPT, id=f"{p}-interrupt") for p in points]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """Register headprune's attention functions before any snapshot (see test_reliability_inputs)."""
    for method in ("qk", "eager"):
        collect(tiny_model("bert"), [tiny_batch("bert")], method=method, progress=False)


def fail_on_call(monkeypatch, owner, name, n, fault):
    """Replace ``owner.name`` by a wrapper that raises ``fault()`` on its ``n``-th call."""
    real, calls = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise fault()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _first(out):
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _output(model, family):
    with torch.no_grad():
        return _first(model(**tiny_batch(family)))


# ---- collection ---------------------------------------------------------------------------------

_OPS = {"qk": "entropy_stats_from_qk_accumulate_", "fused": "attention_stats_accumulate_",
        "eager": "entropy_stats_from_probs_accumulate_"}


def _failing_batches(family, fault):
    yield tiny_batch(family)
    yield tiny_batch(family, seed=1)
    raise fault()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("family, method, where", [("llama", "fused", "op"), ("llama", "qk", "op"), ("t5", "fused", "op"),
                                                   ("gpt2", "eager", "op"), ("gemma2", "qk", "op"),
                                                   ("t5", "fused", "batches")])
def test_fault_during_collection(monkeypatch, family, method, where, fault):
    model = tiny_model(family)
    ref = _output(model, family)
    snap = ModelSnapshot(model)
    if where == "op":  # from inside the attention call, in the second layer of the first batch
        fail_on_call(monkeypatch, headprune.core.ops, _OPS[method], 2, fault)
        batches = [tiny_batch(family)]
    else:
        batches = _failing_batches(family, fault)
    # "qk" runs the model's own attention, then the statistics op; "fused" the fused op
    kw = {"method": "eager"} if method == "eager" else {"method": "qk", "fused": method == "fused"}
    with pytest.raises(type(fault()), match=f"^{fault()}$"):
        collect(model, batches, progress=False, **kw)
    monkeypatch.undo()
    snap.assert_same()
    assert torch.equal(_output(model, family), ref)
    collect(model, [tiny_batch(family)], progress=False, **kw)  # no stale "already active"


# ---- masking --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("family, heads", [("gpt2", {0: [1, 2], 1: [0]}), ("t5", {0: [1], 3: [0, 3], 5: [2]}),
                                           ("llama", {0: [0], 1: [1, 3]})])
def test_fault_during_masking(monkeypatch, family, heads, fault):
    model = tiny_model(family)
    snap = ModelSnapshot(model)
    calls = fail_on_call(monkeypatch, mask_mod, "apply_head_mask_", len(heads), fault)  # the last layer
    with pytest.raises(type(fault()), match=f"^{fault()}$"):
        mask_heads(model, heads)
    assert len(calls) == len(heads)
    monkeypatch.undo()
    snap.assert_same()
    with mask_heads(model, heads):  # the failed handle left no "already masked" record
        pass
    snap.assert_same()


# ---- physical pruning -----------------------------------------------------------------------------

PRUNE_CASES = {
    "t5-uneven": ("t5", {0: [1], 1: [0, 1, 2, 3], 2: [2, 3], 4: [0]}),  # per-layer bias tables, extras
    "phi3-fused": ("phi3", {0: [0, 1], 1: [3]}),  # fused qkv, per-module config copies
    "gpt2-conv1d": ("gpt2", {0: [0, 1, 2, 3], 1: [1]}),  # an emptied layer: forward replaced
    "llama-uniform": ("llama", {0: [2, 3], 1: [2, 3]}),  # config rewritten
}


def _slice_calls(family, heads) -> int:
    calls = []
    real = prune_mod.slice_
    prune_mod.slice_ = lambda *a: (calls.append(1), real(*a))[1]
    try:
        prune_heads(tiny_model(family), heads)
    finally:
        prune_mod.slice_ = real
    return len(calls)


def _inject(monkeypatch, point, case, fault):
    family, heads = PRUNE_CASES[case]
    if point.startswith("slice"):
        n = {"slice-first": 1, "slice-middle": None, "slice-last": None}[point]
        total = _slice_calls(family, heads)
        n = n or (total // 2 if point == "slice-middle" else total)
        fail_on_call(monkeypatch, prune_mod, "slice_", n, fault)
    elif point == "configs":
        fail_on_call(monkeypatch, prune_mod, "update_configs", 1, fault)
    elif point == "check":
        fail_on_call(monkeypatch, prune_mod, "check_layout", 1, fault)
    elif point == "report":  # the after-measure, once the model is fully pruned
        fail_on_call(monkeypatch, report_mod, "measure", 2, fault)


@pytest.mark.parametrize("point, fault", both_faults_first(["slice-middle", "slice-first", "slice-last", "configs",
                                                             "check", "report"]))
@pytest.mark.parametrize("case", list(PRUNE_CASES))
def test_fault_during_pruning(monkeypatch, case, point, fault):
    family, heads = PRUNE_CASES[case]
    model = tiny_model(family)
    ref = _output(model, family)
    snap = ModelSnapshot(model)
    _inject(monkeypatch, point, case, fault)
    with pytest.raises(type(fault()), match=f"^{fault()}$"):
        prune_heads(model, heads)
    monkeypatch.undo()
    snap.assert_same()
    assert not hasattr(model, STATE_ATTR)
    assert torch.equal(_output(model, family), ref)


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_while_pruning_a_pruned_model(monkeypatch, fault):
    model = tiny_model("t5")
    prune_heads(model, {0: [1], 2: [0, 3]})
    ref = _output(model, "t5")
    snap = ModelSnapshot(model)
    fail_on_call(monkeypatch, prune_mod, "slice_", 5, fault)
    with pytest.raises(type(fault()), match=f"^{fault()}$"):
        prune_heads(model, {0: [0], 1: [2], 5: [1]})
    monkeypatch.undo()
    snap.assert_same()  # _headprune_state included
    assert torch.equal(_output(model, "t5"), ref)


# ---- saving -----------------------------------------------------------------------------------------


def _fail_in(monkeypatch, where, fault):
    if where == "weights-plain":
        fail_on_call(monkeypatch, transformers.PreTrainedModel, "save_pretrained", 1, fault)
    elif where == "weights-rebuilt":
        import safetensors.torch

        real = safetensors.torch.save_model

        def half_written(model, filename, *a, **k):
            real(model, filename, *a, **k)  # the file exists, then the fault
            raise fault()

        monkeypatch.setattr(safetensors.torch, "save_model", half_written)
    elif where == "tokenizer":
        fail_on_call(monkeypatch, transformers.PreTrainedTokenizerBase, "save_pretrained", 1, fault)
    elif where == "metadata":
        from headprune.stats import HeadScores

        fail_on_call(monkeypatch, HeadScores, "to_dict", 1, fault)
    elif where == "rename":  # moving the finished directory into place (or swapping it with the old one)
        fail_on_call(monkeypatch, os, "rename", 1, fault)
        fail_on_call(monkeypatch, atomic, "_exchange", 1, fault)


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(100)}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0")))


@pytest.mark.parametrize("where, fault", both_faults_first(["weights-plain", "weights-rebuilt", "tokenizer", "metadata",
                                                             "rename"]))
@pytest.mark.parametrize("existing", ["new", "empty", "overwrite"])
def test_fault_during_saving(monkeypatch, tmp_path, where, existing, fault):
    family, heads = ("gpt2", {0: [1]}) if where == "weights-rebuilt" else ("llama", {0: [2, 3], 1: [2, 3]})
    model = tiny_model(family)
    prune_heads(model, heads)
    scores = collect(tiny_model(family), [tiny_batch(family)], progress=False)
    out = tmp_path / "out"
    if existing != "new":
        out.mkdir()
    if existing == "overwrite":
        (out / "old.txt").write_text("previous run")
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    tok = _tokenizer()
    snap = ModelSnapshot(model)
    _fail_in(monkeypatch, where, fault)
    with pytest.raises(type(fault()), match=f"^{fault()}$"):
        save_pruned(model, out, tokenizer=tok, scores=scores, overwrite=existing == "overwrite")
    monkeypatch.undo()
    snap.assert_same()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == listing
    if existing == "overwrite":
        assert (out / "old.txt").read_text() == "previous run"


# ---- what a killed process leaves: removed once it is provably gone --------------------------------


def _ended_owner() -> str:
    """The owner token of a process that has exited."""
    import subprocess
    import sys

    script = "from headprune.atomic import owner_token; print(owner_token())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def _staging(folder, owner, target="out", marker=None, rand="0a0b0c0d"):
    root = folder / f".{target}.tmp-{owner}-{rand}"
    (root / "new").mkdir(parents=True)
    (root / "new" / "weights.bin").write_bytes(b"partial")
    if marker is not False:
        (root / atomic.MARKER).write_text(f'{{"owner": "{marker or owner}", "target": "{folder / target}"}}')
    return root


def test_only_leftovers_of_ended_processes_are_removed(tmp_path):
    ended, me = _ended_owner(), atomic.owner_token()
    other_host = "f" * 8 + me[8:]
    gone = [_staging(tmp_path, ended), _staging(tmp_path, ended, marker=False, rand="1a1b1c1d"),
            tmp_path / f".c.json.tmp-{ended}-2a2b2c2d"]
    gone[-1].write_text("{")
    kept = [_staging(tmp_path, me, rand="3a3b3c3d"), _staging(tmp_path, other_host, rand="4a4b4c4d"),
            _staging(tmp_path, ended, marker=me, rand="5a5b5c5d"), tmp_path / ".out.tmp-mine", tmp_path / "out"]
    kept[-2].mkdir()
    kept[-1].mkdir()
    assert sorted(atomic.remove_leftovers(tmp_path)) == sorted(map(str, gone))
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert atomic.leftovers(tmp_path, mine=True) == [str(kept[0])]


def test_a_target_moved_aside_by_a_killed_process_is_put_back(tmp_path):
    """Without RENAME_EXCHANGE the old directory is moved aside before the new one moves in:
    a kill between the two leaves no target, and the next run moves the old one back."""
    root = _staging(tmp_path, _ended_owner())
    (root / "old").mkdir()
    (root / "old" / "result.json").write_text("old")
    atomic.check_target(tmp_path / "out", replace=True, arg="--out", hint="")
    assert (tmp_path / "out" / "result.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("fault", [None, *FAULTS])
def test_replacing_without_rename_exchange(tmp_path, monkeypatch, fault):
    import errno

    def unsupported(a, b):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(atomic, "_exchange", unsupported)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    if fault is not None:  # the second rename (moving the new directory in) fails
        fail_on_call(monkeypatch, os, "rename", 2, fault)
    try:
        with atomic.Staged(out, replace=True) as stage:
            open(os.path.join(stage.path, "new.txt"), "w").write("new")
    except (RuntimeError, KeyboardInterrupt):
        assert fault is not None
    assert os.listdir(out) == (["old.txt"] if fault else ["new.txt"])
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_stage_removes_the_folders_it_made(tmp_path):
    """``save_pruned`` (and ``--out a/b/c``) into missing folders left them behind on failure."""
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError, match="disk"):
        with atomic.Staged(out) as stage:
            open(os.path.join(stage.path, "x.txt"), "w").write("x")
            raise RuntimeError("disk")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="^disk$"):
        with atomic.Staged(out):
            (tmp_path / "new" / "mine.txt").write_text("someone else's")  # written there meanwhile: kept
            raise RuntimeError("disk")
    assert sorted(os.listdir(tmp_path / "new")) == ["mine.txt"]
    with atomic.Staged(out) as stage:
        open(os.path.join(stage.path, "x.txt"), "w").write("x")
    assert os.listdir(out) == ["x.txt"]


def test_a_target_under_a_file_is_refused_up_front(tmp_path):
    """A file where a folder of the path would be made passed the check (it probed the nearest
    existing folder), so the command ran to the end before failing."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match=rf"--out: {tmp_path / 'afile'} is not a directory, so "
                                                 rf"{tmp_path / 'afile' / 'o' / 'p'} cannot be made"):
        atomic.check_target(tmp_path / "afile" / "o" / "p", replace=False, arg="--out", hint="")
    assert atomic.check_target(tmp_path / "o" / "p", replace=False, arg="--out", hint="") == str(tmp_path / "o" / "p")


def test_a_folder_another_writer_makes_meanwhile_is_used_not_removed(tmp_path, monkeypatch):
    """Two saves into sibling outputs under one new folder: the second found the folder made
    between its check and its mkdir and failed with FileExistsError (os.makedirs took it)."""
    real = os.mkdir

    def racing(path, *a, **k):
        if str(path) == str(tmp_path / "runs"):
            real(path)  # the other writer, first
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", racing)
    with pytest.raises(RuntimeError, match="^after the race$"):
        with atomic.Staged(tmp_path / "runs" / "a"):
            raise RuntimeError("after the race")
    monkeypatch.setattr(os, "mkdir", real)
    assert os.listdir(tmp_path) == ["runs"]  # the other writer's folder stays
    with atomic.Staged(tmp_path / "runs" / "a") as stage:
        open(os.path.join(stage.path, "x"), "w").write("x")
    assert os.listdir(tmp_path / "runs" / "a") == ["x"]


def test_long_names_and_the_working_directory_as_outputs(tmp_path, monkeypatch):
    """A valid output name of 200 bytes failed at the save, after the slow work (its staging
    name grew past 255 bytes), and a save over the working directory (or a folder holding it)
    left this process in a deleted directory."""
    from hf_tiny import tiny_model

    from headprune.hf import load_pruned, prune_heads, save_pruned

    model = tiny_model("gpt2")
    prune_heads(model, {0: [1]})
    long = tmp_path / ("剪枝" * 32 + "x" * 8)  # 200 bytes
    save_pruned(model, long)
    atomic.write_file(tmp_path / ("y" * 250), "text")
    assert (tmp_path / ("y" * 250)).read_text() == "text" and load_pruned(long).config.n_head == 4
    save_pruned(model, tmp_path / "out" / "inner")
    for here in (tmp_path / "out", tmp_path / "out" / "inner"):
        monkeypatch.chdir(here)
        for target in (".", tmp_path / "out"):  # the directory itself, or a folder holding it
            with pytest.raises(FileExistsError, match="is the working directory or holds it; replacing it would"):
                save_pruned(model, target, overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "out")  # the working directory named through a link
    with pytest.raises(FileExistsError, match="is the working directory or holds it"):
        save_pruned(model, tmp_path / "link" / "inner", overwrite=True)
    assert os.getcwd() == str(tmp_path / "out" / "inner")
