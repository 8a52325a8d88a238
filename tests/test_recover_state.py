"""headprune.recover: what it leaves as it found (both models' train/eval flags, the student's
gradients), which checkpoint it refuses, and the loss of a classifier's outputs (fixtures of
test_recover.py)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import tiny_batch, tiny_config  # noqa: E402
from test_recover import LR, bert, llama  # noqa: E402,F401  (fixtures)
from test_cli import tiny_dir  # noqa: E402,F401  (fixture)

from headprune.hf.recover import recover  # noqa: E402


def test_a_checkpoint_of_another_student_is_refused(llama, tmp_path):
    """A student whose frozen weights (here its MLPs) differ was resumed from another's
    checkpoint: only the weights it trains were compared."""
    teacher, pruned, batches = llama
    path = tmp_path / "recover.ckpt"
    recover(copy.deepcopy(pruned), teacher, batches, steps=1, lr=LR, checkpoint=path)
    other = copy.deepcopy(pruned)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if ".mlp." in name:
                p.mul_(0.5)
    with pytest.raises(ValueError, match=r"written for other student weights \(those it does not train included\) or config"):
        recover(other, teacher, batches, steps=2, lr=LR, checkpoint=path, resume=True)
    half = copy.deepcopy(pruned).to(torch.bfloat16)  # another float type: named as such
    with pytest.raises(ValueError, match=r"trainable parameters \(names, shapes or float types\)"):
        recover(half, teacher, batches, steps=2, lr=LR, checkpoint=path, resume=True)


def test_recover_leaves_both_models_modes_and_the_students_gradients_as_they_were(bert):
    """The teacher came back with one train/eval flag for all its modules, and the student with
    every gradient cleared, those of weights it does not train included."""
    teacher, pruned, batches = bert
    teacher = copy.deepcopy(teacher).train()
    teacher.embeddings.eval()
    student = copy.deepcopy(pruned).train()
    student.encoder.layer[0].eval()
    grads = {}
    for name, p in student.named_parameters():
        p.grad = torch.full_like(p, 0.25)
        grads[name] = p.grad
    modes = [[m.training for m in model.modules()] for model in (teacher, student)]
    recover(student, teacher, batches[:2], steps=2, lr=LR)
    assert [[m.training for m in model.modules()] for model in (teacher, student)] == modes
    assert all(p.grad is grads[name] for name, p in student.named_parameters())
    half = copy.deepcopy(pruned).to(torch.bfloat16)  # trained in float32: its gradients come back as they were
    for p in half.parameters():
        p.grad = torch.ones_like(p)
    grads = {name: p.grad for name, p in half.named_parameters()}
    recover(half, teacher, batches[:2], steps=1, lr=LR)
    assert all(p.grad is grads[name] and p.grad.dtype == torch.bfloat16 for name, p in half.named_parameters())


def test_a_classifiers_logits_are_distilled_per_example():
    """A sequence classifier's [batch, classes] logits were multiplied by the [batch, tokens]
    attention mask: an error where the two differ, a wrong loss where they match."""
    from headprune.hf.recover import distillation_loss

    torch.manual_seed(0)
    config = tiny_config("bert", num_labels=5)
    teacher = transformers.BertForSequenceClassification(config).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.classifier.weight.normal_(0, 1)  # far from the teacher: a loss well above float32 rounding
    for batch, seq in ((3, 9), (4, 4)):
        b = tiny_batch("bert", batch=batch, seq=seq)
        with torch.no_grad():
            t = teacher(**b).logits.double().log_softmax(-1)
            s_ = student(**b).logits.double().log_softmax(-1)
        expected = (t.exp() * (t - s_)).sum(-1).mean()
        assert distillation_loss(student, teacher, b).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("which", ["recover", "learn_gates"])
def test_a_time_budget_holds_the_last_checkpoint_save(llama, tmp_path, monkeypatch, which):
    """The budget reserved the time of saves seen so far, none before the first periodic save,
    while the last save always runs: with saves of 0.8 s and a budget of 1.2 s, steps ran until
    the budget and the save came after it. Under a budget the first step is saved, which times it."""
    import time

    from headprune import atomic
    from headprune.hf.learned import learn_gates

    teacher, pruned, batches = llama
    write, saves = atomic.write_file, []

    def slow(*a, **kw):
        time.sleep(0.8)
        saves.append(1)
        return write(*a, **kw)

    monkeypatch.setattr(atomic, "write_file", slow)
    kw = {"time_budget_s": 1.2, "checkpoint": tmp_path / "c.pt", "checkpoint_every": 1000}
    if which == "recover":
        report = recover(copy.deepcopy(pruned), teacher, batches, steps=None, lr=LR, **kw)
    else:
        report = learn_gates(copy.deepcopy(teacher), batches, ratio=0.5, steps=100000, **kw)
    assert report.steps == 1 and report.stopped == "time_budget" and len(saves) == 1


def test_arguments_of_the_training_runs_are_named(llama):
    """A teacher of None was named as "model: unsupported model_type None", one batch dict was
    iterated over as its keys, and progress="yes" did nothing."""
    from headprune.hf.importance import gradient_importance
    from headprune.hf.learned import learn_gates

    teacher, pruned, batches = llama
    with pytest.raises(ValueError, match=r"^teacher: expected a transformers model, got NoneType"):
        recover(copy.deepcopy(pruned), None, batches, steps=1)
    with pytest.raises(ValueError, match=r"^student: expected a transformers model, got str"):  # lr=None too
        recover("pruned", teacher, batches, steps=1)
    for run in (lambda b, **kw: recover(copy.deepcopy(pruned), teacher, b, steps=1, **kw),
                lambda b, **kw: learn_gates(copy.deepcopy(teacher), b, ratio=0.5, steps=1, **kw)):
        with pytest.raises(TypeError, match=r"^batches: expected an iterable of batches .* got a single batch; pass "):
            run(batches[0])
        with pytest.raises(TypeError, match=r"^batches: expected an iterable of batches .* got NoneType"):
            run(None)
        with pytest.raises(ValueError, match=r"^progress: expected True, False or a callable .* got 'yes'"):
            run(batches, progress="yes")
    base = transformers.AutoModel.from_config(tiny_config("llama")).eval()  # no LM head
    with pytest.raises(ValueError, match=r"^causal: True needs a model with a language-model head .* LlamaModel"):
        gradient_importance(base, batches, causal=True)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_save(llama, tmp_path):
    """A recovery checkpoint written by a process killed mid-write leaves its temporary file
    (parameters and optimizer state, hundreds of MB on a real model); the next run's first save
    in that folder removes it, and not the file of a writer still running (this process's)."""
    import os
    import subprocess
    import sys

    from headprune.atomic import owner_token

    teacher, pruned, batches = llama
    script = "from headprune.atomic import owner_token; print(owner_token())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ended = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    killed = tmp_path / f".recover.pt.tmp-{ended.stdout.strip()}-0123abcd"  # as atomic.write_file names them
    live = tmp_path / f".recover.pt.tmp-{owner_token()}-4567abcd"
    killed.write_bytes(b"PK\x03\x04half")
    live.write_bytes(b"PK")
    recover(copy.deepcopy(pruned), teacher, batches, steps=1, lr=LR, checkpoint=tmp_path / "recover.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "recover.pt"]


def test_batches_that_are_no_dicts_and_a_checkpoint_that_cannot_be_written_are_refused_before_a_step(llama, tmp_path):
    """Both were found late: a batch that is no dict failed inside the fingerprint with an
    unrelated TypeError, and a checkpoint path that cannot be written only at its first save,
    after the steps before it (lost)."""
    teacher, pruned, batches = llama
    ids = batches[0]["input_ids"]
    for bad, kind in [(["text"], "str"), ([(ids,)], "tuple"), ([ids], "Tensor")]:
        with pytest.raises(TypeError, match=rf"^batches: expected dicts of tensors \(e.g. a tokenizer's output\), "
                                            rf"got {kind}$"):
            recover(copy.deepcopy(pruned), teacher, bad, steps=1, lr=LR)
    (tmp_path / "file").write_text("x")
    steps = []
    with pytest.raises(NotADirectoryError, match=r"checkpoint: .*file is not a directory, so .*r\.pt cannot be made"):
        recover(copy.deepcopy(pruned), teacher, batches, steps=3, lr=LR, checkpoint=tmp_path / "file" / "r.pt",
                checkpoint_every=2, progress=lambda *a: steps.append(a))
    assert steps == [] and (tmp_path / "file").read_text() == "x"


def test_a_checkpoint_of_an_earlier_format_is_refused_as_such_and_replaced_without_resume(llama, tmp_path):
    teacher, pruned, batches = llama
    path = tmp_path / "r.pt"
    recover(copy.deepcopy(pruned), teacher, batches, steps=1, lr=LR, checkpoint=path)
    state = torch.load(path, weights_only=True)
    state["fingerprint"]["format"] = "headprune.recover/4"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"r\.pt was written by another version of headprune \(format "
                                         r"'headprune.recover/4'; this one reads 'headprune.recover/\d+'\); pass another path, "
                                         r"or delete it to start over$"):
        recover(copy.deepcopy(pruned), teacher, batches, steps=2, lr=LR, checkpoint=path, resume=True)
    recover(copy.deepcopy(pruned), teacher, batches, steps=1, lr=LR, checkpoint=path)  # no resume: written over
    assert torch.load(path, weights_only=True)["fingerprint"]["format"] != "headprune.recover/4"


def test_a_loss_that_is_not_finite_is_refused_before_any_step_trains_on_it(llama, tmp_path):
    """A teacher whose outputs are not finite: recovery trained on NaN, ended with NaN weights
    and checkpointed them (validation kept none better, so nothing was restored); learned gates
    returned NaN scores."""
    from headprune.hf import learn_gates

    teacher, pruned, batches = llama
    bad = copy.deepcopy(teacher)
    with torch.no_grad():
        bad.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    student = copy.deepcopy(pruned)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ValueError, match=r"^recover: the distillation loss of a training batch is nan: the teacher's "
                                         r"or the model's outputs are not finite on it"):
        recover(student, bad, batches, steps=3, lr=LR, validation=batches[:1], validate_every=1,
                checkpoint=tmp_path / "r.pt")
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items()) and not (tmp_path / "r.pt").exists()
    with pytest.raises(ValueError, match=r"^learn_gates: the distillation loss of a training batch is nan"):
        learn_gates(bad, batches, ratio=0.5, steps=3, checkpoint=tmp_path / "g.pt")
    assert not (tmp_path / "g.pt").exists()


