"""Recovery after pruning: a short distillation of the pruned model (the student) toward the
unpruned one (the teacher) on the calibration batches.

* Causal LMs (the output has ``logits``): KL(teacher || student) of the next-token
  distributions at temperature 1, averaged over the valid (non-padded) positions (a
  classifier's ``[batch, classes]`` logits: over the batch).
* Encoders (``last_hidden_state``): 1 - cosine similarity of the pooled last hidden states
  (the sentence-embedding fidelity itself, pooled as :func:`~headprune.hf.pooling.pooling_of`
  says: the mean over the valid tokens by default), averaged over the batch.

Only the attention sites' projections train (``train``: ``"attention"``, the q/k/v/o weights
and biases, or ``"o_proj"``, the output projections' only); everything else is frozen,
embeddings always. On SmolLM2-135M with half its heads pruned, a step of ``"attention"``
closed more of the perplexity gap per CPU-minute than ``"o_proj"`` (benchmarks/bench_recover.py).
The head layout never changes. AdamW at a constant learning rate: a run can stop after any
step (``time_budget_s``) and resume from a checkpoint exactly.

The learning rate depends on the kind of model (:data:`DEFAULT_LR`): on all-MiniLM-L6-v2 with
half its heads pruned, 1e-4 raised the held-out fidelity for about 500 steps of 2 paragraphs
and then lost it all and more, while 3e-5 rose steadily and stayed. With ``validation``
batches (kept out of training), the distillation loss on them is measured before the first
step and every ``validate_every`` steps, and the student ends with the parameters of the best
measurement: a run that only overfits gives back the model it started from.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch

from ..core.modules import eval_mode, refuse_meta
from ..prune.mask import active_masks
from ..ranking.units import as_real, count_arg
from .adapters import encoder_decoder, get_adapter, resolve_sites
from .batches import check_inputs_of, check_vocabulary
from .distil import _kwargs, _loss, _Teacher, distillation_loss
from .training import (_bar, _check_run, _fingerprint, _loop, _model_digest, _resume, _tokens,
                       cast_back, check_inputs, check_teacher, dtypes_of, finite_loss, open_checkpoint)

__all__ = ["DEFAULT_LR", "RecoverReport", "TRAIN", "check_resume", "default_lr", "distillation_loss", "recover",
           "trainable_parameters"]

#: what ``train`` may name: which projections of each attention site train
TRAIN = {"o_proj": ("o",), "attention": ("q", "k", "v", "qkv", "o")}
#: AdamW's learning rate by kind of model (``lr=None``): a causal LM's KL steps and an
#: encoder's cosine steps (see the module doc)
DEFAULT_LR = {"causal": 1e-4, "encoder": 3e-5}


@dataclass
class RecoverReport:
    """What :func:`recover` did: steps run (in all, a resumed run's earlier ones included),
    seconds of this call, the distillation loss of the first and the last step of this call
    (nats per token for causal LMs, 1 - cosine for encoders), the trainable parameter count
    and why it stopped (``"steps"`` or ``"time_budget"``), the learning rate used, and with
    validation batches the validation loss before training and at its best and the step
    whose parameters the student kept (0: none beat the starting point)."""

    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    train: str
    parameters: int
    stopped: str
    resumed_from: int = 0
    lr: Optional[float] = None
    validation_loss_first: Optional[float] = None
    validation_loss_best: Optional[float] = None
    best_step: Optional[int] = None

    def to_dict(self) -> dict:
        return asdict(self)


def default_lr(model) -> float:
    """:data:`DEFAULT_LR` of ``model``'s kind (causal LMs and encoders)."""
    kind = get_adapter(model).kind
    return DEFAULT_LR.get(kind, DEFAULT_LR["causal"])


def trainable_parameters(model, train: str = "attention") -> dict:
    """``{name: parameter}`` that ``train`` names, in the model's parameter order."""
    if train not in TRAIN:
        raise ValueError(f"train: expected one of {', '.join(TRAIN)}, got {train!r}")
    adapter = get_adapter(model)
    chosen = set()
    for site in resolve_sites(model, adapter):
        for part in TRAIN[train]:
            module = site.sub(getattr(site.block, part))
            if module is not None:
                chosen.update(id(p) for p in module.parameters(recurse=False))
    return {n: p for n, p in model.named_parameters() if id(p) in chosen}


def _check(student, teacher, steps, lr, train, time_budget_s, checkpoint_every) -> tuple:
    """``(steps, checkpoint_every, time_budget_s)``, checked, with the models and ``train``."""
    steps, checkpoint_every, time_budget_s = _check_run(steps, lr, time_budget_s, checkpoint_every, open_ended=True)
    if train not in TRAIN:
        raise ValueError(f"train: expected one of {', '.join(TRAIN)}, got {train!r}")
    a = check_teacher(student, teacher)
    if encoder_decoder(student, a):
        raise ValueError(f"student: recovery handles causal LMs and encoders, not {a.model_type} (seq2seq)")
    if student is teacher:
        raise ValueError("teacher: is the student itself; pass the unpruned model")
    held = {t.untyped_storage().data_ptr() for t in [*teacher.parameters(), *teacher.buffers()] if t.data_ptr()}
    if shared := [n for n, p in student.named_parameters() if p.data_ptr() and p.untyped_storage().data_ptr() in held]:
        raise ValueError(f"teacher: shares {shared[0]} (and {len(shared) - 1} more) with the student, which "
                         "training would change in both; pass an independent copy (copy.deepcopy)")
    if active_masks(student):  # masked heads are zero columns of o: their gradients would revive them
        raise ValueError("student: has heads masked by mask_heads, which training would revive; "
                         "remove them with prune_heads first")
    return steps, checkpoint_every, time_budget_s


@contextmanager
def _training(student, params: dict, types: dict):
    """The student in eval mode and only ``params`` requiring gradients inside, in float32 if it
    holds half-precision weights (``types``: :func:`dtypes_of` it; AdamW's steps fall below their
    rounding); on an exception (a ``KeyboardInterrupt`` too) ``params`` get back the values
    they entered with, bit for bit; on every exit every tensor is back in its type, and every
    module's train/eval flag, ``requires_grad`` flag and ``.grad`` are as they entered."""
    flags = {p: (p.requires_grad, p.grad, getattr(p.grad, "dtype", None)) for p in student.parameters()}
    saved = [p.detach().clone() for p in params.values()]
    try:
        if {torch.float16, torch.bfloat16} & set(types.values()):
            student.float()  # also retypes each .grad, the same tensor: cast back below
        with eval_mode(student):  # no dropout: the teacher's targets are exact
            for p in student.parameters():
                p.requires_grad_(False)
                p.grad = None
            for p in params.values():
                p.requires_grad_(True)
            yield
    except BaseException:
        with torch.no_grad():
            for p, s in zip(params.values(), saved):
                p.copy_(s)
        raise
    finally:
        cast_back(student, types)
        for p, (f, g, dtype) in flags.items():
            p.requires_grad_(f)
            if g is not None and g.dtype != dtype:
                g.data = g.data.to(dtype)  # exact: widened and narrowed back
            p.grad = g


def recover(student, teacher, batches, *, steps: Optional[int], lr: Optional[float] = None, train: str = "attention",
            time_budget_s: Optional[float] = None, progress: Union[bool, Callable] = False,
            checkpoint: Optional[Union[str, os.PathLike]] = None, checkpoint_every: int = 10,
            resume: bool = False, validation: Optional[Sequence] = None,
            validate_every: Optional[int] = None) -> RecoverReport:
    """Distil ``student`` (a pruned model, changed in place) toward ``teacher`` (the unpruned
    one, never changed) for ``steps`` optimizer steps (``None``: until ``time_budget_s``), one
    calibration batch per step, cycling through ``batches`` (a list; dicts as the model's
    forward takes them).

    Args:
        lr: AdamW's learning rate (constant; no weight decay); ``None``: :data:`DEFAULT_LR`
            of the student's kind.
        train: ``"attention"`` (the default: the q/k/v/o weights and biases of every
            attention site) or ``"o_proj"`` (the output projections' only). Nothing else trains.
        time_budget_s: the seconds this call may take: a step starts only if it and the closing
            validation pass are expected to end within them (estimated from the longest of the
            last eight steps and the last validation pass, with a margin: see
            ``headprune.hf.training.MARGIN``); the first step always runs.
        progress: ``True`` for a progress bar, or a callable ``progress(step, steps, loss)``
            called after every step (an exception it raises stops the run like any other).
        checkpoint: a file rewritten atomically every ``checkpoint_every`` steps and at the
            end with the trained parameters, the optimizer state and the step.
        resume: continue from ``checkpoint`` if it exists (refused, with the reason, when it
            was written for other parameters, settings, starting weights or batches).
        validation: batches kept out of training (a list, like ``batches``): their mean
            distillation loss is measured before the first step, every ``validate_every``
            steps (default: five times the number of validation batches, so measuring costs
            a few percent of training) and after the last step of the call, and the student
            ends with the parameters of the lowest (the starting ones if no step beat them).
            The best of the scheduled measurements travels in the checkpoint; the one after
            a call's last step, off the schedule, counts for that call only, so a resumed run
            keeps what the run uninterrupted keeps.

    On any exception (``KeyboardInterrupt``; ``ValueError`` for a loss that is not finite, refused
    before a step trains on it; a checkpoint keeps the steps saved before) the student's weights
    are restored exactly; on every exit its train/eval and ``requires_grad`` flags and gradients
    are as they were, and so are the teacher's flags. Training runs in eval mode (no dropout).
    """
    started = time.perf_counter()
    check_inputs(batches, progress, "recover", student=student, teacher=teacher)
    refuse_meta(student.parameters(), "student")  # it is trained: an offloaded student's weights are loaded per forward
    lr = default_lr(student) if lr is None else lr
    steps, checkpoint_every, time_budget_s = _check(student, teacher, steps, lr, train, time_budget_s,
                                                    checkpoint_every)
    lr = as_real(lr)  # numpy and tensor numbers as floats (the checkpoint's fingerprint records it)
    if resume and checkpoint is None:
        raise ValueError("resume: needs a checkpoint path")
    validate_every = _check_validation(validation, validate_every, student)
    params, fingerprint = _fingerprinted(student, teacher, batches, lr, train, validation, validate_every)
    ckpt = open_checkpoint(checkpoint, fingerprint, resume)
    with eval_mode(teacher), _training(student, params, dtypes_of(student)), torch.enable_grad():  # under no_grad too
        val = None if validation is None else _Validation(teacher, validation, validate_every)
        return _run(student, teacher, batches, params, steps, lr, time_budget_s, progress, ckpt, checkpoint_every,
                    resume, train, val, started)


def _fingerprinted(student, teacher, batches, lr, train, validation, validate_every) -> tuple:
    """``(trainable parameters, the fingerprint a checkpoint of this run must match)``."""
    params = trainable_parameters(student, train)
    if not params:
        raise ValueError(f"student: has no {train} parameters to train")
    settings = {"train": train, "lr": float(lr), "loss": "kl" if get_adapter(student).kind == "causal" else "cosine",
                "teacher": _model_digest(teacher), "student": _model_digest(student)}  # its frozen weights too
    if validation is not None:
        settings["validation"] = _tokens(validation)
        settings["validate_every"] = validate_every
    return params, _fingerprint(params, settings, batches)


def check_resume(student, teacher, batches, *, checkpoint, lr: Optional[float] = None, train: str = "attention",
                 validation: Optional[Sequence] = None, validate_every: Optional[int] = None,
                 arg: str = "checkpoint") -> None:
    """Refuse now (``ValueError``, naming the checkpoint as ``arg``) a ``checkpoint`` that
    :func:`recover` with these arguments and ``resume=True`` would refuse (written for other
    settings, weights or batches), before work that comes first, such as the command line's
    evaluation of both models. Nothing if the file does not exist. Its tensors are mapped, not
    read: the run reads them."""
    lr = default_lr(student) if lr is None else lr
    every = _check_validation(validation, validate_every, student)
    fingerprint = _fingerprinted(student, teacher, batches, lr, train, validation, every)[1]
    ckpt = open_checkpoint(checkpoint, fingerprint, True, arg=arg)
    if ckpt is not None:
        ckpt.load(mmap=True)


def _check_validation(validation, every, student) -> int:
    """``validate_every`` checked (its default for these validation batches), and the batches."""
    if validation is None:
        if every is not None:
            raise ValueError("validate_every: needs validation batches")
        return 0
    if not isinstance(validation, Sequence) or isinstance(validation, (str, bytes)) or not validation:
        raise ValueError(f"validation: expected a non-empty list of batches, got {type(validation).__name__}"
                         + (" (empty)" if isinstance(validation, Sequence) else ""))
    every = None if every is None else count_arg("validate_every", every)
    for batch in validation:  # refused here, by its name (the run would name them batches)
        check_inputs_of(batch, "validation")
        check_vocabulary(student, batch, "validation")
    return 5 * len(validation) if every is None else every


class _Validation:
    """The mean distillation loss on the validation batches (teacher targets cached), and the
    trainable parameters at the lowest seen. The checkpoint holds the measurements every
    ``every`` steps; the one at the step a call ends on (``closing``) competes for that
    call's result only, so a run stopped and resumed keeps what the same run uninterrupted keeps."""

    def __init__(self, teacher, batches: Sequence, every: int):
        self.targets, self.batches, self.every = _Teacher(teacher, cache=True), list(batches), every
        self.first = self.best_loss = self.best_step = self.best = None
        self.last = None  # (loss, step, parameters) of the closing measurement
        self.seconds = 0.0  # the last measurement's

    @torch.no_grad()
    def loss(self, student) -> float:
        total = 0.0
        for i, batch in enumerate(self.batches):
            kw = _kwargs(student, batch)
            total += float(_loss(student, self.targets(i, kw), kw, self.targets.modes))
        return total / len(self.batches)

    def measure(self, student, params: dict, step: int, closing: bool = False) -> None:
        """A measurement on the schedule, or (``closing``) at the step this call ends on, off
        the schedule: that one is not saved."""
        began = time.perf_counter()
        loss = self.loss(student)
        self.seconds = time.perf_counter() - began
        if self.first is None:
            self.first = loss
        if not math.isnan(loss) and (self.best_loss is None or loss < self.best_loss):  # NaN never becomes the best
            best = (loss, step, {n: p.detach().clone() for n, p in params.items()})
            if closing:
                self.last = best
            else:
                self.best_loss, self.best_step, self.best = best

    def state(self) -> dict:
        return {"first": self.first, "best_loss": self.best_loss, "best_step": self.best_step, "seconds": self.seconds,
                "best": None if self.best is None else {n: t.cpu() for n, t in self.best.items()}}

    def load(self, state: Optional[dict], params: dict) -> None:
        if not state:
            return
        self.first, self.best_loss, self.best_step = state["first"], state["best_loss"], state["best_step"]
        self.seconds = float(state.get("seconds", 0.0))  # a resumed run's budget counts the closing pass
        best = state.get("best")
        self.best = None if best is None else {n: best[n].to(p) for n, p in params.items()}

    def keep_best(self, params: dict) -> None:
        """The student's parameters become the best measured, the closing measurement included."""
        if self.last is not None:
            self.best_loss, self.best_step, self.best = self.last
            self.last = None
        if self.best is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.best[n])


