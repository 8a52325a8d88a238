"""``headprune sweep --resume``: an interrupted sweep goes on from the points its journal holds,
and finishes as an uninterrupted sweep does; a journal of other settings, of another format or
that is no journal is refused before the collection, naming what differs."""

import json

import pytest

from headprune.app.cli import main

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_cli import tiny_dir  # noqa: E402,F401  (fixture)

ARGS = ["--samples", "4", "--seq-len", "16", "--quiet", "--ratios", "0.2,0.4", "--seeds", "2"]


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """``main(argv)`` in ``tmp_path`` -> (exit code, stderr as one text; stdout with ``stdout=True``)."""
    monkeypatch.chdir(tmp_path)

    def call(argv, stdout=False):
        code = cli_main(argv)
        seen = capsys.readouterr()
        return code, (seen.out if stdout else seen.err)

    return call


def cli_main(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _count_points(monkeypatch, stop_at=None):
    """Counts the evaluated points (a recipe's, or one random draw's); ``KeyboardInterrupt`` at
    the ``stop_at``-th."""
    import headprune.app.sweep as S

    real, calls = S._Evaluator.__call__, []

    def counted(self, *a, **k):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(S._Evaluator, "__call__", counted)
    return calls


def _result(path):
    result = json.loads((path / "sweep.json").read_text())
    for v in (result.get("measured_allocation") or {}).values():  # the time a measurement took
        v.pop("seconds")
    return result


def test_an_interrupted_sweep_resumes_and_finishes_as_an_uninterrupted_one(run, tmp_path, tiny_dir, monkeypatch):
    from headprune.app.sweep_journal import journal_path

    calls = _count_points(monkeypatch)
    code, err = run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "whole"])
    assert code == 0, err
    total = len(calls)
    assert not journal_path(tmp_path / "whole").exists()  # removed once the output is written

    stop = total // 2 + 1
    calls = _count_points(monkeypatch, stop_at=stop)
    code, err = run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o"])
    journal = journal_path(tmp_path / "o")
    assert code == 130 and not (tmp_path / "o").exists()
    assert f"the sweep journal {journal} keeps the points measured: run again with --resume" in err, err
    held = json.loads(journal.read_text())
    assert sum(map(len, held["points"].values())) + 2 * len(held["random"]) == stop - 1  # every point before it

    calls = _count_points(monkeypatch)
    code, err = run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o", "--resume"])
    assert code == 0, err
    assert len(calls) == total - (stop - 1)  # only the points the journal did not hold
    assert _result(tmp_path / "o") == _result(tmp_path / "whole")
    assert not journal.exists()


def test_resume_refuses_a_journal_of_other_settings_before_collecting(run, tmp_path, tiny_dir, monkeypatch):
    import sys

    from headprune.app.sweep_journal import journal_path

    _count_points(monkeypatch, stop_at=2)
    assert run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o"])[0] == 130
    journal = journal_path(tmp_path / "o")
    before = journal.read_text()
    hc = sys.modules["headprune.hf.collect"]  # what the command calls (through distributed.collect)
    monkeypatch.setattr(hc, "collect", lambda *a, **k: pytest.fail("collected before refusing the journal"))
    args = [a if a != "2" else "3" for a in ARGS]  # --seeds 3
    code, err = run(["sweep", tiny_dir, *args, "--out", tmp_path / "o", "--resume"])
    assert code == 2
    assert f"--resume: the sweep journal {journal} was written with other settings (sweep.seeds: 2 in the journal, " \
           "3 now); run without --resume to start anew" in err, err
    assert journal.read_text() == before  # left as it was

    journal.write_text(json.dumps({**json.loads(before), "format": "headprune.sweep-journal/0"}))
    code, err = run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o", "--resume"])
    assert code == 2 and "was written by another headprune (format 'headprune.sweep-journal/0'" in err, err

    journal.write_text(json.dumps({**json.loads(before), "points": {"0.2": {"default": {"value": 1.0}}}}))
    code, err = run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o", "--resume"])
    assert code == 2 and f"the sweep journal {journal} is corrupt (KeyError: 'heads')" in err, err


