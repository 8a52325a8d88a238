"""The command line's error contract: every argument error exits non-zero with one line
``headprune <cmd>: error: ...`` naming the problem, and writes nothing.

In-process through ``headprune.app.cli.main`` (argparse errors raise ``SystemExit(2)``), plus
``python -m headprune`` in a subprocess. No real model is loaded: the one model case uses a
tiny random BERT saved with a word-level tokenizer built in code.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from headprune.app.cli import main

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from hf_tiny import save_tiny_bert

    path = tmp_path_factory.mktemp("tiny") / "bert"
    save_tiny_bert(path)
    return path


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """``main(argv)`` in an empty working directory -> (exit code, stderr lines)."""
    monkeypatch.chdir(tmp_path)

    def call(argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        return code, [line for line in err.splitlines() if line.strip()]

    return call


def _files(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


# ---- argparse errors: exit 2 -------------------------------------------------------------------

FAST = ["--quiet"]
PARSE_ERRORS = [
    ([], "headprune: error: the following arguments are required: COMMAND"),
    (["shrink", "m"], "headprune: error: argument COMMAND: invalid choice: 'shrink'"),
    (["prune", "m"], "headprune prune: error: one of the arguments --ratio --count is required"),
    (["prune", "m", "--ratio", "0.1", "--count", "2"], "argument --count: not allowed with argument --ratio"),
    (["prune", "m", "--ratio", "0"], r"argument --ratio: expected a number in \(0, 1\), got 0\b"),
    (["prune", "m", "--ratio", "1"], r"argument --ratio: expected a number in \(0, 1\), got 1\b"),
    (["prune", "m", "--ratio", "1.5"], r"argument --ratio: expected a number in \(0, 1\), got 1.5"),
    (["prune", "m", "--ratio", "-0.2"], r"argument --ratio: expected a number in \(0, 1\), got -0.2"),
    (["prune", "m", "--ratio", "nan"], r"argument --ratio: expected a number in \(0, 1\), got nan"),
    (["prune", "m", "--ratio", "half"], r"argument --ratio: expected a number in \(0, 1\), got 'half'"),
    (["prune", "m", "--count", "0"], "argument --count: expected a positive integer, got 0"),
    (["prune", "m", "--count", "2.5"], "argument --count: expected a positive integer, got '2.5'"),
    (["prune", "m", "--count", "2", "--mask", "--physical"], "argument --physical: not allowed with argument --mask"),
    (["prune", "m", "--count", "2", "--scope", "layer"], "argument --scope: invalid choice: 'layer'"),
    (["prune", "m", "--count", "2", "--protect-layers", "0,x"], "argument --protect-layers: expected comma-separated"),
    (["prune", "m", "--count", "2", "--min-heads-per-layer", "one"],
     "argument --min-heads-per-layer: expected a non-negative integer, got 'one'"),
    (["prune", "m", "--count", "2", "--seed", str(2**40)],  # learned gates' bound: it failed after the collection
     "argument --seed: expected a non-negative integer below 1,099,511,627,776, got 1099511627776"),
    (["eval", "m", "--samples", "4"], "headprune eval: error: unrecognized arguments: --samples 4"),
    (["scan", "m", "--eval-windows", "4"], "headprune scan: error: unrecognized arguments: --eval-windows 4"),
    (["scan", "m", "--samples", "-1"], "argument --samples: expected a positive integer, got -1"),
    (["scan", "m", "--batch-size", "x"], "argument --batch-size: expected a positive integer, got 'x'"),
    (["scan", "m", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["scan"], "headprune scan: error: the following arguments are required: MODEL"),
    (["eval", "m", "--out", "x"], "headprune eval: error: unrecognized arguments: --out x"),
    (["sweep", "m", "--ratios", "0.1,2"], r"argument --ratios: expected a number in \(0, 1\), got 2\b"),
]


@pytest.mark.parametrize("argv, message", PARSE_ERRORS, ids=[" ".join(a) or "empty" for a, _ in PARSE_ERRORS])
def test_argument_errors_exit_2_and_name_the_problem(run, tmp_path, argv, message):
    code, lines = run(argv + FAST if argv else argv)
    assert code == 2
    assert lines and re.search(message, lines[-1]), lines[-1:]
    assert _files(tmp_path) == []


@pytest.mark.parametrize("argv", [["prune", "m", "--ratio", "1.5"], ["scan"], []])
def test_argument_errors_are_one_line(run, argv):
    assert len(run(argv)[1]) == 1


# ---- errors found after parsing: exit 2, one line ------------------------------------------------


def _jsonl(tmp_path, text):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    return p


def _txt(tmp_path, text, name="d.txt"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _non_empty_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    return tmp_path / "out"


def _hf_dir(t, m, drop=(), config=None, files=None, tensor=None):
    """A copy of the tiny model directory without the files ``drop`` and the weight ``tensor``,
    with ``config`` changes and files written from ``files`` (name -> text or bytes)."""
    d = t / "model"
    shutil.copytree(m, d)
    for name in drop:
        (d / name).unlink()
    if tensor:
        _drop_tensor(d / "model.safetensors", tensor)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **config}))
    for name, data in (files or {}).items():
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return d


def _drop_tensor(file, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})


def _pruned_dir(t, m, tokenizer=True, drop=None):
    """A directory written by save_pruned from the tiny BERT (plain-loadable: unpruned)."""
    import transformers

    from hf_tiny import tiny_model

    from headprune.hf import save_pruned

    tok = transformers.AutoTokenizer.from_pretrained(m) if tokenizer else None
    save_pruned(tiny_model("bert"), t / "pruned", tokenizer=tok)
    if drop:
        _drop_tensor(t / "pruned" / "model.safetensors", drop)
    return t / "pruned"


Q0 = "encoder.layer.0.attention.self.query.weight"
RUNTIME_ERRORS = [
    ("scan", lambda t, m: ["no-such-model"], "scan: error: MODEL: 'no-such-model' is not a bundled name"),
    ("eval", lambda t, m: [t / "missing.gguf"], "eval: error: MODEL: '.*missing.gguf' is not a bundled name"),
    ("scan", lambda t, m: [_txt(t, "x", "w.bin")], "scan: error: MODEL: '.*w.bin' is a file but not a .gguf file"),
    ("scan", lambda t, m: [_txt(t, "garbage", "w.gguf")], "scan: error: .*w.gguf .*not a GGUF file"),
    ("scan", lambda t, m: [(t / "empty").mkdir() or t / "empty"], "scan: error: MODEL: directory '.*empty' has no config.json"),
    ("scan", lambda t, m: [m, "--data", t / "nope.txt"], "scan: error: --data: '.*nope.txt' is neither a bundled text"),
    ("scan", lambda t, m: [m, "--data", _txt(t, "one paragraph only")], r"--data: '.*d.txt' holds 1 paragraph\(s\)"),
    ("scan", lambda t, m: [m, "--data", _jsonl(t, '{"text": "a"}\n{"text": \n')], r"--data: .*d.jsonl:2 is not valid JSON"),
    ("scan", lambda t, m: [m, "--data", _jsonl(t, '{"text": "a"}\n{"body": "b"}\n')], r"--data: .*d.jsonl:2 has no string field 'text'"),
    ("scan", lambda t, m: [m, "--seq-len", "1"], r"seq_len \(--seq-len\): expected at least 2, got 1"),
    ("prune", lambda t, m: [m, "--count", "99"], "prune: error: --count: 99 is more than the model's 8 query heads"),
    ("prune", lambda t, m: [m, "--ratio", "0.5", "--protect-layers", "0,7"],
     r"--protect-layers: indices \[7\] out of range for 2 layers"),
    ("prune", lambda t, m: [m, "--count", "1", "--min-heads-per-layer", "-1"], "--min-heads-per-layer: expected a non-negative integer, got -1"),
    ("prune", lambda t, m: [m, "--count", "1", "--score", "loud"], "--score: invalid choice"),
    ("prune", lambda t, m: [m, "--count", "1", "--out", _non_empty_out(t)], "--out: .*out is not empty; pass --force"),
    ("scan", lambda t, m: [m, "--out", _non_empty_out(t)], "--out: .*out is not empty; pass --force"),
    ("sweep", lambda t, m: [m, "--out", _non_empty_out(t)], "--out: .*out is not empty; pass --force"),
    *[pytest.param(cmd, lambda t, m, cmd=cmd: [m, "--out", _txt(t, "x", "out")] + (["--count", "1"] if cmd == "prune" else []),
                   "--out: .*out exists and is not a directory", id=f"{cmd}-out-is-a-file")
      for cmd in ("scan", "prune", "sweep")],
    # damaged or incomplete model directories: refused before their weights are loaded
    pytest.param("eval", lambda t, m: [_hf_dir(t, m, drop=["model.safetensors"])],
                 "eval: error: MODEL: .*model has no model.safetensors$", id="config-without-weights"),
    pytest.param("eval", lambda t, m: [_hf_dir(t, m, drop=["model.safetensors"], files={"pytorch_model.bin": b"x"})],
                 r"has no model.safetensors \(pickled weights such as pytorch_model.bin are never loaded",
                 id="pickled-weights"),
    pytest.param("scan", lambda t, m: [_hf_dir(t, m, config={"model_type": "whisperx"})],
                 r"scan: error: MODEL: unsupported model_type 'whisperx' in .*config.json; headprune supports bert, ",
                 id="unknown-model-type"),
    pytest.param("eval", lambda t, m: [_hf_dir(t, m, drop=["tokenizer.json", "tokenizer_config.json"])],
                 "eval: error: MODEL: directory .*model has no tokenizer files", id="no-tokenizer"),
    pytest.param("eval", lambda t, m: [_pruned_dir(t, m, tokenizer=False)],
                 "eval: error: MODEL: directory .*pruned has no tokenizer files", id="pruned-no-tokenizer"),
    pytest.param("eval", lambda t, m: [_hf_dir(t, m, files={"tokenizer.json": "{"})],
                 "eval: error: MODEL: cannot read the tokenizer in .*model", id="damaged-tokenizer"),
    pytest.param("eval", lambda t, m: [_hf_dir(t, m, files={"config.json": "{"})],
                 "eval: error: MODEL: .*config.json is not valid JSON", id="damaged-config"),
    pytest.param("eval", lambda t, m: [_hf_dir(t, m, files={"model.safetensors": b"\x00" * 16})],
                 "eval: error: MODEL: .*model.safetensors is not a readable safetensors file", id="damaged-weights"),
    pytest.param("eval", lambda t, m: [_hf_dir(t, m, config={"vocab_size": 4_000_000})],
                 r"MODEL: .*config.json declares a model of [0-9,]+ elements; the weights hold", id="huge-vocab"),
    pytest.param("eval", lambda t, m: [_hf_dir(t, m, tensor=Q0)],
                 rf"MODEL: .*model.safetensors lacks \['{Q0}'\] that .*config.json declares", id="missing-tensor"),
    pytest.param("prune", lambda t, m: [_pruned_dir(t, m, drop=Q0), "--count", "1"],
                 rf"prune: error: path: .*model.safetensors lacks \['{Q0}'\]", id="pruned-missing-tensor"),
    pytest.param("prune", lambda t, m: [m, "--count", "1", "--scope", "measured", "--no-reconstruct"],
                 "prune: error: --scope measured: measures what removing heads with the refit costs",
                 id="measured-without-refit"),
    pytest.param("prune", lambda t, m: [m, "--count", "1", "--scope", "measured", "--steps", "2"],
                 "prune: error: --scope measured: chooses each layer's share in one round", id="measured-steps"),
    pytest.param("scan", lambda t, m: [m, "--device", "gpu0"], "scan: error: (argument )?--device", id="bad-device"),
    pytest.param("scan", lambda t, m: [m, "--device", "cuda:7"], "scan: error: (argument )?--device", id="absent-device"),
]


@pytest.mark.parametrize("cmd, args, message", RUNTIME_ERRORS,
                         ids=[c.id if hasattr(c, "id") else f"{c[0]}-{i}" for i, c in enumerate(RUNTIME_ERRORS)])
def test_runtime_errors_exit_2_with_one_line(run, tmp_path, tiny_dir, cmd, args, message):
    argv = [cmd, *args(tmp_path, tiny_dir), "--quiet"] + ([] if cmd == "eval" else ["--samples", "4", "--seq-len", "16"])
    if argv.count("--seq-len") > 1:  # the case sets its own
        argv = argv[: -2]
    if cmd != "eval" and "--out" not in argv:
        argv += ["--out", tmp_path / "result"]
    before = _files(tmp_path)
    code, lines = run(argv)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"headprune {cmd}: error: ") and re.search(message, lines[0]), lines[0]
    assert _files(tmp_path) == before  # nothing written, no temporary directory left


# ---- python -m headprune -------------------------------------------------------------------------


def _python_m(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, "-m", "headprune", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_module_entry_point_reports_errors(tmp_path):
    bad_ratio = _python_m(["prune", "m", "--ratio", "2"], tmp_path)
    assert bad_ratio.returncode == 2 and bad_ratio.stdout == ""
    assert bad_ratio.stderr.splitlines()[-1] == "headprune prune: error: argument --ratio: expected a number in (0, 1), got 2"
    unknown = _python_m(["scan", "no-such-model", "--quiet", "--out", tmp_path / "o"], tmp_path)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.strip().splitlines()[-1].startswith("headprune scan: error: MODEL: 'no-such-model' is not a bundled name")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["scan", "sweep"])
def test_scan_and_sweep_write_their_outputs(run, tmp_path, tiny_dir, command):
    extra = ["--ratios", "0.3", "--seeds", "1"] if command == "sweep" else []
    code, err = run([command, tiny_dir, "--samples", "4", "--seq-len", "16", "--quiet", "--out", tmp_path / "o", *extra])
    assert code == 0, err
    want = {"scan": {"scores.json", "summary.md", "heatmap.png"}, "sweep": {"sweep.json", "sweep.md", "sweep.png"}}
    assert {p.name for p in (tmp_path / "o").iterdir()} == want[command]
    if command == "sweep":  # an encoder's default spreads the budget by measured allocation
        import json

        result = json.loads((tmp_path / "o" / "sweep.json").read_text())
        assert {"default", "default, measured allocation"} <= set(result["measured_allocation"])
        assert result["recipes"]["default"] == result["recipes"]["default, measured allocation"]


def test_sweep_random_scope(run, tmp_path, tiny_dir, monkeypatch):
    import json

    import headprune.app.sweep as sweep_mod

    real, scopes = sweep_mod.select_heads, []

    def spy(*args, **kwargs):
        if kwargs.get("order") == "random":
            scopes.append(kwargs.get("scope"))
        return real(*args, **kwargs)

    import headprune.app.sweep_reach as reach_mod

    monkeypatch.setattr(sweep_mod, "select_heads", spy)
    monkeypatch.setattr(reach_mod, "select_heads", spy)  # the ratio checks
    code, err = run(["sweep", tiny_dir, "--samples", "4", "--seq-len", "16", "--quiet", "--out", tmp_path / "o",
                     "--ratios", "0.3", "--seeds", "2", "--random-scope", "global"])
    assert code == 0, err
    assert len(scopes) == 4 and set(scopes) == {"global"}  # the ratio checks (layout, statistics), two draws
    assert json.loads((tmp_path / "o" / "sweep.json").read_text())["random_scope"] == "global"
    assert "random heads drawn from the whole model" in (tmp_path / "o" / "sweep.md").read_text()


def test_scan_fused_switch_reaches_collect(run, tmp_path, tiny_dir, monkeypatch):
    import torch

    import sys

    hf = sys.modules["headprune.hf.collect"]  # what the command calls (through distributed.collect)
    real, seen = hf.collect, []

    def spy(*args, **kwargs):
        seen.append((kwargs.get("fused"), real(*args, **kwargs)))
        return seen[-1][1]

    monkeypatch.setattr(hf, "collect", spy)
    for i, flag in enumerate([[], ["--no-fused"]]):
        code, err = run(["scan", tiny_dir, "--samples", "4", "--seq-len", "16", "--quiet", "--out", tmp_path / f"o{i}", *flag])
        assert code == 0, err
    assert [fused for fused, _ in seen] == [True, False]
    torch.testing.assert_close(seen[0][1].entropy, seen[1][1].entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra", [["--steps", "2", "--no-fused"], ["--mask", "--no-reconstruct", "--no-compensate"],
                                   ["--scope", "per_layer", "--steps", "1"], ["--no-reconstruct"], ["--sequential"]])
def test_prune_writes_a_reloadable_model_and_report(run, tmp_path, tiny_dir, extra):
    import json

    import torch

    from headprune.hf import load_pruned

    code, err = run(["prune", tiny_dir, "--ratio", "0.3", "--samples", "4", "--seq-len", "16", "--quiet",
                     "--out", tmp_path / "o", *extra])
    assert code == 0, err
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"model", "report.json", "report.md", "scores.json",
                                                           "heatmap.png"}
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    s = report["settings"]
    from headprune.ranking import DEFAULT_STEPS

    steps = int(extra[extra.index("--steps") + 1]) if "--steps" in extra else DEFAULT_STEPS
    want = "zero" if "--no-compensate" in extra else ("mean" if "--no-reconstruct" in extra else "refit")
    assert s["steps"] == steps and s["removal"] == want and s["sequential"] is ("--sequential" in extra)
    # an encoder's default spread is measured, with the refit in one round; else what was asked
    scope = extra[extra.index("--scope") + 1] if "--scope" in extra else (
        "measured" if want == "refit" and steps == 1 else "per_layer")
    assert s["scope"] == scope  # the allocation that ran, given or not
    assert ("measured" in report["recipe"]) is (scope == "measured")
    assert report["heads_pruned"] == int(0.3 * report["heads_total"])
    model = load_pruned(tmp_path / "o" / "model")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 3, 4, 5]])).last_hidden_state).all()


def test_steps_argument_is_checked(run, tmp_path):
    code, err = run(["prune", "m", "--ratio", "0.3", "--steps", "0"])
    assert code == 2 and err[-1].endswith("argument --steps: expected a positive integer or 'auto', got '0'")


def test_an_interrupt_while_starting_is_one_line(run, monkeypatch):
    import headprune.app.cli as cli

    def interrupted():
        raise KeyboardInterrupt  # as a Ctrl-C while the commands (torch, transformers) are imported

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert run(["scan", "m"]) == (130, ["headprune: interrupted"])


def test_eval_reads_a_directory_transformers4_pruned(run):
    from pathlib import Path

    path = Path(__file__).parent / "data" / "transformers4" / "bert"
    code, err = run(["eval", str(path), "--json", "--quiet"])
    # the fixture has no tokenizer: refused with one line before any weight is read
    assert code == 2 and len(err) == 1 and "has no tokenizer files" in err[0]


def test_every_option_is_documented():
    """Every option of every command has help text, and the defaults it has are stated in it."""
    import argparse

    from headprune.app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = action.help or ""
            if not text.strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
            elif action.default not in (None, False, argparse.SUPPRESS) and "default" not in text.lower():
                missing.append(f"{name} {'/'.join(action.option_strings)}: default {action.default!r} not stated")
    assert not missing, "\n".join(missing)
    assert "headprune" in subprocess_help(["--version"])


def subprocess_help(argv) -> str:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "headprune", *argv], capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr

