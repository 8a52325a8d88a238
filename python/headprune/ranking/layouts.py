"""Even and uniform head layouts: selections whose KV cache never grows, or that a standard
config can describe.

A site with ``hkv`` KV groups of ``size`` query heads each can lose heads in *even* layouts
only: ``g`` whole groups go (their KV heads with them) and every other group loses the same
``t`` query heads, so the groups left stay equal and no KV head is repeated
(:func:`headprune.prune.slicing.kv_layout` repeats one only when they are not). A site without
grouped queries is ``hq`` groups of one head, where every count is even. A *uniform*
selection gives every site the same ``(g, t)``.

Which heads go follows the ranking: each head costs its unit's position in the pruning order
(:func:`~.units.rank_positions`), and the heads of a layout are those of least total cost
(the ``g`` groups whose full removal costs least over losing their ``t`` cheapest heads, and
the ``t`` cheapest of each other group). Across sites, :func:`allocate_even` grows the sites'
layouts one step at a time, cheapest cost per head first, within the budget and the caps (a
greedy growth: a step can commit to a layout whose only way further is a costlier one, so the
total is not always the least any combination of layouts reaches; an exact fill takes over
where the growth stalls short of the budget);
:func:`allocate_kv` does the same with a bonus per whole group removed, the least with which
at least a given number of KV heads go (``select_heads(..., kv_ratio=)``). Under a uniform
selection, sites that read one position table (:func:`tied_sites`: T5's self-attention
layers of a stack) keep the same heads, those of least summed cost over them.
"""

from __future__ import annotations

import math

import torch

__all__ = ["even_layouts", "best_layout", "layout_heads", "head_costs", "allocate_even", "allocate_kv",
           "allocate_uniform", "has_grouped_queries", "kv_groups_removed", "tied_sites", "SHARED_POSITION_TABLE"]

#: model types whose self-attention layers all read their stack's first layer's relative-position
#: table (the adapters' ``shared_position_bias``): a config describes their pruned layout only
#: when every self-attention layer of a stack keeps the same heads
SHARED_POSITION_TABLE = frozenset({"t5"})


def tied_sites(scores) -> list:
    """Groups of sites (``[[site, ...], ...]``) that must keep the same heads for one config to
    describe the result: each stack's self-attention sites where they share a position table
    and their heads are still the same ones (site names ``stack.layer.kind``, as collected)."""
    if getattr(scores, "model_type", None) not in SHARED_POSITION_TABLE:
        return []
    groups: dict = {}
    for i, (name, kind) in enumerate(zip(scores.names, scores.kinds)):
        if kind == "self":
            groups.setdefault(name.split(".")[0], []).append(i)
    ids = scores.head_ids
    return [g for g in groups.values()
            if len(g) > 1 and (ids is None or all(list(ids[i]) == list(ids[g[0]]) for i in g))]


def has_grouped_queries(scores) -> bool:
    """Whether some site of ``scores`` shares a KV head among several query heads."""
    return grouped_queries(zip(scores.num_heads, scores.num_kv_heads))