def test_a_file_that_is_no_journal_is_never_written_over(run, tmp_path, tiny_dir):
    from headprune.app.sweep_journal import journal_path

    path = journal_path(tmp_path / "o")
    path.write_text("notes\n")
    for resume in ([], ["--resume"]):
        code, err = run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o", *resume])
        assert code == 2 and f"--out: {path} exists and is not a headprune sweep checkpoint" in err, err
        assert path.read_text() == "notes\n"


def test_a_sweep_without_resume_says_it_starts_anew(run, tmp_path, tiny_dir, monkeypatch):
    from headprune.app.sweep_journal import journal_path

    _count_points(monkeypatch, stop_at=3)
    assert run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o"])[0] == 130
    calls = _count_points(monkeypatch)
    code, err = run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o"])
    assert code == 0, err
    path = journal_path(tmp_path / "o")
    assert f"{path} holds the points of an interrupted sweep into {tmp_path / 'o'}; this run starts anew" in err, err
    assert len(calls) > 2 and not path.exists()


def test_a_resume_without_a_journal_starts_anew(run, tmp_path, tiny_dir):
    from headprune.app.sweep_journal import journal_path

    args = [a for a in ARGS if a != "--quiet"]
    code, out = run(["sweep", tiny_dir, *args, "--out", tmp_path / "o", "--resume"], stdout=True)
    assert code == 0
    assert f"headprune: no points in {journal_path(tmp_path / 'o')} to resume from: the sweep starts anew" in out, out
    assert (tmp_path / "o" / "sweep.json").exists()


def test_the_journal_keeps_what_json_cannot_write_as_a_number(tmp_path):
    from headprune.app.sweep_journal import SweepJournal

    path = tmp_path / ".o.sweep-journal.json"
    journal = SweepJournal(path, {"a": 1})
    state = {}
    journal.record(0.3, "r", {1: [2, 0]}, float("inf"), state)
    journal.record_random(0.3, [float("nan"), 2.5], [3, 3])
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    again = SweepJournal(path, {"a": 1}, resume=True)
    assert again.resumed == 2
    assert again.replay(0.3, "r", state) == ({1: [0, 2]}, float("inf"))
    values, heads = again.replay_random(0.3)
    assert values[0] != values[0] and values[1] == 2.5 and heads == [3, 3]
    assert again.replay(0.5, "r", state) is None and again.replay_random(0.5) is None


def test_a_resumed_library_sweep_keeps_learned_and_measured_records(tmp_path, monkeypatch):
    """``run_sweep(journal=)``: the points of a journal are not trained or measured again, and
    the result keeps their learned-gate and measured-allocation records."""
    import headprune.app.sweep as S
    from hf_tiny import tiny_batch, tiny_model

    from headprune.app.load import Loaded
    from headprune.app.sweep_journal import SweepJournal
    from headprune.hf import collect

    model = tiny_model("llama", num_hidden_layers=3)
    batches = [tiny_batch("llama", seed=i, pad=False) for i in range(3)]
    scores = collect(model, batches, progress=False, moments=True)
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})
    recipes = {**{k: {**kw, "learned": {"steps": 2}} for k, kw in S.LEARNED_RECIPE.items()},
               "measured": {"scope": "measured"}}
    config = S.SweepConfig(model="tiny", ratios=[0.25, 0.5], seeds=1, gqa="query", quiet=True, eval_windows=1)
    loaded = Loaded(model, None, "causal", "tiny")
    path = tmp_path / "journal.json"
    first = S.run_sweep(config, loaded, scores, [], {"data": "x"}, recipes, batches=batches,
                        journal=SweepJournal(path, {"x": 1}))
    monkeypatch.setattr(S, "learned_scores", lambda *a: pytest.fail("trained again"))
    import headprune.hf.allocation as A

    monkeypatch.setattr(A, "select_measured", lambda *a, **k: pytest.fail("measured again"))
    journal = SweepJournal(path, {"x": 1}, resume=True)
    assert journal.resumed == 2 * len(recipes) + 2
    again = S.run_sweep(config, loaded, scores, [], {"data": "x"}, recipes, batches=batches, journal=journal)
    assert again == first and set(again["learned"]) == set(S.LEARNED_RECIPE)
    assert set(again["measured_allocation"]) == {"measured"}


