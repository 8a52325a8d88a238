"""Counts, steps and seeds of the Python API take numpy and 0-d tensor integers as the ints they
are (``recover(steps=np.int64(3))`` was refused as "expected a positive int", while ratios and
head indices took them), and still refuse bools, floats and non-positive values by name."""

import numpy as np
import pytest
import torch

import headprune
from headprune.hf.generated import generated_batches
from test_api_inputs import _batches, _bert, _llama, _same, _state

INTS = (np.int64(2), np.int32(2), torch.tensor(2))
BAD = (True, 2.0, np.float64(2.0), 0, torch.tensor([2]))


@pytest.mark.parametrize("arg", ["steps", "checkpoint_every", "validate_every"])
def test_recover_takes_integer_types(tmp_path, arg):
    teacher, batches = _llama(), _batches(3)
    pruned = _llama()
    headprune.prune_heads(pruned, {0: [1], 1: [2]})
    base = {"steps": 2, "lr": 1e-3, "validation": batches[2:], "checkpoint": str(tmp_path / "c.pt")}
    if arg == "validate_every":
        base["validate_every"] = 2
    if arg == "checkpoint_every":
        base["checkpoint_every"] = 2
    want = _state(pruned)
    headprune.recover(pruned, teacher, batches[:2], **base)
    want, pruned = _state(pruned), _llama()
    headprune.prune_heads(pruned, {0: [1], 1: [2]})
    start = _state(pruned)
    for value in INTS:
        (tmp_path / "c.pt").unlink(missing_ok=True)
        headprune.prune_heads(student := _llama(), {0: [1], 1: [2]})
        report = headprune.recover(student, teacher, batches[:2], **{**base, arg: value})
        assert _same(student, want) and type(report.steps) is int
    for bad in BAD:
        with pytest.raises(ValueError, match=f"{arg}: expected a positive int"):
            headprune.recover(pruned, teacher, batches[:2], **{**base, arg: bad})
        assert _same(pruned, start)


def test_learned_gates_take_integer_steps_and_seeds():
    batches = _batches(2)
    want = headprune.learn_gates(_bert(), batches, ratio=0.25, steps=2, seed=3)
    for steps, seed in zip(INTS, (np.int64(3), np.uint8(3), torch.tensor(3))):
        got = headprune.learn_gates(_bert(), batches, ratio=0.25, steps=steps, seed=seed)
        assert {**got.to_dict(), "seconds": 0} == {**want.to_dict(), "seconds": 0}
        assert type(got.to_dict()["seed"]) is int
    for name, bad in [("steps", 2.0), ("steps", True), ("seed", 3.0), ("seed", -1), ("seed", True)]:
        with pytest.raises(ValueError, match=f"{name}: expected"):
            headprune.learn_gates(_bert(), batches, ratio=0.25, **{"steps": 2, "seed": 3, name: bad})


def test_collection_iterative_selection_and_sampling_take_integer_types(tmp_path):
    batches = _batches(2)
    want = headprune.collect(_llama(), batches, checkpoint=str(tmp_path / "a.pt"), checkpoint_every=1)
    got = headprune.collect(_llama(), batches, checkpoint=str(tmp_path / "b.pt"), checkpoint_every=np.int64(1))
    assert torch.equal(got.stats, want.stats)
    with pytest.raises(ValueError, match="checkpoint_every: expected a positive int, got 1.0"):
        headprune.collect(_llama(), batches, checkpoint=str(tmp_path / "c.pt"), checkpoint_every=1.0)

    heads = headprune.select_iteratively(_llama(), batches, ratio=0.5, steps=2, protect_layers=[], progress=False)[0]
    assert headprune.select_iteratively(_llama(), batches, ratio=0.5, steps=np.int64(2), protect_layers=[],
                                        progress=False)[0] == heads
    with pytest.raises(ValueError, match="steps: expected a positive int or 'auto', got 2.0"):
        headprune.select_iteratively(_llama(), batches, ratio=0.5, steps=2.0)

    model = _llama()
    plain = generated_batches(model, samples=2, seq_len=5, batch_size=2, seed=1, start=0)
    typed = generated_batches(model, samples=np.int64(2), seq_len=torch.tensor(5), batch_size=np.int32(2),
                              seed=np.int64(1), start=0)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(plain, typed) for k in a)
    assert generated_batches(model, samples=2, seq_len=5, batch_size=2, seed=-1, start=0)  # as manual_seed takes
    for name, bad in [("samples", 2.5), ("seed", 2**64), ("seed", 1.0)]:
        with pytest.raises(ValueError, match=f"{name}: expected"):
            generated_batches(model, **{"samples": 2, "seq_len": 5, "seed": 1, "start": 0, name: bad})
