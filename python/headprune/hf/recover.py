"""Recovery after pruning: a short distillation of the pruned model (the student) toward the
unpruned one (the teacher) on the calibration batches.

* Causal LMs (the output has ``logits``): KL(teacher || student) of the next-token
  distributions at temperature 1, averaged over the valid (non-padded) positions.
* Encoders (``last_hidden_state``): 1 - cosine similarity of the mean-pooled last hidden
  states (the sentence-embedding fidelity itself), averaged over the batch.

Only the attention sites' projections train (``train``: ``"attention"``, the q/k/v/o weights
and biases, or ``"o_proj"``, the output projections' only); everything else is frozen,
embeddings always. On SmolLM2-135M with half its heads pruned, a step of ``"attention"``
closed more of the perplexity gap per CPU-minute than ``"o_proj"`` (benchmarks/bench_recover.py).
The head layout never changes. AdamW at a constant learning rate, so a run can be
stopped after any step (``time_budget_s``) and resumed from a checkpoint exactly.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .. import atomic
from ..prune.mask import active_masks
from .adapters import get_adapter, resolve_sites
from .batches import forward_kwargs

__all__ = ["RecoverReport", "TRAIN", "distillation_loss", "recover", "trainable_parameters"]

#: what ``train`` may name: which projections of each attention site train
TRAIN = {"o_proj": ("o",), "attention": ("q", "k", "v", "qkv", "o")}
DEFAULT_LR = 1e-4
CHECKPOINT_FORMAT = "headprune.recover/1"


@dataclass
class RecoverReport:
    """What :func:`recover` did: steps run (in all, a resumed run's earlier ones included),
    seconds of this call, the distillation loss of the first and the last step of this call
    (nats per token for causal LMs, 1 - cosine for encoders), the trainable parameter count
    and why it stopped (``"steps"`` or ``"time_budget"``)."""

    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    train: str
    parameters: int
    stopped: str
    resumed_from: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


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


def _check_run(steps, lr, time_budget_s, checkpoint_every) -> None:
    """The options every training run here takes (:func:`recover`, ``learn_gates``)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (0 < lr < math.inf):
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    if time_budget_s is not None and not (isinstance(time_budget_s, (int, float)) and time_budget_s > 0):
        raise ValueError(f"time_budget_s: expected a positive number of seconds or None, got {time_budget_s!r}")
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected a positive int, got {checkpoint_every!r}")


def _check(student, teacher, steps, lr, train, time_budget_s, checkpoint_every) -> None:
    _check_run(steps, lr, time_budget_s, checkpoint_every)
    if train not in TRAIN:
        raise ValueError(f"train: expected one of {', '.join(TRAIN)}, got {train!r}")
    a, b = get_adapter(student), get_adapter(teacher)
    if a.model_type != b.model_type:
        raise ValueError(f"teacher: a {b.model_type} model cannot teach a {a.model_type} student")
    if a.kind == "seq2seq":
        raise ValueError(f"student: recovery handles causal LMs and encoders, not {a.model_type} (seq2seq)")
    if student is teacher:
        raise ValueError("teacher: is the student itself; pass the unpruned model")
    if active_masks(student):  # masked heads are zero columns of o: their gradients would revive them
        raise ValueError("student: has heads masked by mask_heads, which training would revive; "
                         "remove them with prune_heads first")


def _kwargs(model, batch) -> dict:
    kw = forward_kwargs(model, batch)
    if "logits_to_keep" in kw:
        kw["logits_to_keep"] = 0  # every position's distribution
    return kw


def _pool(h: torch.Tensor, mask) -> torch.Tensor:
    """Mean over the valid positions: ``[B, S, hidden]`` -> ``[B, hidden]`` float32."""
    m = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device).float()
    m = m.unsqueeze(-1)
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1)


class _Teacher:
    """The teacher's target for a batch: its next-token logits (causal LMs) or its pooled last
    hidden states (encoders). With ``cache``, each batch's target is kept by its index after
    its first use: the pooled states themselves, or the input of the teacher's LM head, from
    which the head gives back the exact logits for a fraction of a forward pass (checked bit
    for bit; a model that transforms the head's output further, e.g. by soft-capping, is not
    cached). The cache holds [batch, seq, hidden] per batch in the model's dtype."""

    def __init__(self, teacher, cache: bool):
        self.model, self.cache = teacher, ({} if cache else None)
        get = getattr(teacher, "get_output_embeddings", None)
        self.head = get() if callable(get) else None

    @torch.no_grad()
    def __call__(self, index: int, kw: dict) -> torch.Tensor:
        hit = None if self.cache is None else self.cache.get(index)
        if hit is not None:
            return self.head(hit[1]) if hit[0] else hit[1]
        seen = []
        hook = None if self.head is None else self.head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            out = self.model(**kw)
        finally:
            if hook is not None:
                hook.remove()
        if getattr(out, "logits", None) is None:
            target = _pool(out.last_hidden_state, kw.get("attention_mask"))
            entry = (False, target)
        else:
            target = out.logits
            entry = (True, seen[0]) if len(seen) == 1 and torch.equal(self.head(seen[0]), target) else None
        if self.cache is not None:
            if entry is None:
                self.cache = None  # this model's logits cannot be rebuilt from the head's input
            else:
                self.cache[index] = entry
        return target


