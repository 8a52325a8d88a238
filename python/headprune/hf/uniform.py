"""Uniform layouts with the fragile layers' heads chosen by measurement.

A uniform selection (``select_heads(..., uniform=True)``) removes the same layout from every
layer, so a standard config describes the result, and that includes the layers the default
recipe keeps whole (:func:`~headprune.ranking.recipes.default_protected`: the first layer of a
causal stack, whose heads mix the raw token embeddings every later layer builds on). There the
ranking's choice within the layout is least reliable: its reconstruction error is measured at
the layer's own output, and what matters is what the error becomes after every later layer.
:func:`measure_uniform` re-chooses those layers' heads among every set of the same layout, by
the model's distillation loss with that set removed (refit), measured as the measured
allocation measures it (:mod:`headprune.hf.allocation`: the first calibration sequences, the
refit computed from the others). A site with more sets than :data:`MAX_OPTIONS` is measured one
KV group at a time instead (:func:`group_sets`: starting from the ranking's set, each group's
heads re-chosen with the others fixed) where that pass costs at most as many forwards.
"""

from __future__ import annotations

import itertools
import time
from typing import Optional

from ..ranking.recipes import UNIFORM_MEASURED_SETS, default_protected
from ..stats.moments import DEFAULT_DAMPING
from ..stats.scores import HeadScores
from .allocation import _bar, measured_part, measuring

__all__ = ["layout_options", "group_sets", "pass_cost", "measure_uniform", "measures", "MAX_OPTIONS"]

#: the most head sets one site's measurement tries (one forward each)
MAX_OPTIONS = UNIFORM_MEASURED_SETS


def layout_options(num_heads: int, num_kv_heads: int, removed) -> list:
    """Every set of heads of one site with the layout of ``removed``: the same number of whole
    KV groups removed and the same number of heads removed from each other group (sorted lists,
    in a fixed order). Raises ``ValueError`` if ``removed`` is not such a layout."""
    hkv = num_kv_heads or num_heads
    size = num_heads // hkv
    groups = [list(range(k * size, (k + 1) * size)) for k in range(hkv)]
    gone = set(removed)
    if not gone <= set(range(num_heads)):
        raise ValueError(f"removed: expected heads in [0, {num_heads}), got {sorted(removed)}")
    per = [len(gone.intersection(g)) for g in groups]
    whole = per.count(size) if size > 0 else 0
    rest = {p for p in per if p != size}
    if len(rest) > 1:
        raise ValueError(f"removed: {sorted(removed)} removes {per} heads from the KV groups; expected a layout "
                         "with the same number from every group not removed whole")
    t = rest.pop() if rest else 0
    options = []
    for full in itertools.combinations(range(hkv), whole):
        others = [k for k in range(hkv) if k not in full]
        for picks in itertools.product(*(itertools.combinations(groups[k], t) for k in others)):
            options.append(sorted([h for k in full for h in groups[k]] + [h for p in picks for h in p]))
    return options


def _group(num_heads: int, num_kv_heads: int, group: int) -> range:
    size = num_heads // (num_kv_heads or num_heads)
    return range(group * size, (group + 1) * size)


def group_sets(num_heads: int, num_kv_heads: int, removed, group: int) -> list:
    """The sets of heads equal to ``removed`` outside KV group ``group`` that remove as many of
    that group's heads (sorted lists, in a fixed order; ``removed`` among them)."""
    members = _group(num_heads, num_kv_heads, group)
    fixed = [h for h in removed if h not in members]
    inside = len(removed) - len(fixed)
    return [sorted(fixed + list(c)) for c in itertools.combinations(members, inside)]


def pass_cost(num_heads: int, num_kv_heads: int, removed) -> int:
    """Forwards of one pass of :func:`group_sets` over every KV group: the starting set, and
    each group's other choices."""
    hkv = num_kv_heads or num_heads
    return 1 + sum(len(group_sets(num_heads, num_kv_heads, removed, g)) - 1 for g in range(hkv))


