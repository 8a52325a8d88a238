"""The training loop shared by :func:`~headprune.hf.recover.recover` and
:func:`~headprune.hf.learned.learn_gates`: argument checks, cycling through the batches, a time
budget, a progress bar or callback, and checkpoints that resume a run exactly (rewritten
atomically, refused with the reason when written for other parameters, settings, starting
weights or batches)."""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import math
import os
import time
from collections.abc import Sequence
from typing import Callable, Optional

import torch

from .. import atomic
from .checkpoint import format_kind, refuse_foreign, tensor_bytes, writing
from .batches import check_batch, check_batches
from ..core.modules import refuse_meta, uncompiled, unloaded_parameters
from ..ranking.units import MAX_LR, as_real, count_arg
from .adapters import get_adapter
from .gates import refuse_gated

CHECKPOINT_FORMAT = "headprune.recover/6"  # /2: digests of shapes and types too; /3: of every weight;
# /4: of the student's every weight too, not only those it trains; /5: of the models' configs too;
# /6: each tensor's exact sum of bits, not its float sum (which depends on the thread count)
#: how much longer than the longest recent step (and the closing work) a time budget allows for
#: the next: on a shared machine a step can take longer than the eight before it
MARGIN = 1.25


def _check_run(steps, lr, time_budget_s, checkpoint_every, *, open_ended: bool = False) -> tuple:
    """The options every training run here takes (:func:`recover`, ``learn_gates``), checked:
    ``(steps, checkpoint_every, time_budget_s)``, the first two as ints and the budget as a float
    or ``None`` (numpy and 0-d tensor numbers are taken); ``open_ended``:
    ``steps=None`` (until the time budget) is allowed with a time budget."""
    budget = math.inf if isinstance(time_budget_s, float) and time_budget_s == math.inf else as_real(time_budget_s)
    if steps is None and open_ended:
        if budget is None or budget == math.inf:
            raise ValueError(f"steps: None (until the time budget) needs a finite time_budget_s, got {time_budget_s!r}")
    else:
        steps = count_arg("steps", steps, f"a positive int{' or None' if open_ended else ''}")
    if as_real(lr) is None or not 0 < lr:
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    if lr > MAX_LR:  # the optimizers' float32 state overflows inside their step
        raise ValueError(f"lr: expected at most float32's largest number, {MAX_LR:.3g}, got {lr!r}")
    if time_budget_s is not None and not (budget is not None and budget > 0):
        raise ValueError(f"time_budget_s: expected a positive number of seconds or None, got {time_budget_s!r}")
    return steps, count_arg("checkpoint_every", checkpoint_every), None if time_budget_s is None else budget


def check_inputs(batches, progress, what: str = "", **models) -> None:
    """The batches, the progress option and the ``models`` (by argument name) of a training run
    (:func:`recover`, ``learn_gates``: ``what``, for the refusal of inference mode)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what}: needs autograd; call it outside torch.inference_mode()")
    for name, m in models.items():
        if not isinstance(m, torch.nn.Module):
            raise ValueError(f"{name}: expected a transformers model, got {type(m).__name__}")
        refuse_meta(unloaded_parameters(m), name)
        refuse_gated(m, f"call {what}", name)  # its gates would shape what is learned (and take gradients)
    check_batches(batches)
    if not (isinstance(progress, bool) or callable(progress)):
        raise ValueError(f"progress: expected True, False or a callable progress(step, steps, loss), got {progress!r}")


def check_teacher(student, teacher):
    """``ValueError`` naming ``teacher`` unless it gives the outputs the distillation loss compares
    with the student's: the same family and class (the same head), vocabulary, width and labels.
    The student's adapter."""
    a, b = get_adapter(student), get_adapter(teacher)
    if a.model_type != b.model_type:
        raise ValueError(f"teacher: a {b.model_type} model cannot teach a {a.model_type} student")
    s, t = uncompiled(student), uncompiled(teacher)
    if type(s) is not type(t):
        raise ValueError(f"teacher: a {type(t).__name__} cannot teach a {type(s).__name__} (load both with the same "
                         "class: the same head gives the outputs the loss compares)")
    for key in ("vocab_size", "hidden_size", "num_labels"):
        if getattr(s.config, key, None) != getattr(t.config, key, None):
            raise ValueError(f"teacher: its {key} is {getattr(t.config, key, None)}, the student's "
                             f"{getattr(s.config, key, None)}")
    return a