def _weights_sum(loaded, *a, **k):
    return {"perplexity": float(sum(p.detach().double().square().sum() for p in loaded.model.parameters()))}


def test_an_iterative_recipe_resumes_by_measuring_its_rounds_again(tmp_path, monkeypatch):
    """An iterative recipe's round at one fraction starts from the heads and statistics of the
    one before, so its points are never taken from the journal; and a library sweep without a
    journal measures a repeated fraction again, as before journals."""
    import headprune.app.sweep as S
    from hf_tiny import tiny_batch, tiny_model

    from headprune.app.load import Loaded
    from headprune.app.sweep_journal import SweepJournal
    from headprune.hf import collect

    model = tiny_model("llama", num_hidden_layers=3)
    batches = [tiny_batch("llama", seed=i, pad=False) for i in range(3)]
    scores = collect(model, batches, progress=False, moments=True)
    loaded = Loaded(model, None, "causal", "tiny")
    monkeypatch.setattr(S, "quality", _weights_sum)  # what the masked model is
    recipes = {"default": {}, "it": {"iterative": True}}
    config = S.SweepConfig(model="tiny", ratios=[0.25, 0.5], seeds=1, gqa="query", quiet=True, eval_windows=1)

    def sweep(journal=None, ratios=None):
        cfg = config if ratios is None else S.SweepConfig(**{**vars(config), "ratios": ratios})
        return S.run_sweep(cfg, loaded, scores, [], {"data": "x"}, recipes, batches=batches, journal=journal)

    whole = sweep()
    calls = _count_points(monkeypatch, stop_at=5)  # the unpruned model, then 0.25's three points; stops at 0.5's
    with pytest.raises(KeyboardInterrupt):
        sweep(SweepJournal(tmp_path / "j.json", {"x": 1}))
    monkeypatch.undo()
    monkeypatch.setattr(S, "quality", _weights_sum)
    assert sweep(SweepJournal(tmp_path / "j.json", {"x": 1}, resume=True)) == whole
    calls = _count_points(monkeypatch)
    sweep(ratios=[0.25, 0.25])
    assert len(calls) == 2 * (len(recipes) + 1)  # every point of both, the draws' included


def test_a_tokenizer_that_reads_the_held_out_text_otherwise_is_another_sweep():
    from types import SimpleNamespace

    from hf_tiny import tiny_model

    from headprune.app.fingerprints import collection_fingerprint
    from headprune.app.sweep import SweepConfig
    from headprune.app.sweep_journal import sweep_fingerprint

    model = tiny_model("bert")
    config = SweepConfig(model="m", ratios=[0.5])

    def fingerprint(split, held=("a b", "c d"), device="cpu", **kw):
        def tok(texts, verbose=True):  # quiet: a paragraph longer than the model's positions is no error here
            assert verbose is False
            return {"input_ids": [[len(w) for w in split(t)] for t in texts]}

        collection = collection_fingerprint(SimpleNamespace(model="m", batch_size=8), [], {"device": device})
        return sweep_fingerprint(collection, SimpleNamespace(model=model, tokenizer=tok, kind="encoder"),
                                 list(held), SweepConfig(**{**vars(config), **kw}), {})

    words = fingerprint(str.split)
    assert fingerprint(str.split) == words
    assert fingerprint(list)["held_out"] != words["held_out"]  # characters, not words
    assert fingerprint(str.split, held=("a b", "c e"))["held_out"] != words["held_out"]
    # settings as they apply: all paragraphs however many are asked; an encoder's windows; the value refit resolved
    assert fingerprint(str.split, eval_paragraphs=100) == words
    assert fingerprint(str.split, eval_windows=3) == words
    assert fingerprint(str.split, values=True) == words  # BERT refits value rows by default
    assert fingerprint(str.split, values=False) != words
    # the ranks of a --distributed run compute on cuda:0, cuda:1, ...: one journal for them all (and cpu:0 is cpu)
    assert fingerprint(str.split, device="cuda:0") == fingerprint(str.split, device="cuda:1") != words
    assert fingerprint(str.split, device="cpu:0") == words