def grouped_queries(counts) -> bool:
    """Whether some ``(query heads, KV heads)`` pair of ``counts`` shares a KV head among several
    query heads (:func:`has_grouped_queries` of the sites' counts)."""
    return any(hkv and hq // hkv > 1 for hq, hkv in counts)


def even_layouts(hq: int, hkv: int, whole_groups_only: bool = False) -> dict:
    """``{heads removed: [(g, t), ...]}``: every even layout of a site, by the heads it removes
    (a site whose heads are all gone already: removing none)."""
    if hq == 0:
        return {0: [(0, 0)]}
    hkv = hkv or hq
    size = hq // hkv
    out: dict = {}
    for g in range(hkv + 1):
        for t in range(1 if whole_groups_only or g == hkv else size):
            out.setdefault(g * size + (hkv - g) * t, []).append((g, t))
    return out


def head_costs(ranked: list, num_heads: list) -> list:
    """Per site, each head's cost: the position of its unit in ``ranked`` (``[(site, heads)]``)."""
    costs = [[math.inf] * n for n in num_heads]
    for rank, (site, heads) in enumerate(ranked):
        for h in heads:
            costs[site][h] = float(rank)
    return costs


def best_layout(costs: list, hkv: int, g: int, t: int) -> tuple:
    """``(total cost, sorted heads)``: the cheapest heads of layout ``(g, t)`` at one site."""
    hq = len(costs)
    if hq == 0:  # a site whose heads are all gone already
        return 0.0, []
    hkv = hkv or hq
    size = hq // hkv
    groups = []
    for k in range(hkv):
        heads = sorted(range(k * size, (k + 1) * size), key=lambda h: (costs[h], h))
        part = sum(costs[h] for h in heads[:t])
        full = sum(costs[h] for h in heads)
        groups.append((full - part, k, heads, part, full))
    groups.sort(key=lambda x: (x[0], x[1]))
    total, chosen = 0.0, []
    for i, (_, _, heads, part, full) in enumerate(groups):
        if i < g:
            total, chosen = total + full, chosen + heads
        else:
            total, chosen = total + part, chosen + heads[:t]
    return total, sorted(chosen)


def layout_heads(costs: list, hkv: int, removed: int, where: str = "") -> list:
    """The heads of the cheapest even layout of one site (``where``: its name in errors) that
    removes ``removed`` heads."""
    layouts = even_layouts(len(costs), hkv)
    if removed not in layouts:
        raise ValueError(f"counts: {where}no even layout of {len(costs)} query heads in {hkv or len(costs)} KV groups "
                         f"removes {removed}; it removes one of {sorted(layouts)} (or pass gqa='query')")
    return min(best_layout(costs, hkv, g, t) for g, t in layouts[removed])[1]


#: the cost given to heads already removed (iterative pruning): every layout keeps them removed
_FORCED = -1e12


def _options(costs, hkv, whole, cap, forced=(), group_bonus: float = 0.0) -> dict:
    """``{removed: (cost, heads, whole groups)}``: the best even layout of each size up to
    ``cap`` that removes every head of ``forced``; each whole group a layout removes lowers its
    cost by ``group_bonus``."""
    forced = set(forced)
    costs = [_FORCED if h in forced else c for h, c in enumerate(costs)]
    out = {}
    for r, layouts in even_layouts(len(costs), hkv, whole).items():
        if len(forced) <= r <= max(cap, len(forced)):
            scored = []
            for g, t in layouts:
                cost, heads = best_layout(costs, hkv, g, t)
                scored.append((cost - group_bonus * g, heads, g))
            best = min(scored, key=lambda x: (x[0], x[1]))
            if forced <= set(best[1]):
                out[r] = best
    return out


def kv_groups_removed(chosen: dict, num_heads: list, kv_heads: list) -> int:
    """KV heads that ``chosen`` (``{site: heads}``) removes whole, every query head of their group."""
    n = 0
    for site, heads in chosen.items():
        hq, hkv = num_heads[site], kv_heads[site] or num_heads[site]
        size, gone = hq // hkv, set(heads)
        n += sum(all(h in gone for h in range(k * size, (k + 1) * size)) for k in range(hkv))
    return n


def allocate_kv(costs: list, kv_heads: list, caps: list, want: int, kv_want: int, forced: dict | None = None) -> dict:
    """:func:`allocate_even` removing at least ``kv_want`` KV heads: whole groups get a bonus
    per group, the smallest (found by bisection) with which the allocation removes that many,
    so the layouts stay the cheapest by the ranking that meet the KV budget; of the bonuses
    tried that meet it, one whose allocation removes the most query heads (up to ``want``:
    the greedy growth can stop short at some bonuses), the smallest of those. Where even the
    largest bonus falls short because the growth filled the last of the budget by giving back
    whole groups (5 of 8 heads in 4 groups, one group and one head of each other, after 4 of
    them, two groups), every run keeps the groups a site's layout removed."""
    num_heads = [len(c) for c in costs]

    def run(bonus, keep=False):  # keep: the growth keeps the whole groups a layout removed
        chosen = allocate_even(costs, kv_heads, caps, want, forced=forced, group_bonus=bonus, keep_groups=keep)
        return chosen, kv_groups_removed(chosen, num_heads, kv_heads)

    chosen, got = run(0.0)
    if got >= kv_want:
        return chosen
    finite = [c for cs in costs for c in cs if math.isfinite(c)]
    hi = 2.0 * (max(finite, default=0.0) + 1.0) * max(num_heads)
    chosen, got = run(hi)
    keep = got < kv_want  # the growth filled the budget by giving back whole groups: not here
    if keep:
        chosen, got = run(hi, keep)
    if got < kv_want:
        filled = None if forced else _exact_fill_kv(costs, kv_heads, caps, want, kv_want)
        if filled is not None:
            return filled
        raise ValueError(f"kv_ratio: {kv_want} KV heads requested but at most {got} go with {want} query heads in even "
                         "layouts under these caps; remove more query heads (a larger ratio or count) or lower kv_ratio")
    met = [(hi, chosen)]
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        chosen, got = run(mid, keep)
        if got >= kv_want:
            hi = mid
            met.append((mid, chosen))
        else:
            lo = mid
    best = max(met, key=lambda m: (sum(map(len, m[1].values())), -m[0]))[1]
    total = sum(map(len, best.values()))
    if total < want and not forced:  # every bonus's growth stopped short: the cheapest layouts that reach further
        filled = _exact_fill_kv(costs, kv_heads, caps, want, kv_want)
        if filled is not None and sum(map(len, filled.values())) > total:
            return filled
    return best


def _exact_fill_kv(costs: list, kv_heads: list, caps: list, want: int, kv_want: int):
    """``{site: heads}``: the even layouts, at most ``caps[site]`` heads per site, of least
    total cost that remove at least ``kv_want`` whole KV groups and exactly ``want`` heads, or
    where none does the most heads below it that such layouts remove; ``None`` if no layouts
    remove ``kv_want`` groups. A dynamic programme over (heads removed, whole groups removed,
    counted up to ``kv_want``), one step per site and layout; of equal costs the combination
    found first (sites in order, layouts in :func:`even_layouts` order) is kept."""
    width, kw = want + 1, kv_want + 1
    cost = torch.full((width, kw), math.inf, dtype=torch.float64)
    cost[0, 0] = 0.0
    steps = []  # per site: its layouts, and per state the layout and the group count before it
    for site_costs, hkv, cap in zip(costs, kv_heads, caps):
        layouts = [(r, g, *best_layout(site_costs, hkv, g, t)) for r, lts in even_layouts(len(site_costs), hkv).items()
                   for g, t in lts if r <= min(cap, want)]
        new = torch.full((width, kw), math.inf, dtype=torch.float64)
        pick = torch.full((width, kw), -1, dtype=torch.long)
        before = torch.zeros((width, kw), dtype=torch.long)
        for j, (r, g, c, _) in enumerate(layouts):
            for k in range(kw):
                to = min(k + g, kv_want)
                src, cur = cost[: width - r, k] + c, new[r:, to]
                better = src < cur
                new[r:, to] = torch.where(better, src, cur)
                pick[r:, to] = torch.where(better, j, pick[r:, to])
                before[r:, to] = torch.where(better, k, before[r:, to])
        cost = new
        steps.append((layouts, pick, before))
    reached = torch.nonzero(torch.isfinite(cost[:, kv_want]))
    if not len(reached):
        return None
    out, t, k = {}, int(reached.max()), kv_want
    for site in reversed(range(len(steps))):
        layouts, pick, before = steps[site]
        r, _, _, heads = layouts[int(pick[t, k])]
        if r:
            out[site] = heads
        t, k = t - r, int(before[t, k])
    return dict(sorted(out.items()))


def allocate_even(costs: list, kv_heads: list, caps: list, want: int, whole_groups_only: bool = False,
                  forced: dict | None = None, group_bonus: float = 0.0, keep_groups: bool = False) -> dict:
    """``{site: heads}``: at most ``want`` heads in even layouts, at most ``caps[site]`` per
    site, grown one layout step at a time at the least cost per head added, from ``forced``
    (``{site: heads already removed}``, an even layout each); ``group_bonus`` lowers the cost
    of a layout by that much per whole group it removes (see :func:`allocate_kv`); with
    ``keep_groups`` no step gives back a whole group a site's layout removed."""
    forced = forced or {}
    options = [_options(c, kv, whole_groups_only, cap, forced.get(i, ()), group_bonus)
               for i, (c, kv, cap) in enumerate(zip(costs, kv_heads, caps))]
    removed = [len(forced.get(i, ())) for i in range(len(costs))]
    for i, r in enumerate(removed):
        if r and r not in options[i]:
            raise ValueError(f"pruned: layer {i} heads {sorted(forced[i])} are not an even layout (every KV group "
                             "kept keeping the same number of query heads)")
    left = want - sum(removed)
    if left < 0:
        raise ValueError(f"pruned: {sum(removed)} heads are already pruned, more than the {want} requested")
    while left > 0:
        best = None
        for site, opts in enumerate(options):
            now = opts[removed[site]][0] if removed[site] else 0.0
            groups = opts[removed[site]][2] if removed[site] else 0
            for r, (cost, _, g) in opts.items():
                step = r - removed[site]
                if 0 < step <= left and (g >= groups or not keep_groups):
                    key = ((cost - now) / step, site, r)
                    if best is None or key < best:
                        best = key
        if best is None:
            break
        _, site, r = best
        left -= r - removed[site]
        removed[site] = r
    if left > 0 and not (group_bonus or keep_groups):  # the growth stalled short: an exact fill, or a nearer one
        filled = _exact_fill(options, [len(forced.get(i, ())) for i in range(len(costs))], want)
        removed = filled if sum(filled) > sum(removed) else removed
    return {site: options[site][r][1] for site, r in enumerate(removed) if r}


def _exact_fill(options: list, start: list, want: int):
    """Per site, the layout size (at least ``start[site]``, its forced heads) of the cheapest
    combination removing exactly ``want`` heads, or where none does the most heads below it that
    one removes: the growth of :func:`allocate_even` takes one layout step at a time and can stop
    short (4 of 5 heads when sizes 2 and 3 at two sites make 5).

    A dynamic programme over the heads removed so far (0..``want``), one vector step per
    layout size of each site. Of equal costs it keeps the partial combination reached first,
    sites in order and each site's sizes in ``options`` order, so the result does not depend
    on float rounding of a reordered sum."""
    width, never = want + 1, torch.iinfo(torch.long).max
    seen = torch.zeros(width, dtype=torch.bool)
    seen[0] = True
    cost = torch.zeros(width, dtype=torch.float64)
    order = torch.zeros(width, dtype=torch.long)  # when each total was first reached: the tie-break
    steps = []  # per site: its size at each total after it
    for opts, first in zip(options, start):
        base = opts[first][0] if first else 0.0  # relative to the forced heads' layout: their large
        sizes = [(r, c - base) for r, (c, _, _) in opts.items() if r >= first] + [(0, 0.0)] * (not first)  # cost cancels
        sizes = [(r, c) for r, c in sizes if r < width]
        n = len(sizes)
        # one vector step per size, on slices (shorter than torch's parallel grain on most
        # models, so a busy machine's threads do not slow it down)
        b_cost = torch.full((width,), math.inf, dtype=torch.float64)
        b_key = torch.full((width,), never, dtype=torch.long)
        b_size = torch.zeros(width, dtype=torch.long)
        reached = torch.full((width,), never, dtype=torch.long)
        for j, (r, c) in enumerate(sizes):
            ok, cc = seen[: width - r], cost[: width - r] + c
            key = order[: width - r] * n + j  # reached from an earlier total first
            bc, bk = b_cost[r:], b_key[r:]
            better = ok & ((cc < bc) | ((cc == bc) & (key < bk)))
            b_cost[r:] = torch.where(better, cc, bc)
            b_key[r:] = torch.where(better, key, bk)
            b_size[r:] = torch.where(better, r, b_size[r:])
            reached[r:] = torch.where(ok, torch.minimum(reached[r:], key), reached[r:])
        seen, cost = reached != never, b_cost
        order = torch.empty(width, dtype=torch.long)
        order[reached.argsort()] = torch.arange(width)
        steps.append(b_size)
    out, t = [], int(torch.nonzero(seen).max())  # want, if reached
    for size in reversed(steps):
        r = int(size[t])
        out.append(r)
        t -= r
    return out[::-1]


def allocate_uniform(costs: list, kv_heads: list, want: int, min_heads: int, whole_groups_only: bool = False,
                     tied: list = ()) -> dict:
    """``{site: heads}``: the one layout ``(g, t)`` for every site whose total is nearest
    ``want`` (the fewer heads on a tie), the cheapest heads of it at each site; each group of
    ``tied`` sites (see :func:`tied_sites`) takes the heads of least summed cost over it."""
    costs = list(costs)
    for group in tied:
        summed = [sum(costs[i][h] for i in group) for h in range(len(costs[group[0]]))]
        for i in group:
            costs[i] = summed
    shapes = {(len(c), kv or len(c)) for c, kv in zip(costs, kv_heads)}
    if len(shapes) != 1:
        raise ValueError(f"uniform: the sites have different head layouts {sorted(shapes)}; a uniform selection "
                         "needs one (query heads, KV heads) shape in every site")
    (hq, hkv), = shapes
    sites = len(costs)
    candidates = [(r, g, t) for r, layouts in even_layouts(hq, hkv, whole_groups_only).items()
                  for g, t in layouts if hq - r >= min_heads]
    if not candidates:
        raise ValueError(f"uniform: no layout keeps min_heads_per_layer={min_heads} heads per layer")
    if want > 0 and all(r == 0 for r, _, _ in candidates):
        raise ValueError(f"ratio/count: {want} heads requested, but every uniform layout that keeps "
                         f"min_heads_per_layer={min_heads} heads per layer removes none; lower min_heads_per_layer")

    def total(g, t):
        return sum(best_layout(c, kv_heads[i], g, t)[0] for i, c in enumerate(costs))

    r, g, t = min(candidates, key=lambda x: (abs(x[0] * sites - want), x[0], total(x[1], x[2]), x[1]))
    return {site: best_layout(c, kv_heads[site], g, t)[1] for site, c in enumerate(costs) if r}
