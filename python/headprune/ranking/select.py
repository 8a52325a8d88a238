"""``select_heads``: which heads to prune, from ``HeadScores``.

Three steps, each its own function: the recipe (:func:`~.recipes.resolve_recipe`), the
per-site caps (:func:`site_caps`: what protection, ``min_heads_per_layer`` and the scope
allow each site), and the allocation (:func:`allocate`: units taken in ranking order within
the caps). Site indices are called layers here, as in the rest of the selection API.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from ..stats.moments import DEFAULT_DAMPING
from ..stats.scores import HeadScores
from .recipes import DEFAULT_GQA, DEFAULT_RECIPE, SCOPES, resolve_recipe
from .layouts import (allocate_even, allocate_kv, allocate_uniform, even_layouts, has_grouped_queries, head_costs,
                      layout_heads, tied_sites)
from .units import as_count, as_index, as_real, rank_positions, unit_sizes

__all__ = ["select_heads", "site_caps", "allocate", "budget", "SplitGroupsError"]


def select_heads(
    scores: HeadScores,
    *,
    ratio: Optional[float] = None,
    count: Optional[int] = None,
    scope: str = DEFAULT_RECIPE["scope"],
    min_heads_per_layer: int = 1,
    protect_layers: Optional[Iterable] = None,
    gqa: str = DEFAULT_GQA,
    score=None,
    order: Optional[str] = None,
    seed: int = 0,
    pruned: Optional[dict] = None,
    uniform: bool = False,
    kv_ratio: Optional[float] = None,
    counts: Optional[dict] = None,
    damping: float = DEFAULT_DAMPING,
) -> dict:
    """Heads to prune: ``{layer: sorted [query heads]}`` (layers with none are omitted).

    Args:
        ratio / count: how many units to prune in total (exactly one; ``ratio`` is a fraction
            of all units, floored). With ``scope="per_layer"`` the total is spread evenly:
            every layer gives its share rounded down or up (the extra units go to the layers
            whose next unit ranks first), so a 10% ratio of 9-head layers still prunes 10%.
        min_heads_per_layer: units every layer keeps (0 allows removing a whole layer).
        protect_layers: layer (site) indices never pruned (``None``: the default recipe's,
            when ``score`` and ``order`` are ``None`` too, see
            :func:`~headprune.ranking.recipes.default_protected`; else none).
        gqa: ``"query"`` prunes query heads (a KV head goes only when its whole group goes,
            and a partly pruned group makes the pruned model repeat KV heads, so the KV cache
            can grow); ``"even"`` prunes query heads too, but only in layouts where every KV
            group a site keeps keeps the same number of query heads, so the KV cache never
            grows (each site's share is rounded to such a layout, see :mod:`~headprune.ranking.layouts`;
            the total may fall short of the request, to none below every site's smallest layout,
            as a round of iterative selection may ask); ``"group"`` prunes whole KV groups, so the
            KV cache shrinks too.
        score: which statistic ranks heads (a name, see ``HeadScores.score``), or a
            ``[sites, heads]`` tensor of per-head values such as
            :func:`headprune.hf.importance.gradient_importance`; ``None``: :func:`~.recipes.default_for`'s.
        order / seed: see :func:`rank_heads`; ``order=None`` is the score's natural order
            (:data:`~headprune.ranking.recipes.NATURAL_ORDER`: highest first for entropies,
            lowest first for costs).
        pruned: ``{layer: [query heads]}`` already pruned (masked) in an earlier step of
            iterative pruning; they are part of the result and count towards the budget,
            and ``scores`` ranks only the rest (see :func:`headprune.hf.select_iteratively`).
            With ``gqa="even"`` each site's pruned heads must be an even layout; not with
            ``uniform``.
        uniform: the same layout in every site (the same number of query heads, and under GQA
            the same groups kept and heads per group), the count nearest the request (the fewer
            heads on a tie, which may be none: an empty selection, which ``headprune prune``
            refuses), so a standard config describes the result (T5: each stack's self-attention
            layers keep the same heads); no site is protected by default, ``protect_layers`` refused.
        kv_ratio: with ``gqa="even"``, remove at least this fraction of the KV heads (rounded
            up): layouts that remove whole groups are preferred, by the least bonus per group
            that reaches it (see :func:`~headprune.ranking.layouts.allocate_kv`), so the KV
            cache shrinks by at least that much for the same number of query heads.
        counts: ``{layer: query heads to remove}`` instead of ``ratio`` / ``count`` and the
            scope: exactly that many at each layer named (none elsewhere), the ranking's
            choice within the layer (under ``gqa="even"`` a count must be an even layout's
            size, under ``"group"`` a multiple of the group size), e.g. the allocation
            :func:`headprune.hf.select_measured` measures.
        damping: the ridge of the refit the heads will be removed with (``mask_heads(...,
            damping=)``): the ``"reconstruction"`` score (the default on causal LMs) ranks by
            that refit's errors; other scores ignore it.

    Raises ``ValueError`` when the constraints cannot accommodate the request.
    """
    counts = _check_options(scores, scope, min_heads_per_layer, uniform, protect_layers, pruned, kv_ratio, gqa,
                            counts, ratio, count)
    if gqa == "group" and scores.repeated_kv_sites():  # the rows a query pruning repeated are no whole groups
        raise SplitGroupsError(scores.repeated_kv_sites())
    recipe = resolve_recipe(scores, score, order, protect_layers, uniform=uniform)
    ranked = rank_positions(scores, score=recipe.score, order=recipe.order, seed=seed, gqa=gqa, damping=damping)
    if counts is not None:
        return _select_counts(scores, ranked, recipe, gqa, counts)
    if uniform or (gqa == "even" and has_grouped_queries(scores)):  # without grouped queries every layout is even
        return _select_even(scores, ranked, recipe, gqa, ratio, count, scope, min_heads_per_layer, uniform,
                            _even_forced(pruned, scores), kv_ratio)
    if kv_ratio:
        raise ValueError("kv_ratio: the model has no grouped queries; every KV head goes with its query head")
    protect = _check_layers(recipe.protect_layers, scores.num_sites)
    units = [0] * scores.num_sites
    for layer, _ in ranked:
        units[layer] += 1
    forced = _forced(ranked, _as_positions(pruned, scores), scores)
    if forced and any(layer in protect for layer, _ in forced):
        bad = sorted({layer for layer, _ in forced if layer in protect})
        raise ValueError(f"pruned: layers {bad} are in protect_layers")
    want = budget(ratio, count, sum(units))
    floors, ceils = site_caps(units, protect, min_heads_per_layer, want, scope)
    if want > sum(ceils):
        spread = " spread evenly over the layers" if scope == "per_layer" else ""
        raise ValueError(
            f"ratio/count: {want} units requested but protect_layers and min_heads_per_layer={min_heads_per_layer} "
            f"allow at most {sum(ceils)}{spread}{recipe.why_protected}"
        )
    if len(forced) > want:
        raise ValueError(f"pruned: {len(forced)} units are already pruned, more than the {want} requested")
    chosen = allocate(ranked, forced, floors, ceils, want)
    return {site: sorted(scores.ids(site, hs)) for site, hs in chosen.items()}


def _check_options(scores, scope, min_heads_per_layer, uniform, protect_layers, pruned, kv_ratio, gqa, counts, ratio,
                   count):
    """:func:`select_heads`' options that do not depend on the ranking, checked; ``counts`` as
    ``{site: heads}`` (or ``None``)."""
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    if as_count(min_heads_per_layer) is None:
        raise ValueError(f"min_heads_per_layer: expected a non-negative int, got {min_heads_per_layer!r}")
    if not isinstance(uniform, bool):
        raise TypeError(f"uniform: expected a bool, got {type(uniform).__name__}")
    not_layers = isinstance(protect_layers, (str, bytes)) or not isinstance(protect_layers, Iterable)
    if protect_layers is not None and not_layers:  # 0 passed a uniform selection's check as "none"
        raise TypeError(f"protect_layers: expected an iterable of layer indices, got {protect_layers!r}")
    if uniform and protect_layers:
        raise ValueError("protect_layers: a uniform selection prunes every layer alike; pass uniform=False to "
                         "protect layers")
    if uniform and pruned:
        raise ValueError("pruned: iterative pruning is not supported with uniform=True")
    if kv_ratio is not None:
        if as_real(kv_ratio) is None or not 0 <= kv_ratio < 1:
            raise ValueError(f"kv_ratio: expected a fraction in [0, 1), got {kv_ratio!r}")
        if gqa != "even" or uniform:
            raise ValueError(f"kv_ratio: needs gqa='even' without uniform (got gqa={gqa!r}, uniform={uniform}); "
                             "gqa='group' removes KV heads in the ratio of the query heads")
    if counts is not None:
        if ratio is not None or count is not None or uniform or pruned or kv_ratio is not None:
            raise ValueError("counts: gives every layer's count itself; drop ratio, count, uniform, pruned and kv_ratio")
        counts = _check_counts(counts, scores, min_heads_per_layer, gqa)
    return counts


def _by_layer(mapping, name: str, what: str, scores: HeadScores) -> list:
    """The ``(layer, value)`` items of ``mapping`` (argument ``name``, a dict ``{layer: what}``),
    the dict and every layer index checked."""
    if not isinstance(mapping, dict):
        raise TypeError(f"{name}: expected a dict {{layer: {what}}}, got {type(mapping).__name__}")
    items = []
    for layer, value in mapping.items():
        layer = _layer_key(layer, name)
        if not 0 <= layer < scores.num_layers:
            raise ValueError(f"{name}: layer {layer} out of range for {scores.num_layers} layers")
        items.append((layer, value))
    return items


def _check_counts(counts, scores: HeadScores, min_heads: int, gqa: str) -> dict:
    """``counts`` as ``{site: heads}`` (zeros left out), every entry checked; ``min_heads`` counts
    units, as ``ratio``/``count`` do (KV groups under ``gqa="group"``)."""
    size, items = unit_sizes(scores, gqa), _by_layer(counts, "counts", "heads to remove", scores)
    for layer, n in items:
        top = scores.num_heads[layer] - min_heads * size[layer]
        if as_count(n) is None or n > max(top, 0):  # 0 always (a site with no head to spare gives none)
            units = f" units of {size[layer]} heads" * (size[layer] > 1)
            raise ValueError(f"counts: layer {layer}: expected an int in [0, {max(top, 0)}] (its {scores.num_heads[layer]} "
                             f"heads less min_heads_per_layer={min_heads}{units}), got {n!r}")
    return {layer: as_index(n) for layer, n in items if n}


def _select_counts(scores: HeadScores, ranked: list, recipe, gqa: str, counts: dict) -> dict:
    """:func:`select_heads` with ``counts``: per site, the ranking's best layout of that size."""
    protect = _check_layers(recipe.protect_layers, scores.num_sites)
    hit = sorted(i for i in counts if i in protect)
    if hit:
        raise ValueError(f"counts: layers {hit} are protected{recipe.why_protected}")
    kv = list(scores.num_kv_heads)
    if gqa == "even" and has_grouped_queries(scores):
        costs = head_costs(ranked, scores.num_heads)
        chosen = {i: layout_heads(costs[i], kv[i], n, f"layer {i}: ") for i, n in counts.items()}
    else:
        size = unit_sizes(scores, gqa)
        for i, n in counts.items():
            if n % size[i]:
                raise ValueError(f"counts: layer {i}: {n} heads are not whole KV groups of {size[i]} (gqa={gqa!r})")
        want = [counts.get(i, 0) // size[i] for i in range(scores.num_sites)]
        chosen = allocate(ranked, [], want, want, sum(want))
    return {site: sorted(scores.ids(site, hs)) for site, hs in sorted(chosen.items())}


class SplitGroupsError(ValueError):
    """Whole-group pruning of sites whose KV rows repeat an original KV head: no fraction helps."""

    def __init__(self, sites: list, cli: bool = False):
        g = (lambda v: f"--gqa {v}") if cli else (lambda v: f"gqa={v!r}")  # noqa: E731
        super().__init__(f"{g('group')}: layers {sites[:8]}{' ...' if len(sites) > 8 else ''} repeat KV heads (an "
                         f"earlier {g('query')} pruning split their groups), so their KV rows are not whole KV groups; "
                         f"use {g('even')} or {g('query')}, or prune the original model")


def _even_forced(pruned, scores: HeadScores) -> dict:
    """``pruned`` (original head indices) as ``{site: {positions}}``, checked."""
    return _pruned_sets(_as_positions(pruned, scores), scores)


def _select_even(scores, ranked, recipe, gqa, ratio, count, scope, min_heads, uniform, forced, kv_ratio=None) -> dict:
    """:func:`select_heads` for even or uniform layouts (see :mod:`.layouts`), in heads."""
    costs = head_costs(ranked, scores.num_heads)
    kv = list(scores.num_kv_heads)
    whole = gqa == "group"
    if whole:  # a unit is a group (uniform only: one group size): the budget counts groups
        sizes = {hq // (k or hq) for hq, k in zip(scores.num_heads, kv) if hq} or {1}  # a site left with no head: none
        want_heads = budget(ratio, count, sum(scores.num_heads) // max(sizes)) * max(sizes)
    else:
        want_heads = budget(ratio, count, sum(scores.num_heads))
    if uniform:  # min_heads_per_layer counts units: groups under gqa="group"; tied: T5's stacks
        chosen = allocate_uniform(costs, kv, want_heads, min_heads * (max(sizes) if whole else 1), whole, tied_sites(scores))
    else:
        protect = _check_layers(recipe.protect_layers, scores.num_sites)
        allowed = [0 if i in protect else max(0, n - min_heads) for i, n in enumerate(scores.num_heads)]
        if scope == "per_layer":  # each site's share, rounded to the layouts it has (see even_cap)
            _, ceils = site_caps(list(scores.num_heads), protect, min_heads, want_heads, scope)
            caps = [min(even_cap(sorted(even_layouts(n, k, whole)), c) if k and n // k > 1 else c, a) if c else 0
                    for n, k, c, a in zip(scores.num_heads, kv, ceils, allowed)]
        else:
            caps = allowed
        if any(i in protect for i in forced):
            raise ValueError(f"pruned: layers {sorted(i for i in forced if i in protect)} are in protect_layers")
        over = sorted(i for i, hs in forced.items() if len(hs) > allowed[i])  # as the query path refuses it
        if over:
            raise ValueError(f"pruned: layers {over} already have more pruned heads than min_heads_per_layer="
                             f"{min_heads} allows")
        _check_even_room(scores, kv, caps, allowed, forced, want_heads, whole, min_heads, scope, recipe)
        if kv_ratio:
            kv_want = math.ceil(as_real(kv_ratio) * sum(k or n for n, k in zip(scores.num_heads, kv)) - 1e-9)
            chosen = allocate_kv(costs, kv, caps, want_heads, kv_want, forced)
        else:
            chosen = allocate_even(costs, kv, caps, want_heads, whole, forced)
    return {site: sorted(scores.ids(site, hs)) for site, hs in sorted(chosen.items())}


def _check_even_room(scores, kv, caps, allowed, forced, want: int, whole: bool, min_heads: int, scope: str,
                     recipe) -> None:
    """Refuse a request beyond what protection and ``min_heads`` allow (``allowed``: per site),
    as the query path refuses it, or of which even layouts under
    ``caps`` can remove nothing: rounding to the layouts may leave fewer heads than asked
    (documented; ``prune`` warns), but not none at all, silently (for example the only
    unprotected layer already emptied)."""
    done = sum(len(forced.get(i, ())) for i in range(scores.num_sites))
    room = sum(max((r for r in even_layouts(n, k, whole) if r <= max(c, len(forced.get(i, ())))), default=0)
               for i, (n, k, c) in enumerate(zip(scores.num_heads, kv, caps)))
    most = sum(max(a, len(forced.get(i, ()))) for i, a in enumerate(allowed))  # what the query path allows
    if want > most:
        raise ValueError(f"ratio/count: {want} heads requested but protect_layers and min_heads_per_layer={min_heads} "
                         f"allow at most {most}{recipe.why_protected}")
    if want > done and room <= done:
        spread = " spread evenly over the layers" if scope == "per_layer" else ""
        before = f"the {done} already removed" if done else "none"
        raise ValueError(f"ratio/count: {want} heads requested but protect_layers and min_heads_per_layer={min_heads} "
                         f"allow {'no more than ' * bool(done)}{before} in even layouts{spread}{recipe.why_protected}")


def even_cap(sizes: list, ceil: int) -> int:
    """The most heads a site may give under ``per_layer`` scope with even layouts of
    ``sizes``: the largest size within one head of its share's ceiling, and at least the
    first size that reaches it (9 query heads in 3 groups give 3, 5, 6, ... heads: a share of
    4.7 may give 6, so that sites mixing 3 and 6 average it; capped at the next size up, 5,
    every site had to lose a whole group, which measured far worse on SmolLM2-135M)."""
    within = [r for r in sizes if r <= ceil + 1]
    reach = [r for r in sizes if r >= ceil]
    return max(max(within, default=0), min(reach, default=0))


def _as_positions(pruned, scores: HeadScores):
    """``pruned`` (original head indices) as positions of ``scores``' sites."""
    if pruned is None or scores.head_ids is None or not isinstance(pruned, dict):
        return pruned
    out = {}
    for site, hs in pruned.items():
        site = _layer_key(site, "pruned")
        ids = scores.head_ids[site] if 0 <= site < scores.num_sites else []
        if bad := [h for h in hs if h not in ids]:
            raise ValueError(f"pruned: layer {site} heads {bad} are not among its heads {ids}")
        out[site] = scores.positions(site, hs)
    return out


def site_caps(units: list, protect: set, min_units: int, want: int, scope: str) -> tuple:
    """``(floors, ceils)``: per site, the units taken in the first pass and the most it may
    give. ``global`` scope: both are what protection and ``min_units`` allow; ``per_layer``:
    the floor and ceiling of the site's even share of ``want`` (within what is allowed)."""
    allowed = [0 if i in protect else max(0, n - min_units) for i, n in enumerate(units)]
    if scope == "global":
        return allowed, allowed
    frac = want / max(1, sum(n for i, n in enumerate(units) if i not in protect))  # of every open unit
    floors = [min(math.floor(frac * n + 1e-9), a) for n, a in zip(units, allowed)]
    ceils = [min(math.ceil(frac * n - 1e-9), a) for n, a in zip(units, allowed)]
    return floors, ceils


def allocate(ranked: list, forced: list, floors: list, ceils: list, want: int) -> dict:
    """Take ``forced`` units first, then units in ranking order: every site up to its floor,
    then the rest up to the ceilings, until ``want`` units are taken."""
    taken = [0] * len(ceils)
    chosen: dict = {}

    def take(layer, heads):
        taken[layer] += 1
        chosen.setdefault(layer, []).extend(heads)

    for layer, heads in forced:
        if taken[layer] >= ceils[layer]:
            raise ValueError(f"pruned: layer {layer} already has more pruned heads than the constraints allow")
        take(layer, heads)
    done = {(layer, heads[0]) for layer, heads in forced}
    for caps in (floors, ceils):
        for layer, heads in ranked:
            if sum(taken) >= want:
                break
            if taken[layer] < caps[layer] and (layer, heads[0]) not in done:
                done.add((layer, heads[0]))
                take(layer, heads)
    return {layer: sorted(h) for layer, h in sorted(chosen.items())}


def budget(ratio, count, total: int, name_total: str = "units of the model") -> int:
    """The number of units a ``ratio`` (floored) or ``count`` of ``total`` asks for, validated."""
    if (ratio is None) == (count is None):
        raise ValueError("ratio, count: give exactly one of them")
    if ratio is not None:
        if (r := as_real(ratio)) is None or not 0 <= r <= 1:
            raise ValueError(f"ratio: expected a number in [0, 1], got {ratio!r}")
        return int(math.floor(r * total + 1e-9))
    if (n := as_count(count)) is None:
        raise ValueError(f"count: expected a non-negative int, got {count!r}")
    if (count := n) > total:
        raise ValueError(f"count: {count} exceeds the {total} {name_total}")
    return count


def _layer_key(layer, name: str) -> int:
    """A dict argument's layer key as an index, or a ``TypeError`` naming the argument."""
    try:
        return as_index(layer)
    except TypeError:
        raise TypeError(f"{name}: expected int layer indices, got {layer!r}") from None


def _check_layers(protect_layers: Iterable, n: int) -> set:
    try:
        protect = {as_index(i) for i in protect_layers}
    except (TypeError, ValueError) as e:
        raise TypeError(f"protect_layers: expected an iterable of layer indices, got {protect_layers!r}") from e
    bad = sorted(i for i in protect if not 0 <= i < n)
    if bad:
        raise ValueError(f"protect_layers: indices {bad} out of range for {n} layers")
    return protect



def _forced(ranked: list, pruned: Optional[dict], scores: HeadScores) -> list:
    """The units of ``pruned`` (whole units only), in ranking order."""
    if pruned is None:
        return []
    want = _pruned_sets(pruned, scores)
    out = [(layer, heads) for layer, heads in ranked if set(heads) <= want.get(layer, set())]
    covered = {(layer, h) for layer, heads in out for h in heads}
    partial_ = sorted((layer, h) for layer, hs in want.items() for h in hs if (layer, h) not in covered)
    if partial_:
        raise ValueError(f"pruned: heads {partial_} do not form whole units for gqa mode (a KV group is pruned whole)")
    return out


def _pruned_sets(pruned: Optional[dict], scores: HeadScores) -> dict:
    """``{layer: {heads}}`` of ``pruned`` (positions), every index checked; empty layers left out."""
    if pruned is None:
        return {}
    want = {}
    for layer, heads in _by_layer(pruned, "pruned", "[heads]", scores):
        hs = {as_index(h) for h in heads}
        bad = sorted(h for h in hs if not 0 <= h < scores.num_heads[layer])
        if bad:
            raise ValueError(f"pruned: heads {bad} out of range for layer {layer} ({scores.num_heads[layer]} heads)")
        if hs:
            want[layer] = hs
    return want
