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
heads re-chosen with the others fixed) where that pass costs at most as many forwards. An
encoder's default measures every layer (the measured allocation), so its uniform layout is
re-chosen in every layer the same way: greedily, the head whose removal costs least at each
count up to the layout's.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Optional

from ..prune.heads import normalize_heads
from ..ranking.layouts import has_grouped_queries
from ..ranking.recipes import UNIFORM_MEASURED_SETS, default_protected, is_causal
from ..stats.moments import DEFAULT_DAMPING
from ..stats.scores import HeadScores
from .adapters import get_adapter, resolve_sites
from .allocation import _bar, measured_part, measuring
from .prune import check_scores

__all__ = ["layout_options", "layout_count", "group_sets", "pass_cost", "measure_uniform", "measures", "MAX_OPTIONS"]

#: the most head sets one site's measurement tries (one forward each)
MAX_OPTIONS = UNIFORM_MEASURED_SETS


def _layout(num_heads: int, num_kv_heads: int, removed) -> tuple:
    """``(KV groups, size, whole, t)`` of ``removed``: ``whole`` groups removed whole and ``t``
    heads from each other group; ``ValueError`` if it is not such a layout."""
    hkv = num_kv_heads or num_heads
    size = num_heads // hkv
    groups = [range(k * size, (k + 1) * size) for k in range(hkv)]
    gone = set(removed)
    if not gone <= set(range(num_heads)):
        raise ValueError(f"removed: expected heads in [0, {num_heads}), got {sorted(removed)}")
    per = [len(gone.intersection(g)) for g in groups]
    rest = {p for p in per if p != size}
    if len(rest) > 1:
        raise ValueError(f"removed: {sorted(removed)} removes {per} heads from the KV groups; expected a layout "
                         "with the same number from every group not removed whole")
    return groups, size, per.count(size) if size > 0 else 0, rest.pop() if rest else 0


def layout_count(num_heads: int, num_kv_heads: int, removed) -> int:
    """How many sets :func:`layout_options` has, without listing them."""
    groups, size, whole, t = _layout(num_heads, num_kv_heads, removed)
    return math.comb(len(groups), whole) * math.comb(size, t) ** (len(groups) - whole)


def layout_options(num_heads: int, num_kv_heads: int, removed) -> list:
    """Every set of heads of one site with the layout of ``removed``: the same number of whole
    KV groups removed and the same number of heads removed from each other group (sorted lists,
    in a fixed order). Raises ``ValueError`` if ``removed`` is not such a layout."""
    groups, _, whole, t = _layout(num_heads, num_kv_heads, removed)
    options = []
    for full in itertools.combinations(range(len(groups)), whole):
        others = [k for k in range(len(groups)) if k not in full]
        for picks in itertools.product(*(itertools.combinations(groups[k], t) for k in others)):
            options.append(sorted([h for k in full for h in groups[k]] + [h for p in picks for h in p]))
    return options


def group_sets(num_heads: int, num_kv_heads: int, removed, group: int) -> list:
    """The sets of heads equal to ``removed`` outside KV group ``group`` that remove as many of
    that group's heads (sorted lists, in a fixed order; ``removed`` among them)."""
    members = _layout(num_heads, num_kv_heads, removed)[0][group]
    fixed = [h for h in removed if h not in members]
    return [sorted(fixed + list(c)) for c in itertools.combinations(members, len(removed) - len(fixed))]


def pass_cost(num_heads: int, num_kv_heads: int, removed) -> int:
    """Forwards of one pass of :func:`group_sets` over every KV group: the starting set, and
    each partly removed group's other choices."""
    groups, size, whole, t = _layout(num_heads, num_kv_heads, removed)
    return 1 + (len(groups) - whole) * (math.comb(size, t) - 1)


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


def refits_bias(model) -> bool:
    """Whether a uniform layout of ``model`` is refit with its output bias (``mask_heads(...,
    refit_bias=)``): not where the family's config describes the layout but declares no
    attention bias and no output projection has one (mistral, qwen2, phi3, t5), so that the
    config stays plain; the kept columns are then refit alone."""
    adapter = get_adapter(model)
    if adapter.config_head_dim is None or adapter.config_bias is not None:
        return True
    return any(getattr(s.o, "bias", None) is not None for s in resolve_sites(model, adapter))


def measures(select: dict, removal: str, scores: HeadScores, *, iterative: bool = False,
             sequential: bool = False) -> bool:
    """Whether ``headprune prune --uniform`` (and the sweep's uniform recipe) re-choose the
    first layer's heads for these selection options: a uniform selection by the default
    ranking (no ``score`` or ``order``), removed with the refit, on a model not pruned before
    (the measurement chooses among a site's heads by position), in one round without the
    sequential pass (both re-calibrate) and not on an encoder-decoder (its sites attend both ways; the measurement runs one stack's output)."""
    causal = getattr(scores, "causal", None) or []
    return bool(select.get("uniform")) and removal == "refit" and select.get("score") is None \
        and select.get("order") is None and scores.head_ids is None \
        and not (iterative or sequential) \
        and not (any(causal) and not all(causal))  # an encoder-decoder: not measured (see measuring)


