"""Recovery after pruning (:func:`headprune.hf.recover`): the distillation loss falls, only the
chosen parameters change, an interrupt leaves the student exactly as it was, a resumed run
equals an uninterrupted one bit for bit, and the recovered model saves and reloads exactly.

Tiny random models; the pruned student loses heads outright (no refit), so it has a gap to
close. Few steps each: a step costs tens of milliseconds here."""

import copy
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import tiny_batch, tiny_config, tiny_model  # noqa: E402

import headprune  # noqa: E402
from headprune.hf.recover import DEFAULT_LR, distillation_loss, recover, trainable_parameters  # noqa: E402

LR = 1e-2


def _grown(model):
    """Larger weights make the tiny model's heads matter, so removing them costs something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3)
    return model


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    teacher = _grown(transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval())
    student = copy.deepcopy(teacher)
    headprune.prune_heads(student, {0: [0, 1], 1: [2, 3]})
    return teacher, student, [tiny_batch("llama", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def bert():
    teacher = tiny_model("bert")
    student = copy.deepcopy(teacher)
    headprune.prune_heads(student, {0: [0, 1], 1: [1, 3]})
    return teacher, student, [tiny_batch("bert", seed=i) for i in range(3)]


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mean_loss(student, teacher, batches) -> float:
    with torch.no_grad():
        return sum(distillation_loss(student, teacher, b).item() for b in batches) / len(batches)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loss_falls_and_only_the_chosen_parameters_change(family, request):
    teacher, pruned, batches = request.getfixturevalue(family)
    student = copy.deepcopy(pruned)
    frozen_flag = next(p for n, p in student.named_parameters() if "embed" in n)
    frozen_flag.requires_grad_(False)  # a caller's flag: restored as it was
    before, teacher_before = _state(student), _state(teacher)
    loss_before = _mean_loss(student, teacher, batches)
    report = recover(student, teacher, batches, steps=6, lr=LR)
    assert _mean_loss(student, teacher, batches) < 0.7 * loss_before
    assert report.steps == 6 and report.stopped == "steps" and report.loss_last < report.loss_first
    trained = set(trainable_parameters(student))
    after = dict(student.named_parameters())
    assert trained and all(".self_attn." in n or ".attention." in n for n in trained)
    for name, value in before.items():
        if name in trained:
            assert not torch.equal(value, after[name]), name
        else:
            assert torch.equal(value, student.state_dict()[name]), name
    assert _same(teacher_before, _state(teacher))
    assert headprune.kept_heads(student) == headprune.kept_heads(pruned)
    assert not frozen_flag.requires_grad and all(p.requires_grad for n, p in after.items() if "embed" not in n)
    assert not student.training and all(p.grad is None for p in student.parameters())
    for model in (student, teacher):
        assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


class _Reiterable:
    """The same batches, iterable again and again but not a sequence (so nothing is cached)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_cached_teacher_targets_equal_fresh_ones(llama, bert):
    for teacher, pruned, batches in (llama, bert):
        cached, fresh = copy.deepcopy(pruned), copy.deepcopy(pruned)
        recover(cached, teacher, batches, steps=5, lr=LR)  # steps 4 and 5 reuse the teacher's first outputs
        recover(fresh, teacher, _Reiterable(batches), steps=5, lr=LR)
        assert _same(_state(cached), _state(fresh))