def _loss(student, target: torch.Tensor, kw: dict) -> torch.Tensor:
    """The distillation loss of one batch (see the module doc) against the teacher's ``target``."""
    out = student(**kw)
    mask = kw.get("attention_mask")
    if getattr(out, "logits", None) is None:
        return (1 - F.cosine_similarity(_pool(out.last_hidden_state, mask), target.float(), dim=-1)).mean()
    log_s = F.log_softmax(out.logits.float(), -1)
    log_t = F.log_softmax(target.float(), -1)
    per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.device, per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1)


def distillation_loss(student, teacher, batch) -> torch.Tensor:
    """The loss :func:`recover` minimises, on one batch (with gradients for the student)."""
    kw = _kwargs(student, batch)
    return _loss(student, _Teacher(teacher, cache=False)(0, kw), kw)


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
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint(params: dict, settings: dict, batches, fmt: str = CHECKPOINT_FORMAT) -> dict:
    """What a checkpoint must match: the parameters (names, shapes, dtypes and starting
    values), the settings, and the tokens when ``batches`` is a sequence."""
    tokens = None
    if isinstance(batches, Sequence):
        tokens = _digest(v for b in batches for k in sorted(b) for v in [b[k]] if isinstance(v, torch.Tensor))
    return {"format": fmt, **settings, "tokens": tokens, "start": _digest(params.values()),
            "parameters": [[n, list(p.shape), str(p.dtype)] for n, p in params.items()]}


class _Checkpoint:
    """One file (``torch.save`` of plain tensors and containers, read back with
    ``weights_only``), rewritten atomically: the trained parameters, the optimizer state,
    the steps done and the fingerprint it was written for."""

    def __init__(self, path, fingerprint: dict, what: str = "recovery"):
        self.path, self.fingerprint, self.what = os.path.abspath(os.fspath(path)), fingerprint, what

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"checkpoint: {self.path} {why}; delete it or start without resume")

    def load(self) -> Optional[dict]:
        if not os.path.exists(self.path):
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: pickle, zip and torch raise many types
            raise self._refuse(f"is not a readable {self.what} checkpoint ({type(e).__name__})") from e
        fmt = self.fingerprint["format"]
        if not isinstance(state, dict) or state.get("fingerprint", {}).get("format") != fmt:
            raise self._refuse(f"is not a {self.what} checkpoint (expected format {fmt!r})")
        saved = state["fingerprint"]
        diff = [k for k in sorted(saved.keys() | self.fingerprint.keys()) if saved.get(k) != self.fingerprint.get(k)]
        if diff:
            what = {"parameters": "the trainable parameters (names or shapes)", "start": "the student's starting "
                    "weights", "tokens": "the calibration batches"}
            raise self._refuse("was written for other " + ", ".join(
                what.get(k, f"{k} ({saved.get(k)!r} in the checkpoint, {self.fingerprint.get(k)!r} now)") for k in diff))
        return state

    def save(self, params: dict, optimizer, step: int) -> None:
        buf = io.BytesIO()
        torch.save({"fingerprint": self.fingerprint, "step": step, "optimizer": optimizer.state_dict(),
                    "parameters": {n: p.detach().cpu().clone() for n, p in params.items()}}, buf)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic.write_file(self.path, buf.getvalue())
        except OSError as e:
            message = f"checkpoint: cannot write {self.path} ({e.strerror or e})"
            raise (OSError(e.errno, message) if e.errno else OSError(message)) from e


@contextmanager
def _training(student, params: dict):
    """Only ``params`` require gradients inside; on an exception (a ``KeyboardInterrupt``
    too) they get back the values they entered with, bit for bit; on every exit the
    ``requires_grad`` flags are restored and the student is in eval mode."""
    flags = {p: p.requires_grad for p in student.parameters()}
    saved = [p.detach().clone() for p in params.values()]
    try:
        for p in student.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        yield
    except BaseException:
        with torch.no_grad():
            for p, s in zip(params.values(), saved):
                p.copy_(s)
                p.grad = None
        raise
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        student.eval()