def _greedy_every_site(model, batches, scores: HeadScores, heads: dict, damping: float, sequences, progress) -> tuple:
    """An encoder's uniform selection re-chosen in every layer as its measured allocation
    chooses (:func:`~headprune.hf.allocation.layer_costs`, greedy: the layer's cheapest head at
    each count, up to the layout's), keeping the ranking's set where that measured cheaper."""
    from .allocation import layer_costs

    start = time.perf_counter()
    todo = {s: sorted(hs) for s, hs in heads.items() if hs}
    if not todo:
        return dict(heads), {"sites": {}, "seconds": 0.0}
    keep = min(scores.num_heads[s] - len(hs) for s, hs in todo.items())
    costs = layer_costs(model, batches, scores, damping=damping, sequences=sequences, min_heads_per_layer=keep,
                        choose="greedy", progress=progress)
    out, report = dict(heads), {}
    bar = _bar(len(todo), progress, "headprune: measuring the ranking's sets")
    with measuring(model, measured_part(batches, sequences), scores, damping, bar) as measure:
        for site, ranked in todo.items():
            greedy = sorted(costs.heads[site][len(ranked)])
            chosen, ranked_loss = costs.costs[site][len(ranked)], measure(site, ranked)
            out[site] = greedy if chosen <= ranked_loss else ranked
            report[site] = {"options": layout_count(scores.num_heads[site], scores.num_kv_heads[site], ranked),
                            "method": "greedy", "chosen_loss": min(chosen, ranked_loss), "ranked_loss": ranked_loss}
    return out, {"sites": report, "seconds": time.perf_counter() - start}


def measure_uniform(model, batches, scores: HeadScores, heads: dict, *, sites=None,
                    damping: float = DEFAULT_DAMPING, sequences: Optional[int] = None,
                    progress: bool = False, refit_bias: bool = True) -> tuple:
    """``(heads, report)``: ``heads`` with each of ``sites``' (default: the sites the default
    recipe keeps whole) replaced by the set of the same layout whose removal measured cheapest
    (the lowest in :func:`layout_options`' order on a tie), and per site ``{"options",
    "method", "chosen_loss", "ranked_loss"}`` with the ``seconds`` taken. A site with more than
    :data:`MAX_OPTIONS` sets is measured one KV group at a time (``"method": "groups"``) where
    :func:`pass_cost` is at most :data:`MAX_OPTIONS`, else keeps the ranking's heads
    (``"method": "ranking"``; ``"options"`` says how many sets it had). The model is left
    exactly as it was. On an encoder without grouped queries and ``sites`` not given, every
    site is re-chosen instead, as its default's measured allocation chooses heads (greedily, one
    head at a time up to the layout's count, ``"method": "greedy"``), keeping the ranking's set
    where that measured cheaper. ``refit_bias``: as the removal will refit (``mask_heads``')."""
    if getattr(scores, "moments", None) is None:
        raise ValueError("scores: measuring a layout refits the heads it removes and needs second moments; "
                         "collect with moments=True")
    if scores.head_ids is not None:
        raise ValueError("scores: measure_uniform chooses among a site's heads by position; collect on the "
                         "unpruned model")
    check_scores(model, scores)
    if sites is not None:
        n = scores.num_sites
        if isinstance(sites, (int, str)) or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < n
                                                    for s in sites):
            raise ValueError(f"sites: expected site indices in [0, {n}), got {sites!r:.80}")
    bad = [k for k in heads if not isinstance(k, int) or not 0 <= k < scores.num_sites]
    if bad:
        raise ValueError(f"heads: expected {{site index: [heads]}} with sites in [0, {scores.num_sites}), got keys "
                         f"{bad[:5]!r}")
    named = normalize_heads(heads, list(scores.num_heads))  # before any forward: head types and ranges
    twice = [k for k, hs in heads.items() if len(list(hs)) != len(named.get(k, ()))]
    if twice:
        raise ValueError(f"heads: site {twice[0]} names a head more than once ({heads[twice[0]]!r:.80})")
    heads = named
    if sites is None and not is_causal(scores) and not has_grouped_queries(scores):
        return _greedy_every_site(model, batches, scores, heads, damping, sequences, progress)
    sites = default_protected(scores) if sites is None else tuple(sites)
    shape = {s: (scores.num_heads[s], scores.num_kv_heads[s]) for s in sites if heads.get(s)}
    count = {s: layout_count(*shape[s], heads[s]) for s in shape}  # counted: a large site has millions
    todo = {s: layout_options(*shape[s], heads[s]) for s, n in count.items() if 1 < n <= MAX_OPTIONS}
    stepwise = {s: pass_cost(*shape[s], heads[s]) for s, n in count.items() if n > MAX_OPTIONS}
    stepwise = {s: n for s, n in stepwise.items() if 1 < n <= MAX_OPTIONS}  # 1: whole groups of it, no choice in one
    report = {s: {"options": n, "method": "every set" if s in todo else "groups" if s in stepwise else
                  "ranking"} for s, n in count.items() if n > 1}
    out, start = dict(heads), time.perf_counter()
    if todo or stepwise:
        part = measured_part(batches, sequences)
        bar = _bar(sum(map(len, todo.values())) + sum(stepwise.values()), progress,
                   "headprune: measuring the first layer's head sets")
        with measuring(model, part, scores, damping, bar, refit_bias) as measure:
            for site, options in todo.items():
                losses = [measure(site, o) for o in options]
                best = min(range(len(options)), key=lambda i: (losses[i], i))
                out[site] = options[best]
                report[site].update(chosen_loss=losses[best], ranked_loss=losses[options.index(sorted(heads[site]))])
            for site in stepwise:
                out[site], chosen, ranked = _one_group_at_a_time(measure, site, *shape[site], heads[site])
                report[site].update(chosen_loss=chosen, ranked_loss=ranked)
    return out, {"sites": report, "seconds": time.perf_counter() - start}