def _one_group_at_a_time(measure, site: int, num_heads: int, num_kv_heads: int, start) -> tuple:
    """``(chosen set, its loss, the starting set's loss)`` of one pass over the KV groups."""
    losses = {}

    def loss(option):
        key = tuple(option)
        if key not in losses:
            losses[key] = measure(site, option)
        return losses[key]

    current = sorted(start)
    ranked = loss(current)
    for g in range(num_kv_heads or num_heads):
        current = min(group_sets(num_heads, num_kv_heads, current, g), key=loss)  # the first on a tie
    return current, loss(current), ranked


def measures(select: dict, removal: str, scores: HeadScores) -> bool:
    """Whether ``headprune prune --uniform`` (and the sweep's uniform recipe) re-choose the
    first layer's heads for these selection options: a uniform selection by the default
    ranking (no ``score`` or ``order``), removed with the refit, on a model not pruned before
    (the measurement chooses among a site's heads by position). Callers that re-calibrate
    (iterative rounds, the sequential pass) or run on several processes do not measure."""
    return bool(select.get("uniform")) and removal == "refit" and select.get("score") is None \
        and select.get("order") is None and scores.head_ids is None


def measure_uniform(model, batches, scores: HeadScores, heads: dict, *, sites=None,
                    damping: float = DEFAULT_DAMPING, sequences: Optional[int] = None,
                    progress: bool = False) -> tuple:
    """``(heads, report)``: ``heads`` with each of ``sites``' (default: the sites the default
    recipe keeps whole) replaced by the set of the same layout whose removal measured cheapest
    (the lowest in :func:`layout_options`' order on a tie), and per site ``{"options",
    "method", "chosen_loss", "ranked_loss"}`` with the ``seconds`` taken. A site with more than
    :data:`MAX_OPTIONS` sets is measured one KV group at a time (``"method": "groups"``) where
    :func:`pass_cost` is at most :data:`MAX_OPTIONS`, else keeps the ranking's heads
    (``"method": "ranking"``; ``"options"`` says how many sets it had). The model is left
    exactly as it was."""
    if getattr(scores, "moments", None) is None:
        raise ValueError("scores: measuring a layout refits the heads it removes and needs second moments; "
                         "collect with moments=True")
    if scores.head_ids is not None:
        raise ValueError("scores: measure_uniform chooses among a site's heads by position; collect on the "
                         "unpruned model")
    sites = default_protected(scores) if sites is None else tuple(sites)
    every = {s: layout_options(scores.num_heads[s], scores.num_kv_heads[s], heads[s]) for s in sites if heads.get(s)}
    shape = {s: (scores.num_heads[s], scores.num_kv_heads[s]) for s in every}
    todo = {s: o for s, o in every.items() if 1 < len(o) <= MAX_OPTIONS}
    stepwise = {s: pass_cost(*shape[s], heads[s]) for s, o in every.items() if len(o) > MAX_OPTIONS}
    stepwise = {s: n for s, n in stepwise.items() if n <= MAX_OPTIONS}
    report = {s: {"options": len(o), "method": "every set" if s in todo else "groups" if s in stepwise else
                  "ranking"} for s, o in every.items() if len(o) > 1}
    out, start = dict(heads), time.perf_counter()
    if todo or stepwise:
        part = measured_part(batches, sequences)
        bar = _bar(sum(map(len, todo.values())) + sum(stepwise.values()), progress,
                   "headprune: measuring the first layer's head sets")
        with measuring(model, part, scores, damping, bar) as measure:
            for site, options in todo.items():
                losses = [measure(site, o) for o in options]
                best = min(range(len(options)), key=lambda i: (losses[i], i))
                out[site] = options[best]
                report[site].update(chosen_loss=losses[best], ranked_loss=losses[options.index(sorted(heads[site]))])
            for site in stepwise:
                out[site], chosen, ranked = _one_group_at_a_time(measure, site, *shape[site], heads[site])
                report[site].update(chosen_loss=chosen, ranked_loss=ranked)
    return out, {"sites": report, "seconds": time.perf_counter() - start}
