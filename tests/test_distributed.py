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
        part = batches[rank::WORLD]  # a per-rank loader's part (a DistributedSampler's): half left out
        errors["per_rank_part"] = _error(lambda: D.collect(model, part, progress=False))
        errors["per_rank_stream"] = _error(lambda: D.collect(model, iter(part), progress=False))
        errors["no_batches"] = _error(lambda: D.collect(model, None, progress=False))
        errors["fingerprint"] = _error(lambda: D.collect(model, batches, progress=False, fingerprint=3))
        errors["checkpoint_dir"] = _error(lambda: D.collect(model, batches, progress=False, checkpoint=out_dir))
        from headprune.hf import mask_heads

        with mask_heads(model, {0: [1]}):  # moments under a mask keep the weights before it, as one process's
            errors["unmasked_kept"] = D.collect(model, batches, progress=False, moments=True).moments.unmasked is not None
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


def test_ranks_refuse_other_batches_and_bad_arguments_and_keep_the_weights_before_a_mask(ranks):
    """A per-rank part of the batches was collected as if it were all of them (half the data,
    without a word); arguments one process refuses were taken (a fingerprint of 3, a checkpoint
    path that is a directory) or failed without naming one; moments under a mask lost the
    weights before it, so a later refit could not tell the projection had changed."""
    _, results = ranks
    for r in results:
        e = r["errors"]
        for kind in ("per_rank_part", "per_rank_stream"):
            assert e[kind].startswith("ValueError: batches: ranks [1] passed other batches than rank 0 (rank 0: 3, "
                                      "rank 1: 2 batches); every rank passes all of the calibration batches"), e[kind]
        assert e["no_batches"].startswith("TypeError: batches: expected an iterable of batches"), e["no_batches"]
        assert e["fingerprint"] == "TypeError: fingerprint: expected a str or a dict, got int"
        assert "ValueError: checkpoint: " in e["checkpoint_dir"] and "is not a headprune checkpoint" in e["checkpoint_dir"]
        assert e["unmasked_kept"] is True