def test_o_proj_trains_the_output_projections_only(llama):
    teacher, pruned, batches = llama
    assert {n.rsplit(".", 2)[-2] for n in trainable_parameters(pruned)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    names = set(trainable_parameters(pruned, "o_proj"))
    assert {n.rsplit(".", 2)[-2] for n in names} == {"o_proj"}
    student = copy.deepcopy(pruned)
    before, loss_before = _state(student), _mean_loss(student, teacher, batches)
    recover(student, teacher, batches, steps=4, lr=LR, train="o_proj")
    assert _mean_loss(student, teacher, batches) < loss_before
    assert {n for n, v in _state(student).items() if not torch.equal(v, before[n])} == names


class _Stop(KeyboardInterrupt):
    pass


def _interrupting(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise _Stop
        yield b


@pytest.mark.parametrize("where", ["progress", "batches"])
def test_an_interrupt_leaves_the_student_exactly_as_it_was(llama, where):
    teacher, pruned, batches = llama
    student = copy.deepcopy(pruned)
    before = _state(student)
    flags = [p.requires_grad for p in student.parameters()]

    def stop_at_three(step, steps, loss):
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        if where == "progress":
            recover(student, teacher, batches, steps=5, lr=LR, progress=stop_at_three)
        else:
            recover(student, teacher, _interrupting(batches, 2), steps=5, lr=LR)
    assert _same(before, _state(student))
    assert flags == [p.requires_grad for p in student.parameters()] and not student.training


@pytest.mark.parametrize("validated", [False, True])
def test_resume_equals_an_uninterrupted_run(llama, tmp_path, validated):
    """Bit for bit; with validation batches the best parameters so far travel in the checkpoint."""
    teacher, pruned, batches = llama
    if validated:
        train, kw, stop_at, every = batches[:2], {"steps": 6, "lr": 0.3, "validation": batches[2:],
                                                  "validate_every": 2}, 5, 4
    else:
        train, kw, stop_at, every = batches, {"steps": 5, "lr": LR}, 3, 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = copy.deepcopy(pruned)
        expected = recover(whole, teacher, train, **kw)
        path = tmp_path / "recover.ckpt"
        first = copy.deepcopy(pruned)

        def stop(step, steps, loss):
            if step == stop_at:
                raise _Stop

        with pytest.raises(_Stop):
            recover(first, teacher, train, progress=stop, checkpoint=path, checkpoint_every=every, **kw)
        assert _same(_state(first), _state(pruned))  # restored; the checkpoint holds `every` steps
        report = recover(first, teacher, train, checkpoint=path, resume=True, **kw)
    finally:
        torch.set_num_threads(threads)
    assert report.resumed_from == every and report.steps == kw["steps"]
    assert (report.best_step, report.validation_loss_best) == (expected.best_step, expected.validation_loss_best)
    assert _same(_state(whole), _state(first))



def test_a_checkpoint_of_other_settings_is_refused(llama, tmp_path):
    teacher, pruned, batches = llama
    path = tmp_path / "recover.ckpt"
    recover(copy.deepcopy(pruned), teacher, batches, steps=1, lr=LR, checkpoint=path)
    one_by_one = [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]
    for kw, what in [({"lr": 2 * LR}, "lr"), ({"train": "o_proj"}, "trainable parameters"),
                     ({"batches": batches[:2]}, "calibration batches"), ({"validation": batches[:1]}, "validation"),
                     ({"batches": one_by_one}, "calibration batches"),  # the same tokens, batched otherwise
                     ({"teacher": _grown(copy.deepcopy(teacher))}, "teacher weights or config")]:
        student = copy.deepcopy(pruned)
        args = {"lr": LR, "batches": batches, "teacher": teacher, **kw}
        with pytest.raises(ValueError, match=f"checkpoint: .*written for other .*{what}"):
            recover(student, args.pop("teacher"), args.pop("batches"), steps=2, checkpoint=path, resume=True, **args)
        assert _same(_state(student), _state(pruned))
    recover(copy.deepcopy(pruned), teacher, batches, steps=2, lr=LR, checkpoint=path, resume=True)  # now 2 steps
    student = copy.deepcopy(pruned)
    with pytest.raises(ValueError, match=r"steps: 1 is fewer than the 2 steps checkpoint .* already holds"):
        recover(student, teacher, batches, steps=1, lr=LR, checkpoint=path, resume=True)
    assert _same(_state(student), _state(pruned))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint: .*not a readable recovery checkpoint"):
        recover(copy.deepcopy(pruned), teacher, batches, steps=2, lr=LR, checkpoint=path, resume=True)


@pytest.mark.parametrize("kw, message", [
    ({"steps": 0}, "steps: expected a positive int or None, got 0"),
    ({"steps": 2.5}, "steps: expected a positive int or None"),
    ({"steps": None}, "steps: None (until the time budget) needs a finite time_budget_s, got None"),
    ({"steps": None, "time_budget_s": float("inf")}, "needs a finite time_budget_s, got inf"),
    ({"lr": 0}, "lr: expected a positive finite number, got 0"),
    ({"lr": -1e-3}, "lr: expected a positive finite number"),
    ({"lr": float("nan")}, "lr: expected a positive finite number"),
    ({"lr": 1e300}, "lr: expected at most float32's largest number, 3.4e+38, got 1e+300"),
    ({"train": "mlp"}, "train: expected one of o_proj, attention, got 'mlp'"),
    ({"time_budget_s": 0}, "time_budget_s: expected a positive number"),
    ({"checkpoint_every": 0}, "checkpoint_every: expected a positive int"),
    ({"resume": True}, "resume: needs a checkpoint path"),
    ({"validate_every": 2}, "validate_every: needs validation batches"),
    ({"validation": []}, "validation: expected a non-empty list of batches"),
    ({"validation": [{}], "validate_every": 0}, "validate_every: expected a positive int, got 0"),
])
def test_bad_arguments_are_refused(llama, kw, message):
    teacher, pruned, batches = llama
    student = copy.deepcopy(pruned)
    with pytest.raises(ValueError, match=re.escape(message)):
        recover(student, teacher, batches, **{"steps": 2, **kw})
    assert _same(_state(student), _state(pruned))


def test_wrong_models_and_batches_are_refused(llama, bert):
    teacher, pruned, batches = llama
    with pytest.raises(ValueError, match="teacher: is the student itself"):
        recover(pruned, pruned, batches, steps=1)
    shared = copy.deepcopy(pruned)  # a layer of the teacher's in the student: training changed the teacher too
    shared.model.layers[1] = teacher.model.layers[1]
    before = _state(teacher)
    with pytest.raises(ValueError, match=r"^teacher: shares model\.layers\.1\.\S+ \(and \d+ more\) with the student"):
        recover(shared, teacher, batches, steps=1)
    assert _same(_state(teacher), before)
    with pytest.raises(ValueError, match="teacher: a bert model cannot teach a llama student"):
        recover(copy.deepcopy(pruned), bert[0], batches, steps=1)
    masked = copy.deepcopy(teacher)
    headprune.mask_heads(masked, {1: [0]})
    with pytest.raises(ValueError, match="student: has heads masked by mask_heads"):
        recover(masked, teacher, batches, steps=1)
    with pytest.raises(ValueError, match="batches: expected at least one batch, got none"):
        recover(copy.deepcopy(pruned), teacher, [], steps=1)
    with pytest.raises(ValueError, match="batches: ran out after 3 steps; pass a list"):
        recover(copy.deepcopy(pruned), teacher, iter(batches), steps=4)


def test_time_budget_stops_after_a_step(llama):
    teacher, pruned, batches = llama
    report = recover(copy.deepcopy(pruned), teacher, batches, steps=50, lr=LR, time_budget_s=1e-9)
    assert report.steps == 1 and report.stopped == "time_budget"


def test_steps_none_trains_until_the_time_budget(monkeypatch, llama):
    """``steps=None``: no step count, the budget alone ends the run (one-second steps)."""
    from headprune.hf import training

    clock = _Clock()
    monkeypatch.setattr(training.time, "perf_counter", clock)
    done, _, stopped = training._loop(lambda b, i: setattr(clock, "now", clock.now + 1.0) or 0.0, [{}], None, 0,
                                      7.5, False, None, 10, None, None)
    assert (done, stopped) == (7, "time_budget")  # 6 s + 1.25 x a 1 s step fit in 7.5 s, 7 s + 1.25 do not
    monkeypatch.undo()
    teacher, pruned, batches = llama
    report = recover(copy.deepcopy(pruned), teacher, batches, steps=None, lr=LR, time_budget_s=1e-9)
    assert report.steps == 1 and report.stopped == "time_budget"


class _Clock:
    """A fake ``time.perf_counter`` for the training loop: time passes only when a step runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("budget,closing,expected", [(5.2, 0.5, 4), (6.0, 0.5, 5), (5.3, 0.0, 5), (5.2, 0.0, 4),
                                                     (0.5, 0.0, 1)])
def test_time_budget_holds_the_closing_work(monkeypatch, budget, closing, expected):
    """A step starts only if it and the closing work fit with the margin: one-second steps,
    ``closing`` seconds after."""
    from headprune.hf import training

    clock = _Clock()
    monkeypatch.setattr(training.time, "perf_counter", clock)

    def step(batch, index):
        clock.now += 1.0
        return 0.0

    done, losses, stopped = training._loop(step, [{}], 50, 0, budget, False, None, 10, None, None,
                                           closing=lambda: closing)
    assert (done, stopped) == (expected, "time_budget")
    assert clock.now + closing <= budget or expected == 1  # the first step always runs


def test_the_recovered_model_saves_and_reloads_exactly(llama, tmp_path):
    teacher, pruned, batches = llama
    student = copy.deepcopy(pruned)
    recover(student, teacher, batches, steps=2, lr=LR)
    headprune.save_pruned(student, tmp_path / "m")
    assert _same(_state(student), _state(headprune.load_pruned(tmp_path / "m")))



def test_validation_keeps_the_parameters_of_the_best_measured_step(llama):
    """Measured every step: the student ends with the parameters whose validation loss (the
    library's own distillation loss, recomputed here) was lowest, the start included."""
    teacher, pruned, batches = llama
    train, held = batches[:2], batches[2:]
    student = copy.deepcopy(pruned)
    states, losses = [_state(student)], [_mean_loss(student, teacher, held)]

    def watch(step, steps, loss):
        states.append(_state(student))
        losses.append(_mean_loss(student, teacher, held))

    report = recover(student, teacher, train, steps=8, lr=0.1, validation=held, validate_every=1, progress=watch)
    best = min(range(len(losses)), key=losses.__getitem__)
    assert report.best_step == best and report.steps == 8
    assert report.validation_loss_first == pytest.approx(losses[0], rel=1e-5)
    assert report.validation_loss_best == pytest.approx(losses[best], rel=1e-5)
    assert _same(_state(student), states[best])


def test_a_run_that_only_overfits_gives_back_the_starting_model(llama):
    """A learning rate so large that every step raises the validation loss: the student ends
    exactly as it started, and the report says no step won."""
    teacher, pruned, batches = llama
    student = copy.deepcopy(pruned)
    report = recover(student, teacher, batches[:2], steps=4, lr=1e3, validation=batches[2:], validate_every=2)
    assert report.best_step == 0 and report.validation_loss_best == report.validation_loss_first
    assert _same(_state(student), _state(pruned))


def test_the_default_learning_rate_depends_on_the_kind_of_model(llama, bert):
    for (teacher, pruned, batches), kind in ((llama, "causal"), (bert, "encoder")):
        report = recover(copy.deepcopy(pruned), teacher, batches, steps=1)
        assert report.lr == DEFAULT_LR[kind]
    assert DEFAULT_LR["encoder"] < DEFAULT_LR["causal"]


def test_training_runs_in_eval_mode_and_the_checkpoint_times_validation(bert, tmp_path):
    """A student handed over in train mode (dropout on) trains and validates without dropout,
    as from eval mode, bit for bit; a checkpoint keeps the last validation pass's duration,
    so a resumed run's time budget holds the closing pass."""
    teacher, pruned, batches = bert
    runs = []
    for mode in ("train", "eval"):
        student = copy.deepcopy(pruned).train(mode == "train")
        seen = []
        student.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(m.training))
        path = tmp_path / f"{mode}.ckpt"
        recover(student, teacher, batches[:2], steps=2, lr=LR, validation=batches[2:], validate_every=1,
                checkpoint=path)
        assert seen and not any(seen) and student.training == (mode == "train")  # as it came
        runs.append(_state(student))
    assert _same(*runs)
    assert torch.load(path, weights_only=True)["extra"]["seconds"] > 0


def test_a_nan_validation_loss_never_becomes_the_best(llama):
    from headprune.hf.recover import _Validation

    teacher, _, batches = llama
    val = _Validation(teacher, batches[:1], 1)
    params = {"w": torch.nn.Parameter(torch.zeros(1))}
    losses = iter([float("nan"), 0.5, float("nan"), 0.7])
    val.loss = lambda student: next(losses)
    for step in range(4):
        params["w"].data.fill_(step)
        val.measure(None, params, step)
    assert (val.best_step, val.best_loss, val.best["w"].item()) == (1, 0.5, 1.0)


def test_the_teacher_digest_reads_past_the_first_values_of_each_weight():
    """It hashed the first 4,096 values of each weight: a teacher that differs further on (a
    fine-tune of later rows) passed for the one a checkpoint was written for."""
    from headprune.hf.training import _model_digest

    torch.manual_seed(0)
    one = torch.nn.Linear(128, 64)
    other = copy.deepcopy(one)
    with torch.no_grad():
        other.weight.view(-1)[5000] += 0.5
    assert _model_digest(one) == _model_digest(copy.deepcopy(one)) and _model_digest(one) != _model_digest(other)
