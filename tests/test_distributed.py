"""Data-parallel calibration: two gloo processes on loopback against one process."""

import copy
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_tiny import tiny_batch, tiny_model

from headprune import distributed as D
from headprune.hf import collect
from headprune.stats import HeadScores

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")

WORLD = 2
N = 5  # uneven shards: rank 0 gets batches 0, 2, 4 and rank 1 gets 1, 3


def _batches():
    return [tiny_batch("llama", seed=s, batch=2 + s % 2, seq=7 + s) for s in range(N)]


def _interrupted(batches, after):
    yield from batches[:after]
    raise KeyboardInterrupt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return None


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert D.init_from_env(timeout=timedelta(seconds=120)) and dist.get_backend() == "gloo"  # a bug fails, not hangs
    try:
        model, batches = tiny_model("llama"), _batches()
        out = {"manual": D.all_reduce_scores(collect(model, D.shard(batches), progress=False)),
               "collect": D.collect(model, batches, progress=False),
               "empty_shard": D.collect(model, batches[:1], progress=False)}
        D.collect(model, batches, progress=False, moments=True).moments.save(os.path.join(out_dir, f"moments{rank}.st"))
        # rank 1's shard is empty: its zeros must be reduced in the same type as rank 0's float32
        D.collect(model, batches[:1], progress=False, moments="float32").moments.save(
            os.path.join(out_dir, f"moments32_{rank}.st"))
        ckpt = os.path.join(out_dir, "scan.json")
        errors = {"interrupt": None}
        try:  # both ranks walk the same stream, so both stop after 4 batches (2 of each shard)
            D.collect(model, _interrupted(batches, 4), progress=False, checkpoint=ckpt, fingerprint="s")
        except KeyboardInterrupt:
            errors["interrupt"] = "KeyboardInterrupt"
        out["resumed"] = D.collect(model, batches, progress=False, checkpoint=ckpt, resume=True, fingerprint="s")
        other = tiny_model("llama", num_hidden_layers=3) if rank == 1 else model
        errors["layout"] = _error(lambda: D.all_reduce_scores(collect(other, batches[:1], progress=False)))
        errors["moments_dtype"] = _error(lambda: D.collect(model, batches, progress=False,
                                                           moments="float32" if rank == 1 else True))
        changed = copy.deepcopy(model)
        if rank == 1:  # the same layout, other weights
            with torch.no_grad():
                changed.layers[0].self_attn.o_proj.weight.mul_(2)
        errors["moments_weights"] = _error(lambda: D.all_reduce_scores(collect(changed, D.shard(batches), progress=False,
                                                                               moments=True)))  # as collected apart
        errors["weights"] = _error(lambda: D.collect(changed, batches, progress=False))  # no moments to compare
        bad = batches if rank == 0 else [batches[0], {"labels": torch.ones(1, 3)}]  # rank 1's shard: the 2nd
        errors["one_rank_fails"] = _error(lambda: D.collect(model, bad, progress=False))
        errors["nothing"] = _error(lambda: D.collect(model, [], progress=False))
        from headprune.hf import select_iteratively

        heads, _ = select_iteratively(model, batches, ratio=0.5, steps=3, collect_fn=D.collect, compensate=True, protect_layers=[])
        result = {k: v.to_dict() for k, v in out.items()}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"scores": result, "errors": errors, "iterative": {str(k): v for k, v in heads.items()}}, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    for attempt in range(3):  # the free port can be taken between its choice and rank 0's bind
        try:
            mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
            break
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == 2:
                raise
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        r["scores"] = {k: HeadScores.from_dict(v) for k, v in r["scores"].items()}
    return out_dir, results


def _assert_matches(got: HeadScores, want: HeadScores):
    assert torch.equal(got.count, want.count)
    torch.testing.assert_close(got.stats, want.stats, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.outputs, want.outputs, rtol=1e-12, atol=0)
    assert got.names == want.names and got.num_heads == want.num_heads


def test_two_gloo_ranks_equal_one_process(ranks):
    _, results = ranks
    model, batches = tiny_model("llama"), _batches()
    single = collect(model, batches, progress=False)
    for r in results:
        _assert_matches(r["scores"]["manual"], single)
        assert torch.equal(r["scores"]["collect"].stats, r["scores"]["manual"].stats)
        assert torch.equal(r["scores"]["collect"].stats, results[0]["scores"]["collect"].stats)  # same on all ranks
        _assert_matches(r["scores"]["empty_shard"], collect(model, batches[:1], progress=False))


def test_second_moments_are_all_reduced(ranks):
    from headprune.stats import OutputMoments

    out_dir, _ = ranks
    single = collect(tiny_model("llama"), _batches(), progress=False, moments=True).moments
    for r in range(WORLD):
        got = OutputMoments.load(out_dir / f"moments{r}.st")
        for g, want in zip(got.gram, single.gram):
            torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-9)
        # which sequences they hold: every rank's, so a measured part of them is checked as one
        assert sorted(got.sequences.tolist()) == sorted(single.sequences.tolist()) and len(single.sequences) > 0


def test_float32_moments_with_an_empty_shard(ranks):
    from headprune.stats import OutputMoments

    out_dir, _ = ranks
    single = collect(tiny_model("llama"), _batches()[:1], progress=False, moments="float32").moments
    for r in range(WORLD):
        got = OutputMoments.load(out_dir / f"moments32_{r}.st")
        assert sorted(got.sequences.tolist()) == sorted(single.sequences.tolist())  # one rank's shard was empty
        for g, want in zip(got.gram, single.gram):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-5)