def test_training_runs_under_no_grad_and_refuse_a_gates_block(llama):
    """recover under torch.no_grad() failed in backward (learn_gates and gradient_importance
    enable gradients themselves); inside a caller's gates block the three trained or measured
    the caller-gated model and gave the caller's gates gradients."""
    from headprune.hf import gates
    from headprune.hf.importance import gradient_importance
    from headprune.hf.learned import learn_gates

    teacher, pruned, batches = llama
    with torch.no_grad():
        assert recover(copy.deepcopy(pruned), teacher, batches, steps=1, lr=LR).steps == 1
    student = copy.deepcopy(pruned)
    for model, run, name in ((student, lambda: recover(student, teacher, batches, steps=1, lr=LR), "student"),
                             (teacher, lambda: recover(student, teacher, batches, steps=1, lr=LR), "teacher"),
                             (teacher, lambda: learn_gates(teacher, batches, ratio=0.5, steps=1), "model"),
                             (teacher, lambda: gradient_importance(teacher, batches), "model")):
        with gates(model, init=0.0) as g:
            with pytest.raises(ValueError, match=rf"^{name}: is inside a headprune.gates block; call \w+ after"):
                run()
            assert g.gate.grad is None


def test_a_teacher_with_another_head_or_vocabulary_is_refused_by_name(llama):
    """Such a teacher failed inside the loss with a shape error that named no argument."""
    teacher, pruned, batches = llama
    base = transformers.AutoModel.from_config(tiny_config("llama")).eval()
    with pytest.raises(ValueError, match=r"^teacher: a LlamaModel cannot teach a LlamaForCausalLM \(load both"):
        recover(copy.deepcopy(pruned), base, batches, steps=1)
    other = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=120)).eval()
    with pytest.raises(ValueError, match=r"^teacher: its vocab_size is 120, the student's 100"):
        recover(copy.deepcopy(pruned), other, batches, steps=1)


def test_the_command_says_the_recovery_goes_on_from_its_checkpoint(tmp_path, tiny_dir, monkeypatch, capsys):  # noqa: F811
    """A recovery resumed from --checkpoint said so only through the progress bar's count."""
    from headprune.app.cli import main

    monkeypatch.chdir(tmp_path)
    calib = ["--samples", "4", "--seq-len", "16"]
    assert main([str(a) for a in ["prune", tiny_dir, "--ratio", "0.3", *calib, "--no-speed", "--quiet",
                                  "--out", tmp_path / "p"]]) == 0
    rec = ["recover", tmp_path / "p", "--validation", "0", "--samples", "4", "--lr", "1e-3",
           "--checkpoint", tmp_path / "state.pt"]
    assert main([str(a) for a in [*rec, "--steps", "2", "--quiet", "--out", tmp_path / "a"]]) == 0
    capsys.readouterr()
    assert main([str(a) for a in [*rec, "--steps", "3", "--out", tmp_path / "b"]]) == 0
    assert f"the recovery goes on from step 2 of --checkpoint {tmp_path / 'state.pt'}" in capsys.readouterr().out
