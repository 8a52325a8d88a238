"""The command line and the rank files under torchrun, without a process group of several
processes: what a run of another number of processes left, errors in one line, and the backend
and device a rank joins with."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hf_tiny import tiny_model

from headprune import distributed as D

from test_distributed import _batches, _free_port

def test_a_resume_of_another_number_of_processes_is_refused_and_its_files_go_when_done(tmp_path):
    """The rank files carry the world size in their names, so a resume with another number of
    processes found no checkpoint, collected everything again without a word, and left the old
    files behind for good."""
    from headprune.app import commands

    base = tmp_path / ".o.checkpoint.json"
    old = [tmp_path / f".o.checkpoint.rank{r}-of-2.json" for r in range(2)]
    for p in old:
        p.write_text("{}")
    (tmp_path / ".other.checkpoint.rank0-of-2.json").write_text("{}")  # another output's: not this one's
    assert D.written_by_other_runs(base, None) == [str(p) for p in old]
    assert D.written_by_other_runs(base, 2) == []
    with pytest.raises(ValueError, match=r"checkpoint: .*rank0-of-2.json \(and \.o\.checkpoint\.rank1-of-2\.json\) "
                                         r"were written by a run of 2 processes in a process group \(torchrun\), and this one is a run of one process without a "
                                         r"process group; resume as that run was launched"):
        D.collect(tiny_model("llama"), _batches(), checkpoint=base, resume=True, progress=False)
    for p in old:
        p.unlink()
    base.write_text("{}")  # a one-process run's file, seen from a run of 3
    with pytest.raises(ValueError, match=r"\.o\.checkpoint\.json was written by a run of one process without a process "
                                         r"group, and this one is a run of 3 processes in a process group"):
        D.refuse_other_runs(base, 3)
    with pytest.raises(ValueError, match=r"written by a run of one process without a process group, and this one "
                                         r"is a run of 1 process in a process group \(torchrun\)"):
        D.refuse_other_runs(base, 1)  # a group of one process reads rank files, not this one's file
    for p in old:
        p.write_text("{}")
    for r in range(2):  # a run of 3 started over, interrupted in its turn: its own files resume
        (tmp_path / f".o.checkpoint.rank{r}-of-3.json").write_text("{}")
    D.refuse_other_runs(base, 3)
    with pytest.raises(ValueError, match=r"checkpoint: .*\.o\.checkpoint\.json \(and \.o\.checkpoint\.rank0-of-2\.json, "
                                         r"\.o\.checkpoint\.rank0-of-3\.json, \.o\.checkpoint\.rank1-of-2\.json, "
                                         r"\.o\.checkpoint\.rank1-of-3\.json\) were written by runs of other numbers of "
                                         r"processes, and this one is a run of 4 processes .*; resume as that run was "
                                         r"launched, or delete them to start over"):
        D.refuse_other_runs(base, 4)  # every file another run wrote is named
    commands._remove_checkpoints(base)  # a run that started over and succeeded
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.checkpoint.rank0-of-2.json"]


def test_scan_resume_refuses_the_rank_files_of_a_distributed_run(tmp_path, monkeypatch, capsys):
    """The command line's one-process collection looked for its own file only."""
    from hf_tiny import save_tiny_bert

    from headprune.app.cli import main

    save_tiny_bert(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".o.checkpoint.rank1-of-2.json").write_text("{}")
    argv = ["scan", str(tmp_path / "bert"), "--samples", "4", "--seq-len", "16", "--quiet", "--out", "o"]
    assert main(argv + ["--resume"]) == 2
    assert "rank1-of-2.json was written by a run of 2 processes in a process group (torchrun), and this one is a " \
           "run of one process without a process group" in \
        capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(argv) == 0  # started over: the old run's file goes with the new run's
    assert not list(tmp_path.glob(".o.checkpoint*"))


