"""Outputs are never lost or half-written: ``--force`` replaces an output in one step, a symlinked
or unwritable ``--out`` is refused before any slow work, a killed run's leftovers are removed by
the next run into the same folder, write errors are one line with exit status 2, and a resumed
scan refuses a checkpoint whose numbers were computed differently.

Kills are real (``SIGKILL`` sent by a subprocess to itself at a chosen point); "every instant"
is checked by recording the output directory around every rename, unlink and rmdir call.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from test_cli import run, tiny_dir  # noqa: F401  (fixtures: main() in a fresh folder, a tiny BERT)

from headprune.app import commands
from headprune.hf import prune_heads, save_pruned

try:
    from headprune import atomic
except ImportError:  # the module the fixes add: the tests still run (and fail) without it
    atomic = None

SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--quiet"]
SCAN_FILES = {"scores.json", "summary.md", "heatmap.png"}
OLD = {"old.txt": b"old", "model/w.bin": b"old weights", "model/c.json": b"{}"}
NEW = {"new.txt": b"new", "model/w.bin": b"new weights", "model/t.json": b"[]"}


def _tree(d):
    """``{relative path: bytes}`` of the files under ``d``, ``None`` if there is no directory."""
    if not os.path.isdir(d):
        return None
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(d) for f in files}


def _make(d, files):
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
        with open(os.path.join(d, rel), "wb") as f:
            f.write(data)


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _watch(monkeypatch, out, fault_at=None):
    """Record ``_tree(out)`` before and after every call that moves or deletes a path; with
    ``fault_at=k``, raise ``KeyboardInterrupt`` instead of making the k-th call."""
    seen, calls = [], []
    owners = [(os, n) for n in ("rename", "replace", "unlink", "remove", "rmdir")]
    owners += [(atomic, "_exchange")] if atomic is not None else []
    for owner, name in owners:
        real = getattr(owner, name)

        def wrapper(*a, _real=real, **k):
            calls.append(1)
            if len(calls) == fault_at:
                raise KeyboardInterrupt
            seen.append(_tree(out))
            try:
                return _real(*a, **k)
            finally:
                seen.append(_tree(out))

        monkeypatch.setattr(owner, name, wrapper)
    return seen, calls


# ---- --force: old-complete or new-complete at every instant -------------------------------------


def test_force_replaces_the_output_in_one_step(tmp_path, monkeypatch):
    out = tmp_path / "X"
    _make(out, OLD)
    seen, _ = _watch(monkeypatch, out)
    with commands.output_dir(out, True) as tmp:
        _make(tmp, NEW)
    monkeypatch.undo()
    assert seen and all(s in (OLD, NEW) for s in seen), [s for s in seen if s not in (OLD, NEW)][:1]
    assert _tree(out) == NEW and _hidden(tmp_path) == []


def test_save_pruned_overwrite_replaces_in_one_step(tmp_path, monkeypatch):
    from hf_tiny import tiny_model

    model = tiny_model("gpt2")
    prune_heads(model, {0: [1]})
    out = tmp_path / "X"
    save_pruned(model, out)
    first = _tree(out)
    prune_heads(model, {1: [0]})
    seen, _ = _watch(monkeypatch, out)
    save_pruned(model, out, overwrite=True)
    monkeypatch.undo()
    new = _tree(out)
    assert new != first and all(s in (first, new) for s in seen)
    assert _hidden(tmp_path) == []


def test_an_interrupt_at_any_step_leaves_old_or_new(tmp_path, monkeypatch):
    out = tmp_path / "X"
    for k in range(1, 40):
        shutil.rmtree(out, ignore_errors=True)
        _make(out, OLD)
        with monkeypatch.context() as m:
            _, calls = _watch(m, out, fault_at=k)
            try:
                with commands.output_dir(out, True) as tmp:
                    _make(tmp, NEW)
            except KeyboardInterrupt:
                pass
        assert _tree(out) in (OLD, NEW), k
        if len(calls) < k:  # no call left to interrupt: the run completed
            break
    assert _tree(out) == NEW
    # an interrupt inside the cleanup leaves the staging directory; this process still runs, so
    # it stays (test_the_next_run_removes_a_killed_saves_leftovers: removed once the owner is gone)
    assert [str(tmp_path / n) for n in _hidden(tmp_path)] == atomic.leftovers(tmp_path, mine=True)


def test_scan_force_interrupted_while_replacing_says_what_is_where(run, tmp_path, tiny_dir, monkeypatch):
    out = tmp_path / "o"
    assert run(["scan", tiny_dir, *SMALL, "--out", out])[0] == 0
    old = _tree(out)
    real = shutil.rmtree

    def rmtree(path, *a, **k):  # Ctrl-C at the first deletion of the replacement step
        monkeypatch.setattr(shutil, "rmtree", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_write_json", _patch_after(commands._write_json, shutil, "rmtree", rmtree,
                                                              monkeypatch))
    code, err = run(["scan", tiny_dir, *SMALL, "--out", out, "--force", "--seq-len", "12"])
    assert code == 130 and len(err) == 1
    state = _tree(out)
    assert state == old or (set(state) == SCAN_FILES and state != old)
    assert ("was not changed" in err[0]) == (state == old) and "nothing was written" not in err[0]
    assert all(str(tmp_path / name) in err[0] for name in _hidden(tmp_path)), (err, _hidden(tmp_path))


def _patch_after(fn, owner, name, replacement, monkeypatch):
    """``fn`` that, once called, installs ``owner.name = replacement`` (the fault arms only once
    the run reaches its writing step)."""
    def wrapped(*a, **k):
        monkeypatch.setattr(owner, name, replacement)
        return fn(*a, **k)
    return wrapped


# ---- symlinks and glob characters in --out ------------------------------------------------------


def _no_load(monkeypatch):
    def load_model(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(commands, "load_model", load_model)


@pytest.mark.parametrize("cmd", ["scan", "prune"])
@pytest.mark.parametrize("target", ["empty-dir", "dangling"])
def test_symlinked_out_is_refused_up_front(run, tmp_path, monkeypatch, cmd, target):
    real = tmp_path / "real"
    if target == "empty-dir":
        real.mkdir()
    (tmp_path / "link").symlink_to(real)
    _no_load(monkeypatch)
    before = _hidden(tmp_path) + sorted(os.listdir(real) if real.exists() else [])
    extra = ["--count", "1"] if cmd == "prune" else []
    code, err = run([cmd, "m", "--quiet", "--out", tmp_path / "link", "--force", *extra])
    assert code == 2 and len(err) == 1 and "--out: " in err[0] and "symbolic link" in err[0], err
    assert (tmp_path / "link").is_symlink() and _hidden(tmp_path) + sorted(
        os.listdir(real) if real.exists() else []) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_pruned_refuses_a_symlinked_directory(tmp_path, overwrite):
    from hf_tiny import tiny_model

    model = tiny_model("gpt2")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FileExistsError, match=r"path: .*link is a symbolic link"):
        save_pruned(model, tmp_path / "link", overwrite=overwrite)
    assert (tmp_path / "link").is_symlink() and os.listdir(tmp_path / "real") == []
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_glob_characters_in_out_name_only_that_runs_checkpoint(run, tmp_path, tiny_dir):
    other = tmp_path / ".exp1.checkpoint.json"  # another run's, matched by the glob ".exp[1].checkpoint*"
    other.write_text("{}")
    code, err = run(["scan", tiny_dir, *SMALL, "--out", tmp_path / "exp[1]"])
    assert code == 0, err
    assert other.read_text() == "{}" and _hidden(tmp_path) == [".exp1.checkpoint.json"]


# ---- leftovers of killed runs ---------------------------------------------------------------------

_KILLER = """
import os, signal, sys
real, calls = getattr(os, {name!r}), []
def kill_on_call(*a, **k):
    calls.append(1)
    if len(calls) == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
setattr(os, {name!r}, kill_on_call)
from headprune.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed(tmp_path, name, n, argv):
    """Run ``headprune argv`` in a subprocess that SIGKILLs itself at the n-th call of os.<name>."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", _KILLER.format(name=name, n=n), *map(str, argv)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]


def test_a_resumed_scan_removes_the_killed_runs_checkpoint_temp(run, tmp_path, tiny_dir):
    out = tmp_path / "o"
    _killed(tmp_path, "fsync", 2, ["scan", tiny_dir, *SMALL, "--out", out])  # killed writing checkpoint 2
    assert len(_hidden(tmp_path)) == 2  # the checkpoint of batch 1 and the killed write's temp file
    code, err = run(["scan", tiny_dir, *SMALL, "--out", out, "--resume"])
    assert code == 0, err
    assert _hidden(tmp_path) == [] and set(os.listdir(out)) == SCAN_FILES


def test_the_next_run_removes_a_killed_saves_leftovers(run, tmp_path, tiny_dir):
    _killed(tmp_path, "rename", 1, ["prune", tiny_dir, *SMALL, "--count", "2", "--eval-windows", "1",
                                    "--out", tmp_path / "o"])  # killed moving the saved model into place
    assert _hidden(tmp_path) and not (tmp_path / "o").exists()
    code, err = run(["scan", tiny_dir, *SMALL, "--out", tmp_path / "o2"])  # a run into the same folder
    assert code == 0, err
    assert _hidden(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["o2"]


def test_an_interrupted_scan_names_its_checkpoint(run, tmp_path, tiny_dir, monkeypatch):
    from headprune.hf.checkpoint import Checkpoint

    real = Checkpoint.save

    def save(self, scores, done, batches):
        real(self, scores, done, batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", save)
    code, err = run(["scan", tiny_dir, *SMALL, "--out", tmp_path / "o"])
    assert code == 130 and len(err) == 1
    assert str(tmp_path / ".o.checkpoint.json") in err[0] and "--resume" in err[0], err
    assert _hidden(tmp_path) == [".o.checkpoint.json"] and not (tmp_path / "o").exists()


# ---- write errors: one line naming the path and the cause, exit 2, nothing half-written -----------


def _unwritable(monkeypatch, folder, err):
    """``folder`` refuses new entries with ``OSError(err)`` (root ignores modes: refuse in os)."""
    folder = str(folder)
    real_mkdir, real_open = os.mkdir, os.open

    def inside(p, dir_fd=None):
        return dir_fd is None and os.path.dirname(os.path.abspath(p)) == folder

    def mkdir(p, *a, **k):
        if inside(p, k.get("dir_fd")):
            raise OSError(err, os.strerror(err), str(p))
        return real_mkdir(p, *a, **k)

    def open_(p, flags, *a, **k):
        if flags & os.O_CREAT and inside(p, k.get("dir_fd")):
            raise OSError(err, os.strerror(err), str(p))
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("cmd, err", [("scan", 30), ("prune", 13), ("sweep", 30)])  # EROFS, EACCES
def test_unwritable_out_is_refused_before_loading_the_model(run, tmp_path, monkeypatch, cmd, err):
    (tmp_path / "ro").mkdir()
    _unwritable(monkeypatch, tmp_path / "ro", err)
    _no_load(monkeypatch)
    extra = ["--count", "1"] if cmd == "prune" else []
    code, lines = run([cmd, "m", "--quiet", "--out", tmp_path / "ro" / "out", *extra])
    assert code == 2 and len(lines) == 1, lines
    assert f"--out: cannot write in {tmp_path / 'ro'} ({os.strerror(err)})" in lines[0]
    assert os.listdir(tmp_path / "ro") == []


def _safetensors_full(monkeypatch, message):
    import safetensors.torch
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError(message)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    monkeypatch.setattr(safetensors.torch, "save_model", full)


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_while_saving_the_pruned_model(run, tmp_path, tiny_dir, monkeypatch, existing):
    out = tmp_path / "o"
    if existing:
        _make(out, OLD)
    _safetensors_full(monkeypatch, "Error while serializing: I/O error: No space left on device (os error 28)")
    code, err = run(["prune", tiny_dir, *SMALL, "--count", "2", "--eval-windows", "1", "--out", out, "--force"])
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("headprune prune: error: ") and str(out) in err[0]
    assert "No space left on device" in err[0] and "Traceback" not in err[0]
    assert _tree(out) == (OLD if existing else None) and _hidden(tmp_path) == []


def test_a_full_disk_while_writing_the_scan_checkpoint(run, tmp_path, tiny_dir, monkeypatch):
    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    code, err = run(["scan", tiny_dir, *SMALL, "--out", tmp_path / "o"])
    assert code == 2 and len(err) == 1, err
    assert str(tmp_path / ".o.checkpoint.json") in err[0] and "No space left on device" in err[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cmd, extra, path", [("scan", [], ".o.checkpoint.json"),
                                               ("prune", ["--count", "2", "--eval-windows", "1"], "o")])
def test_a_file_size_limit_is_one_line(tmp_path, tiny_dir, cmd, extra, path):
    """A real ``RLIMIT_FSIZE``: Python ignores SIGXFSZ, so the write fails with EFBIG (in
    Python's own writes for the scan's checkpoint, in safetensors' for the pruned weights)."""
    resource = pytest.importorskip("resource")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    out = subprocess.run([sys.executable, "-m", "headprune", cmd, str(tiny_dir), *SMALL, *extra, "--out", "o"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert f"cannot write {tmp_path / path} (File too large)" in lines[0], lines
    assert os.listdir(tmp_path) == []


# ---- a resumed scan computes the same numbers as the interrupted one -----------------------------


def _scan_interrupted(run, monkeypatch, tiny_dir, out, flags):
    from headprune.hf.checkpoint import Checkpoint

    real = Checkpoint.save

    def save(self, scores, done, batches):
        real(self, scores, done, batches)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "save", save)
        assert run(["scan", tiny_dir, *SMALL, "--out", out, *flags])[0] == 130


@pytest.mark.parametrize("first, second, setting", [
    ([], ["--no-fused"], "fused"),
    ([], ["--dtype", "bfloat16"], "dtype"),
    (["--dtype", "bf16"], ["--dtype", "float32"], "dtype"),
])
def test_resume_refuses_a_checkpoint_computed_differently(run, tmp_path, tiny_dir, monkeypatch, first, second,
                                                          setting):
    out = tmp_path / "o"
    _scan_interrupted(run, monkeypatch, tiny_dir, out, first)
    code, err = run(["scan", tiny_dir, *SMALL, "--out", out, "--resume", *second])
    assert code == 2 and len(err) == 1, err
    assert str(tmp_path / ".o.checkpoint.json") in err[0] and setting in err[0], err
    assert _hidden(tmp_path) == [".o.checkpoint.json"] and not out.exists()


def test_resume_accepts_the_same_settings_spelled_differently(run, tmp_path, tiny_dir, monkeypatch):
    out = tmp_path / "o"
    _scan_interrupted(run, monkeypatch, tiny_dir, out, [])
    code, err = run(["scan", tiny_dir, *SMALL, "--out", out, "--resume", "--dtype", "fp32", "--fused"])
    assert code == 0, err
    settings = json.loads((out / "scores.json").read_text())["settings"]
    assert settings["dtype"] == "float32" and settings["fused"] is True
    assert _hidden(tmp_path) == []
