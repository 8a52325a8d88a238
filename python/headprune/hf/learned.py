"""Learned head gates: hard-concrete (L0) gates trained to keep the model's outputs under a
head budget (Voita et al., 2019, on Louizos et al., 2018's relaxation), as a selection score.

Every head ``h`` gets a parameter ``log_alpha[h]``. Each step draws, per head,
``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)`` and the gate
``z = clamp(s * (zeta - gamma) + gamma, 0, 1)`` (beta 2/3, gamma -0.1, zeta 1.1: exactly 0
or 1 with positive probability, differentiable in between), and the model runs with every
head's output multiplied by its gate (:func:`~headprune.hf.gates.gates`; with ``fill``, a
closed head is replaced by its mean output instead of zero, as the refit and mean
compensation replace it). The model's weights never change; only the gates learn.

The loss is the distillation loss of :mod:`headprune.hf.recover` against the ungated model on
the calibration batches (KL of the next-token distributions for causal LMs, 1 - cosine of the
pooled embeddings for encoders). The budget is held exactly instead of penalised: after every
step all ``log_alpha`` shift by the one constant that puts the expected fraction of open gates,
``p = mean_h P(z_h > 0) = mean_h sigmoid(log_alpha_h - beta log(-gamma / zeta))``, at the
target ``q`` (a projection onto the budget, found by bisection), ``q`` falling linearly from
the start's open fraction to ``1 - ratio`` over the first ``warmup`` of the steps. (Lagrange
multipliers on ``p - q``, as in CoFi and Sheared-LLaMA, over- and undershot the target
within the hundred-odd steps a CPU affords.) So only the distillation loss moves heads
relative to each other, and the gates settle on the heads the outputs need most.

The result, ``log_alpha`` as a ``[sites, heads]`` tensor (higher: more needed), ranks heads
for :func:`~headprune.ranking.select_heads` (``score=learned.scores``, lowest pruned first) under
any layout and removal, so learned gates and the one-shot scores compare on equal footing.
A run stops after ``steps`` or ``time_budget_s`` and resumes from its checkpoint exactly (the
gate noise of step ``t`` is drawn from a generator seeded by ``seed`` and ``t``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

import torch

from ..ranking.units import as_count, as_real
from .adapters import encoder_decoder, get_adapter, head_counts, resolve_sites
from .gates import frozen, gates
from .prune import check_scores
from .distil import _kwargs, _loss, _Teacher
from .training import (_bar, _check_run, _digest, _fingerprint, _loop, _model_digest, _resume, finite_loss,
                       check_inputs, open_checkpoint)

__all__ = ["LearnedGates", "learn_gates", "BETA", "GAMMA", "ZETA"]

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
FORMAT = "headprune.learned_gates/5"  # /2: digests of shapes and types too; /3: of every weight; /4: and the config;
# /5: each tensor's exact sum of bits, not its float sum (which depends on the thread count)


@dataclass
class LearnedGates:
    """What :func:`learn_gates` learned: ``scores`` (``log_alpha``, ``[sites, max_heads]``
    float64, NaN past a site's heads; higher = more needed), steps in all (a resumed run's
    earlier ones included), seconds of this call, the distillation loss of the first and the
    last step of this call, the expected fraction of the trained gates open at the end and the
    budget's (``target_open``; protected sites' gates do not train), why it stopped (``"steps"``
    or ``"time_budget"``), the step a resumed run began at and the noise's seed."""

    scores: torch.Tensor
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    open_fraction: float
    target_open: float
    stopped: str
    resumed_from: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scores"] = [[None if math.isnan(v) else v for v in row] for row in self.scores.tolist()]
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}  # valid JSON


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z > 0)`` of hard-concrete gates: the expected L0 norm per gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One hard-concrete draw per gate (see the module doc)."""
    u = torch.rand(log_alpha.shape, generator=generator, dtype=log_alpha.dtype).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _check(ratio, steps, lr, warmup, time_budget_s, checkpoint_every, init, seed) -> tuple:
    """``(steps, checkpoint_every, seed, time_budget_s)``, checked (see ``_check_run``)."""
    if as_real(ratio) is None or not 0 < ratio < 1:
        raise ValueError(f"ratio: expected a fraction of heads to prune in (0, 1), got {ratio!r}")
    steps, checkpoint_every, time_budget_s = _check_run(steps, lr, time_budget_s, checkpoint_every)
    if as_real(warmup) is None or not 0 <= warmup <= 1:
        raise ValueError(f"warmup: expected a fraction of the steps in [0, 1], got {warmup!r}")
    if as_real(init) is None or abs(init) > torch.finfo(torch.float32).max:  # log_alpha is float32
        raise ValueError(f"init: expected a finite log_alpha within float32's range, got {init!r}")
    n = as_count(seed)
    if n is None or n >= 2**40:
        raise ValueError(f"seed: expected an int in [0, 2**40), got {seed!r}")
    return steps, checkpoint_every, n, time_budget_s


def _fill(scores) -> Optional[torch.Tensor]:
    """What a closed gate leaves in a head's place: its mean output (``scores`` of this model,
    checked by ``check_scores``), or ``None`` (zero)."""
    return None if scores is None else torch.nan_to_num(scores.output_mean(), nan=0.0)


def learn_gates(model, batches, *, ratio: float, steps: int = 200, lr: float = 0.05, warmup: float = 0.3,
                scores=None, init: float = 3.0, seed: int = 0, time_budget_s: Optional[float] = None,
                progress: Union[bool, Callable] = False, checkpoint: Optional[Union[str, os.PathLike]] = None,
                checkpoint_every: int = 10, resume: bool = False, protect_layers: Sequence[int] = (),
                per_layer: bool = False) -> LearnedGates:
    """Train hard-concrete gates on ``model``'s heads for ``steps`` steps (one calibration
    batch per step, cycling through ``batches``, a list of dicts as the model's forward
    takes them) so that about ``1 - ratio`` of them stay open; see the module doc.

    Args:
        protect_layers: sites (attention-site indices) whose gates stay open and do not train,
            as the selection keeps them whole: ``ratio`` is of the other sites' heads, and the
            returned scores of these sites are ``init``.
        per_layer: hold each trained site's expected open fraction at ``1 - ratio`` (as a
            selection that spreads the budget evenly over the layers removes), rather than the
            mean over all trained heads.
        scores: ``HeadScores`` with output statistics (``headprune.collect``): a closed gate
            leaves the head's mean output (as the refit and mean compensation do); ``None``:
            zero, as ``head_mask`` and ``removal="zero"``.
        lr: Adam's learning rate for ``log_alpha``.
        init: ``log_alpha`` at the start (3: every gate open with probability about 0.99).
        warmup: fraction of ``steps`` over which the target falls from the start's open
            fraction (``init``'s) to ``1 - ratio``.
        time_budget_s / progress / checkpoint / checkpoint_every / resume: as in
            :func:`headprune.hf.recover.recover` (the checkpoint holds the gates, the
            optimizer and the step).

    The model's weights, ``requires_grad`` flags and train/eval mode are as they were on
    every exit; it runs in eval mode (no dropout).
    """
    started = time.perf_counter()
    steps, checkpoint_every, seed, time_budget_s = _check(ratio, steps, lr, warmup, time_budget_s, checkpoint_every,
                                                          init, seed)
    ratio, lr, warmup, init = map(as_real, (ratio, lr, warmup, init))  # numpy and tensor numbers as floats
    check_inputs(batches, progress, "learn_gates", model=model)
    if resume and checkpoint is None:
        raise ValueError("resume: needs a checkpoint path")
    adapter = get_adapter(model)
    if encoder_decoder(model, adapter):
        raise ValueError(f"model: learned gates handle causal LMs and encoders, not {adapter.model_type} (seq2seq)")
    sites = resolve_sites(model, adapter)
    num_heads = [head_counts(s, adapter)[0] for s in sites]
    if scores is not None:
        check_scores(model, scores)  # of this model as it is: its family, layout, kept heads and weights
    fill = _fill(scores)
    protect, per_layer = _check_budget(protect_layers, per_layer, len(sites))
    heads = torch.zeros(len(sites), max(num_heads), dtype=torch.bool)
    for i, h in enumerate(num_heads):
        heads[i, :h] = True
    valid = heads.clone()  # the gates that train
    valid[protect] = False
    params = {"log_alpha": torch.full(valid.shape, float(init), dtype=torch.float32, requires_grad=True)}
    settings = {"ratio": float(ratio), "steps": steps, "lr": float(lr), "warmup": float(warmup), "seed": seed,
                "fill": f"mean {_digest([fill])}" if fill is not None else "zero", "model": _model_digest(model),
                "heads": num_heads, **({"protect_layers": protect} if protect else {}),
                **({"per_layer": True} if per_layer else {})}  # absent by default: earlier checkpoints resume
    ckpt = open_checkpoint(checkpoint, _fingerprint(params, settings, batches, FORMAT), resume, "learned-gates")
    optimizer = torch.optim.Adam([params["log_alpha"]], lr=lr)
    with frozen(model), torch.enable_grad():  # gradients for the gates even when called under no_grad
        opens = (float(open_probability(torch.tensor(float(init)))), 1.0 - float(ratio))
        return _run(model, batches, params, (valid, heads, per_layer), optimizer, fill, opens, steps, warmup, seed,
                    time_budget_s, progress, ckpt, checkpoint_every, resume, started)


def _check_budget(protect_layers, per_layer, sites: int) -> tuple:
    """``(sorted protected sites, per_layer)``, checked against the model's ``sites``."""
    if isinstance(protect_layers, (str, bytes)) or not hasattr(protect_layers, "__iter__"):
        raise TypeError(f"protect_layers: expected a sequence of site indices, got {type(protect_layers).__name__}")
    protect = [as_count(i) for i in protect_layers]
    if any(i is None or i >= sites for i in protect):
        raise ValueError(f"protect_layers: expected site indices in [0, {sites}), got {list(protect_layers)!r}")
    if len(set(protect)) == sites:
        raise ValueError(f"protect_layers: every one of the {sites} sites is protected; no gate is left to train")
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer: expected True or False, got {type(per_layer).__name__}")
    return sorted(set(protect)), per_layer


def _target(step: int, steps: int, warmup: float, keep: float, start: float) -> float:
    """The open fraction after step ``step`` (1-based): ``start`` falling linearly to ``keep``."""
    ramp = max(1, round(warmup * steps))
    return keep if step >= ramp else start - (start - keep) * step / ramp


@torch.no_grad()
def project(log_alpha: torch.Tensor, valid: torch.Tensor, target: float, per_layer: bool = False) -> None:
    """Shift ``log_alpha[valid]`` by the constant that makes the mean open probability
    ``target`` (bisection: the mean is increasing in the shift); ``per_layer``: each site (row)
    by its own constant, to its own mean ``target``."""
    if per_layer:
        for i in valid.any(1).nonzero().flatten().tolist():
            project(log_alpha[i], valid[i], target)
        return
    la = log_alpha[valid].double()
    lo, hi = -60.0 - la.max().item(), 60.0 - la.min().item()
    for _ in range(60):
        mid = (lo + hi) / 2
        if open_probability(la + mid).mean().item() < target:
            lo = mid
        else:
            hi = mid
    log_alpha[valid] += (lo + hi) / 2


def _run(model, batches, params, gated, optimizer, fill, opens, steps, warmup, seed, budget, progress, ckpt,
         every, resume, t0: float) -> LearnedGates:
    start_open, keep = opens
    valid, heads, per_layer = gated  # the gates that train; every head's; one budget per site
    done = start = _resume(ckpt, params, optimizer) if resume else 0
    teacher = _Teacher(model, cache=isinstance(batches, Sequence))
    log_alpha = params["log_alpha"]

    taken = done  # steps in all, a resumed run's earlier ones included: the noise and the target follow it

    def step(batch, index: int) -> float:
        nonlocal taken
        kw = _kwargs(model, batch)
        target = teacher(index, kw)  # the ungated model: no gates are hooked here
        z = sample_gates(log_alpha, torch.Generator().manual_seed(seed * 1_000_003 + taken))
        with gates(model, values=z.masked_fill(~valid, 1.0), fill=fill):
            distill = _loss(model, target, kw, teacher.modes)
        value = finite_loss(distill, "learn_gates")
        optimizer.zero_grad(set_to_none=True)
        distill.backward()
        optimizer.step()
        taken += 1
        project(log_alpha, valid, _target(taken, steps, warmup, keep, start_open), per_layer)
        return value

    def postfix() -> dict:
        return {"open": f"{open_probability(log_alpha.detach())[valid].mean().item():.2f}"}

    done, losses, stopped = _loop(step, batches, steps, done, budget, progress, ckpt, every,
                                  lambda n: ckpt.save(params, optimizer, n),
                                  _bar(progress, done, steps, "headprune: learning gates"), postfix, started=t0)
    out = log_alpha.detach().double().masked_fill(~heads, math.nan)  # protected sites: init
    return LearnedGates(out, done, round(time.perf_counter() - t0, 3), losses[0] if losses else math.nan,
                        losses[-1] if losses else math.nan,
                        float(open_probability(log_alpha.detach())[valid].mean()), keep, stopped, start, seed)