def _cycle(batches):
    """The batches again and again (a one-shot iterator cannot be repeated: an error says so)."""
    done = 0
    while True:
        n = 0
        for batch in batches:
            n += 1
            done += 1
            yield batch
        if n == 0:
            raise ValueError("batches: expected at least one batch, got none" if done == 0 else
                             f"batches: ran out after {done} steps; pass a list to train for more steps than batches")



def _digest(tensors) -> str:
    """The tensors' shapes, types and bytes, in order (so the same values batched or shaped
    otherwise differ)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()[:16]



def _model_digest(model) -> str:
    """A model a checkpoint was written for (:func:`headprune.hf.checkpoint.weights_digest`:
    names, shapes, types, each tensor's sum and a strided sample, and the config)."""
    from .checkpoint import weights_digest

    return weights_digest(model)



def _tokens(batches) -> Optional[str]:
    """A digest of the batches' tensors (``None`` for a one-shot iterable)."""
    if not isinstance(batches, Sequence):
        return None
    for b in batches:  # before reading them: named as the model's forward would name them
        check_batch(b)
    return _digest(v for b in batches for k in sorted(b) for v in [b[k]] if isinstance(v, torch.Tensor))



def _fingerprint(params: dict, settings: dict, batches, fmt: str = CHECKPOINT_FORMAT) -> dict:
    """What a checkpoint must match: the parameters (names, shapes, dtypes and starting
    values), the settings, and the tokens when ``batches`` is a sequence."""
    return {"format": fmt, **settings, "tokens": _tokens(batches), "start": _digest(params.values()),
            "parameters": [[n, list(p.shape), str(p.dtype)] for n, p in params.items()]}



class _Checkpoint:
    """One file (``torch.save`` of plain tensors and containers, read back with
    ``weights_only``), rewritten atomically: the trained parameters, the optimizer state,
    the steps done and the fingerprint it was written for. The first write also removes the
    temporary files that killed writers left beside it."""

    def __init__(self, path, fingerprint: dict, what: str = "recovery", arg: str = "checkpoint"):
        self.path, self.fingerprint, self.what = os.path.abspath(os.fspath(path)), fingerprint, what
        self.arg = arg  # how refusals name it
        self._swept = False

    def _refuse(self, why: str, ours: bool = True) -> ValueError:
        """The refusal to resume from the file; ``ours=False``: it is no checkpoint of this kind,
        which a run without resume would not write over either (and may be anything of the
        user's, so it is not to be deleted)."""
        return ValueError(f"{self.arg}: {self.path} {why}; pass another path"
                          + (", or delete it to start over" if ours else ""))

    def check_replaceable(self, arg: str = "checkpoint") -> None:
        """``ValueError`` naming ``arg`` when a file at the path is not a checkpoint of this kind
        (see ``refuse_foreign``)."""
        def ours():  # mapped, not read: only the fingerprint is looked at
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            return isinstance(state, dict) and format_kind(state.get("fingerprint", {}).get("format")) == \
                format_kind(self.fingerprint["format"])  # an earlier version's too: this run replaces it

        refuse_foreign(self.path, ours, self.what, "the run", arg)

    def load(self, mmap: bool = False) -> Optional[dict]:
        """The checkpoint's state, refused unless written for this fingerprint (``mmap``: its
        tensors are mapped, not read, for a check that reads only the fingerprint)."""
        if not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # a damaged file: pickle, zip and torch raise many types
            raise self._refuse(f"is not a readable {self.what} checkpoint ({type(e).__name__})", False) from e
        fmt = self.fingerprint["format"]
        saved = state.get("fingerprint", {}).get("format") if isinstance(state, dict) else None
        if saved != fmt and format_kind(saved) == format_kind(fmt):
            raise self._refuse(f"was written by another version of headprune (format {saved!r}; this one reads {fmt!r})")
        if saved != fmt:
            raise self._refuse(f"is not a {self.what} checkpoint (expected format {fmt!r})", False)
        saved = state["fingerprint"]
        diff = [k for k in sorted(saved.keys() | self.fingerprint.keys()) if saved.get(k) != self.fingerprint.get(k)]
        if diff:
            start = "starting values of what it trains" + (" (init)" if self.what == "learned-gates" else "")
            what = {"parameters": "trainable parameters (names, shapes or float types)", "start": start,
                    "tokens": "calibration batches", "teacher": "teacher weights or config",
                    "student": "student weights (those it does not train included) or config",
                    "model": "model weights or config"}
            raise self._refuse("was written for other " + ", ".join(
                what.get(k, f"{k} ({saved.get(k)!r} in the checkpoint, {self.fingerprint.get(k)!r} now)") for k in diff))
        return state

    def save(self, params: dict, optimizer, step: int, extra: Optional[dict] = None) -> None:
        buf = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, "step": step, "optimizer": optimizer.state_dict(),
                    "parameters": {n: p.detach().cpu().clone() for n, p in params.items()},
                    **({"extra": extra} if extra is not None else {})}, buf)
        with writing(self, self.path):  # a killed writer's leftovers hold parameters and optimizer state
            atomic.write_file(self.path, buf.getvalue())