def test_distributed_resume_equals_the_uninterrupted_run(ranks):
    out_dir, results = ranks
    for r in results:
        assert r["errors"]["interrupt"] == "KeyboardInterrupt"
        assert torch.equal(r["scores"]["resumed"].stats, r["scores"]["collect"].stats)
    assert sorted(p.name for p in out_dir.glob("scan.*")) == ["scan.rank0-of-2.json", "scan.rank1-of-2.json"]
    state = json.loads((out_dir / "scan.rank1-of-2.json").read_text())
    fingerprint = json.loads(state["fingerprint"])
    assert state["batches_done"] == 2 and len(fingerprint.pop("weights and config")) == 16  # see test_resume
    assert fingerprint == {"settings": "s", "rank": 1, "world_size": 2}


def test_errors_reach_every_rank(ranks):
    _, results = ranks
    for rank, r in enumerate(results):
        e = r["errors"]
        assert e["layout"].startswith("ValueError: scores: ranks [1] collected a different head layout")
        assert e["nothing"] == "ValueError: batches: no attention call was recorded on any rank (empty iterable?)"
        assert e["moments_dtype"] == ("ValueError: moments: the ranks collected second moments in different float "
                                      "types; pass the same moments= on every rank")
        assert e["moments_weights"].startswith("ValueError: moments: ranks [1] collected under other output-projection")
        assert e["weights"] == ("ValueError: model: ranks [1] loaded other weights or another config than rank 0; "
                                "every rank must load the same model")
        if rank == 1:
            assert e["one_rank_fails"].startswith("ValueError: batches: a batch needs input_ids")
        else:
            assert e["one_rank_fails"] == ("RanksFailed: collect: ranks [1] failed (see their errors); "
                                           "this rank stops too")


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shard_is_a_round_robin_partition(world):
    items = list(range(10))
    shards = [D.shard(items, r, world) for r in range(world)]
    assert sorted(sum(shards, [])) == items
    assert all(s == items[r::world] for r, s in enumerate(shards))
    assert [list(D.shard(iter(items), r, world)) for r in range(world)] == shards  # lazy iterables too


def test_shard_checks_its_arguments():
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\)"):
        D.shard([1], 2, 2)
    with pytest.raises(ValueError, match="world_size: expected a positive int"):
        D.shard([1], 0, 0)
    with pytest.raises(TypeError, match="batches: expected an iterable of batches"):
        D.shard({"input_ids": torch.ones(1, 2)}, 0, 1)
    assert D.shard([1, 2, 3]) == [1, 2, 3]  # no process group: everything


def test_without_torchrun_nothing_is_initialised(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.init_from_env() is False and not dist.is_initialized()
    assert D.rank_world() == (0, 1)
    scores = collect(tiny_model("llama"), _batches()[:1], progress=False)
    assert D.all_reduce_scores(scores) is scores


def test_partial_torchrun_environment_is_named(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match=r"environment variables .*MASTER_PORT.* are not set; launch with torchrun"):
        D.init_from_env()  # a ValueError: the command line's one-line refusal (a RuntimeError printed a traceback)


def test_allow_empty_gives_zero_scores_of_the_model_layout():
    model = tiny_model("llama")
    empty = collect(model, [], progress=False, allow_empty=True)
    full = collect(model, _batches()[:1], progress=False)
    assert empty.names == full.names and empty.stats.shape == full.stats.shape and not empty.stats.any()
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    plain = collect(layer, iter([]), progress=False, allow_empty=True)
    assert plain.num_heads == [4] and not plain.stats.any()
    assert collect(layer, [torch.randn(2, 5, 16)], progress=False, allow_empty=True).count.sum() == 10 * 4


def test_rank_checkpoint_names():
    assert D.rank_checkpoint("out/scan.ckpt.json", 1, 4) == "out/scan.ckpt.rank1-of-4.json"
    assert D.rank_checkpoint("scan", 0, 2) == "scan.rank0-of-2"


def test_iterative_selection_is_collective_and_equals_one_process(ranks):
    from headprune.hf import select_iteratively

    _, results = ranks
    heads, _ = select_iteratively(tiny_model("llama"), _batches(), ratio=0.5, steps=3, compensate=True, protect_layers=[])
    want = {str(k): v for k, v in heads.items()}
    assert all(r["iterative"] == want for r in results)


def test_a_group_of_one_process_names_its_rank_checkpoint(tmp_path, capsys):
    """Under a process group of one process the collection writes the rank file
    (``.o.checkpoint.rank0-of-1.json``): ``scan --distributed`` left it behind when done, and
    an interrupted one gave no --resume hint. ``checkpoint_files`` names it for both."""
    from headprune.app import commands

    base = tmp_path / ".o.checkpoint.json"
    assert D.checkpoint_files(base) == [str(base)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rank_file = tmp_path / ".o.checkpoint.rank0-of-1.json"
        assert D.checkpoint_files(base) == [str(base), str(rank_file)]
        rank_file.write_text("{}")
        (tmp_path / (rank_file.name + ".moments-2.safetensors")).write_bytes(b"")

        class Args:
            command, out = "scan", str(tmp_path / "o")

        assert f"the checkpoint {rank_file} keeps the batches done" in commands.interrupted(Args())
        commands._remove_checkpoints(base)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    finally:
        dist.destroy_process_group()


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