def recover(student, teacher, batches, *, steps: int, lr: float = DEFAULT_LR, train: str = "attention",
            time_budget_s: Optional[float] = None, progress: Union[bool, Callable] = False,
            checkpoint: Optional[Union[str, os.PathLike]] = None, checkpoint_every: int = 10,
            resume: bool = False) -> RecoverReport:
    """Distil ``student`` (a pruned model, changed in place) toward ``teacher`` (the unpruned
    one, never changed) for ``steps`` optimizer steps, one calibration batch per step,
    cycling through ``batches`` (a list; dicts as the model's forward takes them).

    Args:
        lr: AdamW's learning rate (constant; no weight decay).
        train: ``"attention"`` (the default: the q/k/v/o weights and biases of every
            attention site) or ``"o_proj"`` (the output projections' only). Nothing else trains.
        time_budget_s: stop after the step that passes this many seconds (of this call).
        progress: ``True`` for a progress bar, or a callable ``progress(step, steps, loss)``
            called after every step (an exception it raises stops the run like any other).
        checkpoint: a file rewritten atomically every ``checkpoint_every`` steps and at the
            end with the trained parameters, the optimizer state and the step.
        resume: continue from ``checkpoint`` if it exists (refused, with the reason, when it
            was written for other parameters, settings, starting weights or batches).

    On any exception, ``KeyboardInterrupt`` included, the student's weights are restored
    exactly as they were; on every exit its ``requires_grad`` flags are as they were and it
    is in eval mode. Training runs in eval mode (no dropout: the targets are exact).
    """
    _check(student, teacher, steps, lr, train, time_budget_s, checkpoint_every)
    if resume and checkpoint is None:
        raise ValueError("resume: needs a checkpoint path")
    params = trainable_parameters(student, train)
    if not params:
        raise ValueError(f"student: has no {train} parameters to train")
    settings = {"train": train, "lr": float(lr), "loss": "kl" if get_adapter(student).kind == "causal" else "cosine"}
    ckpt = None if checkpoint is None else _Checkpoint(checkpoint, _fingerprint(params, settings, batches))
    teacher_mode = teacher.training
    teacher.eval()
    try:
        with _training(student, params):
            return _run(student, teacher, batches, params, steps, lr, time_budget_s, progress, ckpt,
                        checkpoint_every, resume, train)
    finally:
        teacher.train(teacher_mode)


def _resume(ckpt, params, optimizer) -> int:
    """Load the checkpoint's parameters and optimizer state; the steps it holds (0 without one)."""
    state = None if ckpt is None else ckpt.load()
    if state is None:
        return 0
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["parameters"][n])
    optimizer.load_state_dict(state["optimizer"])
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
          bar, postfix: Optional[Callable] = None) -> tuple:
    """Run ``step(batch, index) -> loss`` from step ``done`` to ``steps``, one batch each (the
    batches cycled, the ones the first ``done`` steps used skipped), saving through ``save(n)``
    every ``every`` steps and at the end when ``ckpt`` is set, reporting to the progress bar or
    the ``progress(step, steps, loss)`` callable, stopping after the step that passes
    ``budget`` seconds. Returns ``(steps done, losses of this call, why it stopped)``."""
    t0 = time.perf_counter()
    it = _cycle(batches)
    for _ in itertools.islice(it, done):  # the batches the checkpoint's steps used
        pass
    saved, losses, stopped = done, [], "steps"
    try:
        while done < steps:
            batch = next(it)  # first: an empty list raises its own error here
            losses.append(step(batch, done % len(batches) if isinstance(batches, Sequence) else done))
            done += 1
            if ckpt is not None and done % every == 0:
                save(done)
                saved = done
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", **(postfix() if postfix else {}))
            elif callable(progress):
                progress(done, steps, losses[-1])
            if budget is not None and done < steps and time.perf_counter() - t0 >= budget:
                stopped = "time_budget"
                break
    finally:
        if bar is not None:
            bar.close()
    if ckpt is not None and saved != done:
        save(done)
    return done, losses, stopped


def _run(student, teacher, batches, params, steps, lr, budget, progress, ckpt, every, resume, train) -> RecoverReport:
    t0 = time.perf_counter()
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    done = start = _resume(ckpt, params, optimizer) if resume else 0
    targets = _Teacher(teacher, cache=isinstance(batches, Sequence))

    def step(batch, index: int) -> float:
        kw = _kwargs(student, batch)
        loss = _loss(student, targets(index, kw), kw)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    done, losses, stopped = _loop(step, batches, steps, done, budget, progress, ckpt, every,
                                  lambda n: ckpt.save(params, optimizer, n), _bar(progress, done, steps))
    return RecoverReport(done, round(time.perf_counter() - t0, 3), losses[0] if losses else math.nan,
                         losses[-1] if losses else math.nan, train, sum(p.numel() for p in params.values()),
                         stopped, start)
