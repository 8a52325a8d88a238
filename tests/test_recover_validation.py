"""Recovery with validation batches, stopped and resumed: what the checkpoint keeps."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import headprune  # noqa: E402
from headprune.hf.recover import recover  # noqa: E402
from test_recover import _same, _state  # noqa: E402


def test_a_call_that_ends_off_the_validation_schedule_resumes_exactly(tmp_path):
    """A call ending on a step the schedule does not measure (its steps or its time budget) is
    measured for its own result; that measurement stays out of the checkpoint, so going on
    from it keeps what one uninterrupted run keeps (here the closing step 5 is the best seen,
    and was kept in the resumed run too)."""
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=64)
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger weights: the heads matter, pruning costs something
        for n, q in teacher.named_parameters():
            if q.dim() == 2 and "embed" not in n:
                q.mul_(3)
    pruned = copy.deepcopy(teacher)
    headprune.prune_heads(pruned, {0: [0, 1], 1: [2, 3]})

    def batch(seed):
        ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        for b in range(1, 3):
            mask[b, 9 - 2 * b:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    train, kw = [batch(0), batch(1)], {"lr": 0.02, "validation": [batch(2)], "validate_every": 4}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = copy.deepcopy(pruned)
        expected = recover(whole, teacher, train, steps=8, **kw)
        first, path = copy.deepcopy(pruned), tmp_path / "recover.ckpt"
        stopped = recover(first, teacher, train, steps=5, checkpoint=path, **kw)
        resumed = copy.deepcopy(pruned)
        report = recover(resumed, teacher, train, steps=8, checkpoint=path, resume=True, **kw)
    finally:
        torch.set_num_threads(threads)
    assert stopped.best_step == 5  # the first call's own result takes its closing measurement
    assert (report.best_step, report.validation_loss_best) == (expected.best_step, expected.validation_loss_best)
    assert _same(_state(whole), _state(resumed))


def test_the_gap_closed_is_said_only_where_pruning_lost_something():
    """Where pruning did not make the metric worse there is no gap: a held-out perplexity of
    134.4 unpruned, 134.3 pruned, 134.7 recovered was reported as 982% of the gap closed."""
    from headprune.app.recover_command import quality_table

    def table(metric, unpruned, pruned, recovered):
        row = {"unpruned": unpruned, "pruned": pruned, "recovered": recovered}
        return quality_table({"metric": metric, "quality": {"held_out": row}}).splitlines()[-1]

    assert table("perplexity", 134.4, 134.3, 134.7).endswith("| n/a |")
    assert table("perplexity", 20.0, 30.0, 25.0).endswith("| 50% |")
    assert table("fidelity", 1.0, 0.9, 0.95).endswith("| 50% |")
    assert table("fidelity", 1.0, 0.9, 0.85).endswith("| -50% |")  # recovery that made it worse says so
    assert table("fidelity", 0.98, 0.99, 0.97).endswith("| n/a |")
    # a recovered fidelity of 0.999996 read as the unpruned model's 1 at four digits
    assert table("fidelity", 1.0, 0.9, 0.999996).startswith("| held-out text | 1 | 0.9 | 0.999996 |")


def _fewer_steps_than_held(run, rec, ckpt, out):
    """Fewer steps than the checkpoint holds: refused by flag before any model loads (it was
    refused as ``steps`` after both models loaded and were evaluated, advising a resume option
    recover does not have)."""
    import headprune.app.recover_command as R

    with pytest.MonkeyPatch.context() as mp:
        for where in (R, __import__("headprune.app.inputs", fromlist=["inputs"])):  # the pruned model, the teacher
            mp.setattr(where, "load_model", lambda *a, **k: pytest.fail("a model loaded first"))
        code, err = run([*rec, "--steps", "3", "--checkpoint", ckpt, "--out", out])
    assert code == 2 and err[-1].endswith(f"--steps: 3 is fewer than the 4 steps --checkpoint {ckpt} already holds (a "
                                          "recovery goes on from its checkpoint); ask for at least as many, or pass "
                                          "another --checkpoint to start anew")