def _run(student, teacher, batches, params, steps, lr, budget, progress, ckpt, every, resume, train,
         val: Optional[_Validation], t0: float) -> RecoverReport:
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    load = None if val is None else (lambda state: val.load(state, params))
    done = start = _resume(ckpt, params, optimizer, load) if resume else 0
    if steps is not None and done > steps:
        raise ValueError(f"steps: {steps} is fewer than the {done} steps checkpoint {ckpt.path} already holds; "
                         "ask for at least as many, or start without resume")
    targets = _Teacher(teacher, cache=isinstance(batches, Sequence))
    if val is not None and val.first is None:
        val.measure(student, params, done)

    def step(batch, index: int) -> float:
        kw = _kwargs(student, batch)
        loss = _loss(student, targets(index, kw), kw, targets.modes)
        value = finite_loss(loss, "recover")  # refused: the student is restored as on any exception
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return value

    def save(n: int) -> None:
        ckpt.save(params, optimizer, n, None if val is None else val.state())

    def after(n: int) -> None:  # every val.every steps
        if n % val.every == 0:
            val.measure(student, params, n)

    def finish(n: int) -> None:  # the last step too, unless just measured; for this call's result only
        if n % val.every:
            val.measure(student, params, n, closing=True)

    hooks = {} if val is None else {"after": after, "finish": finish, "closing": lambda: val.seconds}
    done, losses, stopped = _loop(step, batches, steps, done, budget, progress, ckpt, every, save,
                                  _bar(progress, done, steps), started=t0, **hooks)
    extra = {}
    if val is not None:
        val.keep_best(params)
        extra = {"validation_loss_first": val.first, "validation_loss_best": val.best_loss, "best_step": val.best_step}
    return RecoverReport(done, round(time.perf_counter() - t0, 3), losses[0] if losses else math.nan,
                         losses[-1] if losses else math.nan, train, sum(p.numel() for p in params.values()),
                         stopped, start, float(lr), **extra)