def test_what_a_run_says_of_the_journal_is_what_it_holds(run, tmp_path, tiny_dir, monkeypatch):
    """A run that started anew over another sweep's journal and stopped before its first point
    does not offer to resume from it; an error after some points does, as an interrupt does."""
    from headprune.app.sweep_journal import journal_path

    _count_points(monkeypatch, stop_at=3)
    assert run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o"])[0] == 130
    args = [a if a != "2" else "3" for a in ARGS]  # --seeds 3: another sweep
    _count_points(monkeypatch, stop_at=1)  # the unpruned model's evaluation
    code, err = run(["sweep", tiny_dir, *args, "--out", tmp_path / "o"])
    assert code == 130 and "this run starts anew" in err and "--resume to continue" not in err, err

    import headprune.app.sweep as S

    real, seen = S._Evaluator.__call__, []

    def failing(self, *a, **k):
        seen.append(1)
        if len(seen) == 4:
            raise ValueError("a recipe failed")
        return real(self, *a, **k)

    monkeypatch.setattr(S._Evaluator, "__call__", failing)
    code, err = run(["sweep", tiny_dir, *args, "--out", tmp_path / "o"])
    path = journal_path(tmp_path / "o")
    assert code == 2 and f"error: a recipe failed; the sweep journal {path} keeps the points measured: run again " \
                         "with --resume to continue" in err, err


def test_a_journal_that_cannot_be_written_is_said_once_and_the_sweep_goes_on(run, tmp_path, tiny_dir, monkeypatch):
    import errno

    import headprune.atomic as atomic

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_file", full)
    code, err = run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o"])
    assert code == 0 and (tmp_path / "o" / "sweep.json").exists()
    assert err.count("cannot be written (No space left on device); the sweep goes on") == 1, err


def _resume_rank(rank, port, model_dir, out):
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = main(["sweep", model_dir, *[a if a != "2" else "3" for a in ARGS], "--out", out, "--resume",
                 "--distributed"])
    if dist.is_initialized():
        dist.destroy_process_group()
    assert code == 2  # refused by every rank, none left waiting in the collection


def test_every_rank_refuses_a_journal_of_other_settings(run, tmp_path, tiny_dir, monkeypatch):
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo")
    _count_points(monkeypatch, stop_at=3)
    assert run(["sweep", tiny_dir, *ARGS, "--out", tmp_path / "o"])[0] == 130
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_resume_rank, args=(port, str(tiny_dir), str(tmp_path / "o")), nprocs=2, join=True)


def test_the_held_out_digest_is_taken_in_chunks_and_stays_as_it_was(tiny_dir):  # noqa: F811
    """The held-out text's digest tokenized every paragraph in one call (a long text's ids take
    many times its size); taken a chunk at a time it is the same digest, so a journal written
    before still resumes."""
    import hashlib

    import transformers

    from headprune.app import texts
    from headprune.app.sweep_journal import _text_digest

    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    paragraphs = texts.load_paragraphs("python_tutorial")[:50]
    ids = tok(paragraphs, verbose=False)["input_ids"]
    want = hashlib.sha256(json.dumps([paragraphs, ids], default=str).encode()).hexdigest()[:16]
    assert _text_digest(tok, paragraphs, chunk=7) == _text_digest(tok, paragraphs) == want
    assert _text_digest(tok, []) == hashlib.sha256(json.dumps([[], []]).encode()).hexdigest()[:16]


def test_a_journal_written_with_the_names_as_given_still_resumes(run, tmp_path, tiny_dir, monkeypatch):  # noqa: F811
    """Earlier releases fingerprinted a journal's model as given (a relative path) and its device
    by type (cpu:0 as cpu); such a journal resumes where the same names are given again."""
    import shutil

    from headprune.app import fingerprints

    shutil.copytree(tiny_dir, tmp_path / "m")
    now = fingerprints.collection_fingerprint
    with monkeypatch.context() as m:  # written as an earlier release wrote it
        m.setattr(fingerprints, "collection_fingerprint", lambda *a, legacy=None: now(*a, legacy="device by type"))
        _count_points(m, stop_at=2)
        assert run(["sweep", "m", *ARGS, "--device", "cpu:0", "--out", tmp_path / "o"])[0] == 130
    code, err = run(["sweep", "m", *ARGS, "--device", "cpu:0", "--out", tmp_path / "o", "--resume"])
    assert code == 0, err  # a journal of other settings is refused (2)