def test_a_failed_rank_raises_its_own_error_when_the_others_cannot_be_reached(monkeypatch):
    """The collective that tells the ranks of a failure timed out while the others were still
    collecting, and its timeout replaced the failed rank's error: no rank showed the cause."""
    monkeypatch.setattr(D.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(D.dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(D, "_device", lambda group: "cpu")

    def timeout(tensor, group=None):
        raise RuntimeError("Timed out waiting 5000ms for send operation to complete")

    monkeypatch.setattr(D.dist, "all_reduce", timeout)
    cause = ValueError("batches: a batch needs input_ids")
    with pytest.raises(ValueError, match="a batch needs input_ids") as e:
        D._raise_if_any_failed(cause, None)
    assert e.value is cause and "Timed out" in str(e.value.__cause__)
    own = OSError("checkpoint.json: unreadable")
    try:
        raise ValueError("checkpoint: cannot read it") from own
    except ValueError as caught:
        chained = caught
    with pytest.raises(ValueError, match="cannot read it") as e:  # its own cause stays, the timeout is noted
        D._raise_if_any_failed(chained, None)
    assert e.value.__cause__ is own and "could not be told: RuntimeError: Timed out" in e.value.__notes__[0]
    with pytest.raises(D.RanksFailed, match=r"^collect: the ranks could not tell each other whether any failed "
                                            r"\(RuntimeError: Timed out .*\); a rank failed or left: see its error"):
        D._raise_if_any_failed(None, None)


def test_the_command_line_reports_another_ranks_failure_as_an_error(tmp_path, monkeypatch, capsys):
    """The ranks that did not fail ended with a Python traceback of RuntimeError."""
    from hf_tiny import save_tiny_bert

    from headprune.app.cli import main

    def failed(*args, **kwargs):
        raise D.RanksFailed("collect: ranks [1] failed (see their errors); this rank stops too")

    save_tiny_bert(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "collect", failed)
    assert main(["scan", str(tmp_path / "bert"), "--samples", "4", "--seq-len", "16", "--quiet", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip() == ("headprune scan: error: collect: ranks [1] failed (see their errors); "
                                               "this rank stops too")
    assert not (tmp_path / "o").exists()
    kept = tmp_path / ".o.checkpoint.json"  # the batches this process collected before the others failed
    kept.write_text("{}")
    assert main(["scan", str(tmp_path / "bert"), "--samples", "4", "--seq-len", "16", "--quiet", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"this rank stops too; the checkpoint {kept} keeps the batches "
                                                    "done: run again with --resume to continue")


def test_the_command_line_names_a_partial_torchrun_environment_in_one_line(tmp_path, monkeypatch, capsys):
    """RANK set without the rest of torchrun's variables ended in a traceback (a RuntimeError)."""
    from hf_tiny import save_tiny_bert

    from headprune.app.cli import main

    save_tiny_bert(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    code = main(["scan", str(tmp_path / "bert"), "--samples", "4", "--seq-len", "16", "--quiet", "--distributed",
                 "--out", "o"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--distributed: environment variables" in err[0], err
    assert not (tmp_path / "o").exists()
    import headprune.app.commands as C

    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("loaded before --distributed was checked"))
    for env in ({"RANK": "0"}, {}):  # a partial environment, or none: refused before the model loads
        monkeypatch.delenv("RANK", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        code = main(["scan", str(tmp_path / "bert"), "--quiet", "--distributed", "--out", "o"])
        assert code == 2 and "--distributed: " in capsys.readouterr().err


@pytest.mark.parametrize("device, rank, backend, gpu", [("cpu", 1, "gloo", None), ("cuda", 1, "nccl", "cuda:1"),
                                                        ("cuda:0", 1, "nccl", "cuda:0")])
def test_the_command_line_joins_with_the_backend_of_its_device_before_the_model_loads(
        tmp_path, monkeypatch, device, rank, backend, gpu):
    """--distributed joined with NCCL wherever CUDA was available (a CPU run on a GPU host too)
    and set each rank's GPU after the model had loaded onto --device (a bare cuda: every rank on
    the first GPU)."""
    from hf_tiny import save_tiny_bert

    import headprune.app.commands as C
    from headprune.app.cli import main

    save_tiny_bert(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    for k, v in dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29999").items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init(backend=None, **kw):
        calls.append(("init", backend))
        raise ValueError("stop")

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("loaded before the process group"))
    assert main(["scan", "bert", "--quiet", "--distributed", "--device", device, "--out", "o"]) == 2
    assert calls == ([("set_device", gpu)] if gpu else []) + [("init", backend)]
    if device == "cuda:0":  # two ranks on this node, one GPU named for both: refused before joining
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        calls.clear()
        assert main(["scan", "bert", "--quiet", "--distributed", "--device", device, "--out", "o"]) == 2
        assert calls == []


def _prune_rank(rank, port, model_dir, out, world):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from headprune.app.cli import main

    code = main(["prune", model_dir, "--ratio", "0.25", "--samples", "8", "--seq-len", "16", "--no-speed", "--quiet",
                 "--distributed", "--out", out])
    if dist.is_initialized():
        dist.destroy_process_group()
    assert code == 0


def test_prune_distributed_prunes_as_one_process(tmp_path, monkeypatch):
    """Under --distributed every rank chose the heads (training learned gates, measuring, each
    writing the same checkpoint files), and an encoder's default lost its measured allocation and
    value refit, so the pruned model differed from one process's without a word: the writing rank
    now chooses on every calibration batch, as one process does."""
    import json
    import socket

    import torch.multiprocessing as mp
    from hf_tiny import save_tiny_bert
    from safetensors.torch import load_file

    from headprune.app.cli import main

    pytest.importorskip("torch.distributed")
    if not dist.is_gloo_available():
        pytest.skip("no gloo")
    save_tiny_bert(tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    assert main(["prune", str(tmp_path / "bert"), "--ratio", "0.25", "--samples", "8", "--seq-len", "16", "--no-speed",
                 "--quiet", "--out", "one"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_prune_rank, args=(port, str(tmp_path / "bert"), str(tmp_path / "two"), 2), nprocs=2, join=True)
    reports = [json.loads((tmp_path / d / "report.json").read_text())["settings"] for d in ("one", "two")]
    assert [(r["scope"], r["refit_values"]) for r in reports] == [("measured", True)] * 2
    assert "distributed" not in reports[0] and reports[1]["distributed"] == 2  # the processes it ran on
    one, two = (load_file(tmp_path / d / "model" / "headprune-model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:  # the moments are summed in another order: equal up to float64 rounding, refit in float64
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_torchrun_without_distributed_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """Every process ran the whole command, and all but the first failed on a non-empty --out."""
    import headprune.app.commands as C
    from headprune.app.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(C, "load_model", lambda *a, **k: pytest.fail("loaded"))
    for command in (["scan", "bert"], ["prune", "bert", "--ratio", "0.3"], ["sweep", "bert"]):
        assert main([*command, "--quiet", "--out", str(tmp_path / "o")]) == 2
        assert capsys.readouterr().err.strip().endswith("--distributed: launched by torchrun (2 processes) without "
                                                        "it; pass --distributed, or run one process")
    for command in (["eval", "bert"], ["recover", "d", "--steps", "1", "--out", str(tmp_path / "o")],
                    ["export", "d", "--gguf", str(tmp_path / "o.gguf")]):
        assert main(command) == 2
        assert capsys.readouterr().err.strip().endswith(f"headprune {command[0]} runs in one process, and torchrun "
                                                        "launched 2; run one process")


def test_a_line_is_said_in_one_write(monkeypatch):
    """Each rank printed its 'rank i/N: ' prefix and its line in separate writes, which other
    ranks' lines came between."""
    import sys
    from argparse import Namespace

    import headprune.app.commands as C

    writes = []

    class Out:
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Out())
    C._say(Namespace(quiet=False), "rank 1/2:", "collected entropies")
    assert writes == ["rank 1/2: collected entropies\n"]


def test_the_number_of_processes_in_the_settings_leaves_a_checkpoint_resumable():
    """A --distributed run's settings record its processes; a checkpoint written before they did
    (without the key) was refused on --resume as written with other settings."""
    import argparse

    import torch

    from headprune.app.fingerprints import collection_fingerprint

    args = argparse.Namespace(model="m", batch_size=8)
    batches = [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]
    settings = {"data": "t", "samples": 1, "calibration_tokens": 4}
    assert (collection_fingerprint(args, batches, settings)
            == collection_fingerprint(args, batches, {**settings, "distributed": 2}))
    assert collection_fingerprint(args, batches, settings) != collection_fingerprint(args, batches, {**settings,
                                                                                                   "samples": 2})


def test_warnings_are_said_by_the_writing_rank_only(monkeypatch, capsys):
    """Every rank of a --distributed run printed the same warnings (the short text, --eval-paragraphs
    above the held-out paragraphs), as many times as there were processes."""
    import headprune.app.commands as C
    import headprune.distributed as D

    monkeypatch.setattr(D, "rank_world", lambda group=None: (1, 2))
    C._warn("the held-out text is short")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(D, "rank_world", lambda group=None: (0, 2))
    C._warn("the held-out text is short")
    assert capsys.readouterr().err == "headprune: warning: the held-out text is short\n"
    # before the group is joined (a warning about --data's text): torchrun's RANK says which; a
    # stray RANK without torchrun's WORLD_SIZE is a process of its own, which says everything
    monkeypatch.setattr(D, "rank_world", lambda group=None: (0, 1))
    for world, rank, said in (("2", "1", ""), ("2", "0", "x"), ("", "1", "x"), ("1", "1", "x"), ("2", "a", "x")):
        monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.setenv("RANK", rank)
        C._warn("x")
        assert capsys.readouterr().err == (f"headprune: warning: {said}\n" if said else "")


_LEGACY_SCAN = """
import os, sys
from headprune.app import fingerprints
from headprune.app.cli import main
from headprune.hf.checkpoint import Checkpoint
argv = ["scan", "m", "--samples", "4", "--seq-len", "16", "--batch-size", "2", "--quiet", "--out", "o",
        "--distributed", "--device", "cpu:0"]
if sys.argv[1] == "write":  # as an earlier release wrote it (names and device as given), interrupted after a save
    now = fingerprints.collection_fingerprint
    fingerprints.collection_fingerprint = lambda *a, legacy=None: now(*a, legacy="as given")
    real = Checkpoint.save
    def save(self, *a):
        real(self, *a)
        raise KeyboardInterrupt
    Checkpoint.save = save
    sys.exit(main(argv))
sys.exit(main(argv + ["--resume"]))
"""


def test_a_rank_file_an_earlier_release_wrote_still_resumes(tmp_path):
    """The earlier form of the fingerprint was looked for in the base checkpoint, which a
    --distributed run does not write: its rank files, which hold the fingerprint as their
    settings, were refused (model m against its real path, cpu:0 against cpu)."""
    import subprocess
    import sys

    from hf_tiny import save_tiny_bert

    save_tiny_bert(tmp_path / "m")
    (tmp_path / "legacy.py").write_text(_LEGACY_SCAN)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"), os.environ.get("PYTHONPATH", "")])}
    for phase, want in (("write", 130), ("resume", 0)):
        done = subprocess.run([sys.executable, "legacy.py", phase], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == want, (phase, done.stderr[-2000:])
    assert (tmp_path / "o" / "scores.json").exists()
