"""Where a command may write, and what a refusal leaves: an existing --out's times as they were;
flags that nothing reads are refused; an interrupt that native code turned into another error is
reported as the interrupt."""

import os
import shutil
import signal
from pathlib import Path

import pytest

from headprune.app.cli import main
from test_cli import run  # noqa: F401 (a fixture)
from test_cli_inputs import _run, tiny_dir  # noqa: F401 (tiny_dir: a fixture)

pytest.importorskip("tokenizers")


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def _no_load(monkeypatch):
    import headprune.app.commands as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))


@pytest.mark.parametrize("command", ["prune", "scan", "sweep"])
def test_an_output_inside_the_models_folder_is_written_there(tmp_path, tiny_dir, capsys, monkeypatch, command):
    """Run from inside the model's folder (``prune .``), the default output lies inside it: a
    subfolder, which no loader of the model reads, so the run goes on (not refused as an input)."""
    import headprune.app.commands as C

    shutil.copytree(tiny_dir, tmp_path / "bert")
    monkeypatch.chdir(tmp_path / "bert")
    monkeypatch.setattr(C, "load_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("MODEL: loaded")))
    extra = {"prune": ["--ratio", "0.3"], "scan": [], "sweep": ["--ratios", "0.3"]}[command]
    code, err = _run([command, ".", "--quiet", *extra], capsys)
    assert code == 2 and err[0] == f"headprune {command}: error: MODEL: loaded", err


def test_a_refusal_leaves_an_existing_outputs_times_as_they_were(tmp_path, tiny_dir, capsys):
    """The writability probe made and removed a folder inside --out: every failing --force run
    changed its modification time."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("kept")
    os.utime(out, ns=(1_577_836_800_000_000_000, 1_577_836_800_000_000_000))
    os.utime(tmp_path, ns=(1_577_836_800_000_000_000, 1_577_836_800_000_000_000))
    before = _tree(tmp_path) + [os.stat(tmp_path).st_mtime_ns]
    code, err = _run(["scan", tiny_dir, "--data", tmp_path / "nope.txt", "--out", out, "--force", "--quiet"], capsys)
    assert code == 2 and "--data: " in err[0]
    assert _tree(tmp_path) + [os.stat(tmp_path).st_mtime_ns] == before


@pytest.mark.parametrize("extra, flag", [(["--seed", "7"], "--seed"),
                                         (["--no-reconstruct", "--score", "entropy", "--damping", "0.5"], "--damping")])
def test_flags_nothing_reads_are_refused(tmp_path, tiny_dir, capsys, monkeypatch, extra, flag):
    """--seed without --order random or --score learned, and --damping without a refit or the
    reconstruction score, were recorded in the report and changed nothing."""
    _no_load(monkeypatch)
    code, err = _run(["prune", tiny_dir, "--ratio", "0.3", "--out", tmp_path / "o", "--quiet", *extra], capsys)
    assert code == 2 and err[0].startswith(f"headprune prune: error: {flag}: ") and "drop it" in err[0]
    for used in (["--seed", "7", "--order", "random"], ["--score", "entropy", "--damping", "0.5"],
                 ["--no-reconstruct", "--damping", "0.5"]):
        import headprune.app.commands as C

        monkeypatch.setattr(C, "load_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("MODEL: loaded")))
        code, err = _run(["prune", tiny_dir, "--ratio", "0.3", "--out", tmp_path / "o", "--quiet", *used], capsys)
        assert code == 2 and err[0] == "headprune prune: error: MODEL: loaded", (used, err)
    code, err = _run(["prune", tiny_dir, "--ratio", "0.3", "--protect-layers", "-1"], capsys)
    assert code == 2 and "--protect-layers: expected non-negative layer indices, each once, got '-1'" in err[0]


def test_export_refuses_what_it_knows_before_the_model_loads(tmp_path, tiny_dir, capsys, monkeypatch):
    pytest.importorskip("gguf")
    import headprune.app.export_command as X

    monkeypatch.setattr(X, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    code, err = _run(["export", tiny_dir, "--gguf", ""], capsys)
    assert code == 2 and err[0] == "headprune export: error: --gguf: expected the path of the GGUF file to write, " \
                                   "got an empty name"
    code, err = _run(["export", tiny_dir, "--gguf", tmp_path / "m.gguf"], capsys)
    assert code == 2 and err[0] == "headprune export: error: MODEL: GGUF export writes llama models, got bert"
    from hf_tiny import tiny_model

    from headprune import save_pruned

    save_pruned(tiny_model("llama"), tmp_path / "llama")
    code, err = _run(["export", tmp_path / "llama", "--gguf", tmp_path / "m.gguf"], capsys)
    assert code == 2 and "error: --source: a GGUF needs the fields and the tokenizer" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["llama"]


def test_an_interrupt_turned_into_another_error_is_reported_as_the_interrupt(tmp_path, tiny_dir, capsys, monkeypatch):
    """matplotlib's native code turns a KeyboardInterrupt raised inside it into an ImportError
    ("initialization failed") or a ValueError ("Invalid bounding box"): a traceback, or an
    error naming no flag, where the user pressed Ctrl-C."""
    import headprune.app.commands as C

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job's shell ignores it
    try:
        _interrupted_inside_native_code(tmp_path, tiny_dir, capsys, monkeypatch, C)
    finally:
        signal.signal(signal.SIGINT, before)


def _interrupted_inside_native_code(tmp_path, tiny_dir, capsys, monkeypatch, C):

    def interrupted_inside(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # raised in this thread at the next bytecode
            for _ in range(10**7):
                pass
        except KeyboardInterrupt:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(C, "load_model", interrupted_inside)
    code, err = _run(["scan", tiny_dir, "--out", tmp_path / "o", "--quiet"], capsys)
    assert code == 130 and err[0] == f"headprune scan: interrupted; {tmp_path / 'o'} was not changed", err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(C, "load_model", lambda *a, **k: (_ for _ in ()).throw(ImportError("not an interrupt")))
    with pytest.raises(ImportError, match="not an interrupt"):
        main(["scan", str(tiny_dir), "--out", str(tmp_path / "o"), "--quiet"])


def test_a_file_that_is_no_recovery_checkpoint_is_refused_first(run, tmp_path, tiny_dir):  # noqa: F811
    """``--checkpoint`` naming the pruned model's weights was refused after both models loaded and
    were evaluated, with the advice to delete it."""
    code, err = run(["prune", tiny_dir, "--ratio", "0.3", "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed",
                     "--out", tmp_path / "p"])
    assert code == 0, err
    weights = tmp_path / "w.safetensors"  # the model's weights, outside the folder read (no file may go in there)
    shutil.copyfile(next((tmp_path / "p" / "model").glob("*.safetensors")), weights)
    before = weights.read_bytes()
    code, err = run(["recover", tmp_path / "p", "--steps", "1", "--checkpoint", weights, "--out", tmp_path / "g"])
    assert code == 2 and err[-1].endswith(f"--checkpoint: {weights} exists and is not a recovery checkpoint; the run "
                                          "would write over it, so pass another path"), err
    assert not any("loading" in line for line in err) and weights.read_bytes() == before and not (tmp_path / "g").exists()


def test_the_default_output_is_named_after_the_folder_even_when_given_as_dot(tmp_path, monkeypatch):
    """`headprune prune .` from inside the model's folder wrote headprune-out/prune-model (the
    name of "." is empty), and `x/..` a folder named prune-.."""
    import argparse

    from headprune.app.commands import _out

    (tmp_path / "my-llm" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "my-llm")
    for given in (".", "./", "sub/..", "../my-llm"):
        assert _out(argparse.Namespace(out=None, model=given), "prune") == Path("headprune-out/prune-my-llm"), given
    assert _out(argparse.Namespace(out=None, model="sub"), "scan") == Path("headprune-out/scan-sub")
    assert _out(argparse.Namespace(out=None, model="m.GGUF"), "scan") == Path("headprune-out/scan-m")