def finite_loss(loss: torch.Tensor, what: str) -> float:
    """The loss's value (the step reports it); ``ValueError`` before a step trains on one that is
    not finite (NaN or inf outputs of the teacher or the student): every later step would train
    on NaN gradients, and the run would end with NaN parameters and checkpoint them."""
    value = loss.item()
    if not math.isfinite(value):
        raise ValueError(f"{what}: the distillation loss of a training batch is {value}: the teacher's or the "
                         "model's outputs are not finite on it; no step trains on such a loss")
    return value


def refuse_other_kind(path, fmt: str = CHECKPOINT_FORMAT, what: str = "recovery", flag: str = "checkpoint") -> None:
    """Before the slow work: ``ValueError`` naming ``flag`` when a file at ``path`` is not a
    checkpoint of ``fmt``'s kind (any version; what it was written for is checked when it is read)."""
    if path is not None:
        _Checkpoint(path, {"format": fmt}, what).check_replaceable(flag)


def checkpoint_steps(path) -> Optional[int]:
    """The steps the checkpoint of this kind at ``path`` holds (``None`` without a readable one),
    read from the mapped file before the slow work."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - no file, or not one of ours: said where it is read
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return step if isinstance(step, int) else None


def open_checkpoint(path, fingerprint: dict, resume: bool, what: str = "recovery",
                    arg: str = "checkpoint") -> Optional["_Checkpoint"]:
    """The run's checkpoint at ``path`` (``None`` without one); a run that does not resume
    refuses a file there that is not a checkpoint of this kind before anything runs."""
    if path is None:
        return None
    if fingerprint.get("tokens") is None:  # other batches would be resumed on without a word
        raise ValueError(f"batches: a {what} with a checkpoint needs its batches as a list (a sequence), which a "
                         "resume compares with the checkpoint's; pass list(batches)")
    ckpt = _Checkpoint(path, fingerprint, what, arg)
    if not resume:
        ckpt.check_replaceable()
    if not os.path.exists(ckpt.path):  # its first save comes after steps that would be lost: probed now
        atomic.check_folder(ckpt.path, arg)
    return ckpt


def _resume(ckpt, params, optimizer, extra: Optional[Callable] = None) -> int:
    """Load the checkpoint's parameters and optimizer state (and its extra state into
    ``extra(state)``); the steps it holds (0 without one)."""
    state = None if ckpt is None else ckpt.load()
    if state is None:
        return 0
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["parameters"][n])
    optimizer.load_state_dict(state["optimizer"])
    if extra is not None:
        extra(state.get("extra"))
    return int(state["step"])



def _bar(progress, done: int, steps: int, desc: str = "headprune: recovering"):
    if progress is not True:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=steps, initial=done, desc=desc, unit="step")



def _loop(step: Callable, batches, steps: int, done: int, budget, progress, ckpt, every: int, save: Callable,
          bar, postfix: Optional[Callable] = None, after: Optional[Callable] = None,
          finish: Optional[Callable] = None, started: Optional[float] = None,
          closing: Optional[Callable] = None) -> tuple:
    """Run ``step(batch, index) -> loss`` from step ``done`` to ``steps`` (``None``: until the
    budget), one batch each (the batches cycled, the ones the first ``done`` steps used
    skipped), calling ``after(n)`` once step ``n`` is done, saving through ``save(n)`` every
    ``every`` steps and at the end when ``ckpt`` is set, reporting to the progress bar or the
    ``progress(step, steps, loss)`` callable. On a normal end, ``finish(n)`` runs before the
    last save. Returns ``(steps done, losses of this call, why it stopped)``.

    ``budget``: seconds since ``started`` (default: now) that the whole call may take. A step
    starts only if it is expected to end in time with what follows the last step: the longest
    of the last eight steps and ``closing()`` seconds (the caller's estimate of what it runs
    after a step that ends the run: a validation pass), with :data:`MARGIN` for a step slower
    than the ones before, and two checkpoint saves as long as the longest seen (under a budget
    the first step of a call is saved, so that a save's time is known before the last one).
    The first step of a call always runs."""
    t0 = time.perf_counter() if started is None else started
    took, saving = collections.deque(maxlen=8), 0.0
    it = _cycle(batches)
    for _ in itertools.islice(it, done):  # the batches the checkpoint's steps used
        pass
    saved, losses, stopped, start = done, [], "steps", done
    try:
        while steps is None or done < steps:
            if budget is not None and took and (time.perf_counter() - t0 + 2 * saving + MARGIN * (
                    max(took) + (closing() if closing is not None else 0.0))) > budget:
                stopped = "time_budget"
                break
            batch = next(it)  # first: an empty list raises its own error here
            began = time.perf_counter()
            losses.append(step(batch, done % len(batches) if isinstance(batches, Sequence) else done))
            took.append(time.perf_counter() - began)
            done += 1
            if after is not None:
                after(done)
            if ckpt is not None and (done % every == 0 or (budget is not None and saved == done - 1 == start)):
                began = time.perf_counter()  # under a budget, the first step saves too: its time is then known
                save(done)
                saving, saved = max(saving, time.perf_counter() - began), done
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", **(postfix() if postfix else {}))
            elif callable(progress):
                progress(done, steps, losses[-1])
    finally:
        if bar is not None:
            bar.close()
    if finish is not None:
        finish(done)
    if ckpt is not None and saved != done:
        save(done)
    return done, losses, stopped


def dtypes_of(model) -> dict:
    """``{(module name, tensor name): dtype}`` of every parameter and buffer."""
    return {(m, n): t.dtype for m, module in model.named_modules()
            for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]}


def cast_back(model, types: dict) -> None:
    """Every parameter and buffer back in the type :func:`dtypes_of` recorded (``model.to(dtype)``
    would also narrow buffers kept wider, such as rotary frequencies in float32)."""
    from ..core.modules import retype

    retype(model, lambda m, module, n, t: types[m, n])
