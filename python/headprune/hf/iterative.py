"""Iterative pruning: prune a share of the budget, re-collect on the pruned model, repeat.

Removing heads changes what the remaining heads attend to, so statistics measured on the
full model go stale as the pruned fraction grows. ``select_iteratively`` reaches the budget
in rounds; before each round the heads chosen so far are masked (exact, see
:func:`mask_heads`) and the statistics are collected again on the masked model. The model
is returned unmasked: the caller masks or prunes the selection it gets back.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable, Optional, Union

from ..ranking import DEFAULT_GQA, budget, count_units, select_heads
from ..ranking.units import count_arg
from ..stats.moments import DEFAULT_DAMPING
from ..stats.scores import HeadScores
from .collect import collect
from .prune import mask_heads

__all__ = ["select_iteratively", "auto_steps", "AUTO_STEP"]

#: the largest share of the units one round of ``steps="auto"`` prunes
AUTO_STEP = 0.1


def auto_steps(units: int, total: int) -> int:
    """Rounds of ``steps="auto"`` for pruning ``units`` of ``total``."""
    return max(1, math.ceil(units / max(1, total) / AUTO_STEP - 1e-9))


def select_iteratively(
    model,
    batches: Iterable,
    *,
    steps: Union[int, str] = "auto",
    ratio: Optional[float] = None,
    count: Optional[int] = None,
    scores: Optional[HeadScores] = None,
    progress: bool = False,
    compensate: bool = False,
    removal: Optional[str] = None,
    damping: float = DEFAULT_DAMPING,
    on_step: Optional[Callable[[int, HeadScores, dict], None]] = None,
    collect_fn: Optional[Callable] = None,
    fresh: bool = False,
    **select_kwargs,
) -> tuple:
    """Heads to prune, chosen in rounds of collection and selection.

    Args:
        model, batches: as for :func:`collect` (``batches`` is read once per round, so it
            must be re-iterable: a list, not a generator).
        steps: number of rounds (1 = ordinary one-shot selection), or ``"auto"``: as many
            as it takes to prune ``AUTO_STEP`` (10%) of the units per round (each round's
            cumulative share is rounded down to whole units or, with even layouts, to layouts,
            so a round can take a unit more or fewer; under even layouts, fewer still where its
            share would put the final budget out of the later rounds' reach).
        ratio / count: the final budget, as for :func:`headprune.select_heads`; round ``i``
            of ``n`` prunes up to ``i / n`` of it.
        scores: statistics of the unpruned model, if already collected (saves the first
            collection; they rank round 1 only, and round 2 collects on ``batches`` whatever
            round 1 chose, unless ``fresh``: they are what ``collect_fn`` gives on ``batches``,
            with the moments the rounds collect, so a round 1 that chose no head leaves them as
            round 2's).
        compensate: mask the heads of earlier rounds with mean compensation (see
            :func:`mask_heads`), as they will be pruned (``removal="mean"``).
        removal: how earlier rounds' heads are masked: ``"refit"`` (least squares, with
            ``damping``), ``"mean"`` or ``"zero"``; every round gathers second moments for a
            refit and for the default recipe's (or ``score="reconstruction"``) ranking;
            ``None``: ``"mean"`` if ``compensate`` else ``"zero"``.
        on_step: called after each round with ``(round, scores, heads so far)`` (a round after
            one that chose no head more reuses its statistics: the model is as it was).
        collect_fn: ``collect_fn(model, batches, progress=..., moments=...)`` replaces :func:`collect`
            (``moments=True`` is passed where the refit or the ranking needs second moments),
            e.g. :func:`headprune.distributed.collect` (every rank then runs the same rounds
            on the same all-reduced statistics and arrives at the same selection).
        select_kwargs: the recipe and constraints (``score``, ``order``, ``scope``,
            ``min_heads_per_layer``, ``protect_layers``, ``gqa``, ``seed``).

    Returns ``(heads, scores)``: the selection ``{layer: [heads]}`` and the statistics of the
    last round (whose output means are the ones to compensate with: they were measured with
    every earlier round's heads removed). The model is left exactly as it was (masks
    restored on any exit).
    """
    if not (isinstance(steps, str) and steps == "auto"):
        steps = count_arg("steps", steps, "a positive int or 'auto'")
    if steps != 1 and not hasattr(batches, "__len__"):
        raise TypeError("batches: iterative selection reads the batches once per round; pass a list, not an iterator")
    _check_options(scores, compensate, on_step, collect_fn, ratio, count, fresh)
    removal = _removal(removal, compensate)
    if steps != "auto":
        _refuse_rounds(steps, select_kwargs)  # before the first collection
    gather = _gather(model, collect if collect_fn is None else collect_fn, removal, scores, select_kwargs)
    heads, handles = {}, []
    try:
        stale = scores is not None and not fresh  # given ones rank round 1 only: the rounds' own may differ
        if scores is None:
            scores = gather(model, batches, progress=progress)
        total = count_units(scores, select_kwargs.get("gqa", "query"))
        want = budget(ratio, count, total)  # validates ratio/count once
        if steps == "auto":
            steps = auto_steps(want, total)
        _refuse_rounds(steps, select_kwargs)
        for step in range(1, steps + 1):  # collected again after a round that masked heads: else the same sums
            if step > 1 and stale:
                scores = gather(model, batches, progress=progress)
            kw = dict(select_kwargs)
            if ratio is not None:
                kw["ratio"] = ratio * step / steps
            else:
                kw["count"] = count * step // steps
            new = select_heads(scores, pruned=heads, damping=damping, **kw)
            if step < steps and select_kwargs.get("gqa", DEFAULT_GQA) == "even":
                new = _in_reach(scores, heads, new, {**kw, **_final(ratio, count)}, damping)
            added = {layer: [h for h in hs if h not in heads.get(layer, [])] for layer, hs in new.items()}
            added = {layer: hs for layer, hs in added.items() if hs}
            heads = new
            if on_step is not None:
                on_step(step, scores, heads)
            stale = (stale and step == 1) or (step < steps and bool(added))
            if step < steps and added:
                handles.append(_mask_round(model, added, removal, scores, damping))
    finally:
        for h in reversed(handles):
            h.restore()
    return heads, scores


def _removal(removal: Optional[str], compensate: bool) -> str:
    """How earlier rounds' heads are masked (``None``: as ``compensate`` says), checked."""
    removal = ("mean" if compensate else "zero") if removal is None else removal
    if removal not in ("refit", "mean", "zero"):
        raise ValueError(f"removal: expected 'refit', 'mean' or 'zero', got {removal!r}")
    return removal


def _mask_round(model, added: dict, removal: str, scores, damping: float):
    """A round's heads masked as ``removal`` removes them (the handle, for the restore)."""
    how = {"refit": {"reconstruct": scores, "damping": damping}, "mean": {"compensate": scores}, "zero": {}}
    return mask_heads(model, added, **how[removal])


def _final(ratio, count) -> dict:
    return {"ratio": ratio} if ratio is not None else {"count": count}


def _in_reach(scores, heads: dict, new: dict, final: dict, damping: float) -> dict:
    """``new``, a round's selection nesting ``heads``; or, where no later round could reach as
    much of the ``final`` budget from it as from ``heads`` (even layouts: a round's share can
    take a layout in one layer that no layout of another layer completes), a selection inside
    the final budget's selection from ``heads``: its layers at their final layouts, those the
    round chose alike first, then those whose increments ``new`` overlaps most, up to the
    round's size (every layer at a layout of its final selection or as it was; ``heads`` where
    even that leaves the budget out of reach)."""
    def chosen(sel):
        return sum(map(len, sel.values()))

    goal = select_heads(scores, pruned=heads, damping=damping, **final)
    if chosen(select_heads(scores, pruned=new, damping=damping, **final)) >= chosen(goal):
        return new
    grown = {k: v for k, v in goal.items() if sorted(v) != sorted(heads.get(k, []))}
    order = sorted(grown, key=lambda k: (sorted(new.get(k, [])) != sorted(grown[k]),
                                         -len(set(new.get(k, [])) & set(grown[k])), k))
    out, room = {k: list(v) for k, v in heads.items()}, chosen(new)
    for k in order:
        if chosen(out) - len(out.get(k, [])) + len(grown[k]) <= room:
            out[k] = list(grown[k])
    out = {k: v for k, v in out.items() if v}
    return out if chosen(select_heads(scores, pruned=out, damping=damping, **final)) >= chosen(goal) else heads


def _check_options(scores, compensate, on_step, collect_fn, ratio, count, fresh) -> None:
    """Refused by name before the first collection (a string flag read as true, a callback that
    fails after a round, a budget out of range: its total is known after the collection)."""
    budget(ratio, count, 1 << 62)
    if not isinstance(fresh, bool) or (fresh and scores is None):
        raise ValueError(f"fresh: expected a bool, True only with scores, got {fresh!r}")
    if scores is not None and not isinstance(scores, HeadScores):
        raise TypeError(f"scores: expected HeadScores (collect(...)) or None, got {type(scores).__name__}")
    if not isinstance(compensate, bool):
        raise TypeError(f"compensate: expected a bool, got {type(compensate).__name__}")
    for name, fn in (("on_step", on_step), ("collect_fn", collect_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}: expected a callable or None, got {type(fn).__name__}")


def _gather(model, gather, removal: str, scores, select_kwargs: dict):
    """The collection of every round: with second moments for the refit or the default's score
    (a plain torch model has neither: its default is the fallback's), which given ``scores``
    must hold too, or round 1 would rank by another recipe than the rounds after it."""
    if not (hasattr(model, "config") and (removal == "refit" or select_kwargs.get("score") in (None, "reconstruction"))):
        return gather
    if scores is not None and scores.moments is None:
        raise ValueError("scores: have no second moments, which the refit and the default ranking of every other "
                         "round use; collect them with collect(..., moments=True), or leave scores out")
    return partial(gather, moments=True)


def _refuse_rounds(steps: int, select_kwargs: dict) -> None:
    """``kv_ratio`` is a share of the KV heads one selection removes: an early round's share of
    the query heads cannot hold it (and would fail or take more than its share); a uniform
    layout is one selection too (a later round's would not keep the earlier heads)."""
    if steps > 1 and select_kwargs.get("kv_ratio"):
        raise ValueError(f"kv_ratio: applies to one selection, not to {steps} rounds; pass steps=1 or drop kv_ratio")
    if steps > 1 and select_kwargs.get("uniform"):
        raise ValueError(f"uniform: one layout for every layer is chosen in one selection, not in {steps} rounds; "
                         "pass steps=1 or drop uniform")
