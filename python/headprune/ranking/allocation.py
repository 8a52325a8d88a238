"""Budgets spread over sites by measured costs: the per-site counts of least summed cost.

:func:`allocate_by_cost` is the pure half of :func:`headprune.hf.select_measured`: given, per
site, what removing each allowed number of heads costs (measured with that site alone pruned),
it picks one count per site so that the counts add up to the budget and the costs add up to
the least, by dynamic programming over the sites (exact for additive costs).
"""

from __future__ import annotations

import math

__all__ = ["allocate_by_cost", "RunningShares"]


def allocate_by_cost(costs: list, want: int) -> list:
    """Per site, the heads to remove: ``costs[site]`` maps each allowed count (``0`` is always
    allowed, at cost 0 unless given) to its cost; the counts sum to ``want``, or to the largest
    total below it that the allowed counts reach (even layouts skip some sizes). Ties go to
    the earlier sites' smaller counts."""
    if isinstance(want, bool) or not isinstance(want, int) or want < 0:
        raise ValueError(f"want: expected a non-negative int, got {want!r}")
    options = []
    for site, table in enumerate(costs):
        opts = {0: 0.0, **{int(k): float(v) for k, v in table.items()}}
        bad = [k for k, v in opts.items() if k < 0 or math.isnan(v)]
        if bad:
            raise ValueError(f"costs: site {site}: counts {sorted(bad)} are negative or cost NaN")
        options.append(sorted(opts.items()))
    # best[total] = (cost, counts so far); sites are added one at a time
    best = {0: (0.0, [])}
    for opts in options:
        grown: dict = {}
        for total in sorted(best):
            cost, counts = best[total]
            for k, c in opts:
                t = total + k
                if t > want:
                    break
                if t not in grown or cost + c < grown[t][0]:
                    grown[t] = (cost + c, counts + [k])
        best = grown
    return best[max(best)][1]


class RunningShares:
    """A ``per_layer`` budget decided one site at a time, in site order, without statistics:
    what layer-by-layer calibration needs, which must fix a layer's count before it sees the
    layers after it (``select_heads`` gives the extra units of an uneven spread to the layers
    whose next unit ranks first, over all layers at once).

    Each site may give what ``select_heads(..., scope="per_layer")`` lets it give: the floor
    or ceiling of its even share (units: heads, or KV groups under ``gqa="group"``); under
    ``gqa="even"`` the even layouts up to :func:`~.select.even_cap` of it, preferring those that
    remove whole groups only or heads from every group only (a whole group and heads of the
    others besides only above the largest of those, or where those cannot make the budget: with
    no other layer's costs to weigh them, such layouts measured far worse). :meth:`take` gives
    the site the size that brings the units taken so far nearest to the budget's share of the
    sites passed (the smaller on a tie) among those that leave the budget within reach of the
    sites after it, so the extras fall where the running total lags. The budget is what
    ``select_heads`` removes with every head ranked alike: it refuses what that refuses (split
    KV groups under ``gqa="group"``, more than the even spread or the even layouts allow) and,
    where the layouts cannot make the request exactly, takes the total that reaches.
    ``layout``: ``HeadScores`` of the model (statistics not needed)."""

    def __init__(self, layout, *, ratio=None, count=None, gqa: str = "query", protect_layers=None,
                 min_heads_per_layer: int = 1):
        import torch

        from .recipes import default_protected
        from .select import budget, select_heads, site_caps
        from .units import as_count, as_index, unit_counts, unit_sizes

        protect = default_protected(layout) if protect_layers is None else protect_layers
        # what select_heads removes with every head ranked alike: its checks and refusals of the
        # options, and the total it reaches where its layouts cannot make the request exactly
        alike = torch.zeros(layout.num_sites, max(layout.num_heads, default=0), dtype=torch.float64)
        chosen = select_heads(layout, ratio=ratio, count=count, scope="per_layer", gqa=gqa, protect_layers=protect,
                              min_heads_per_layer=min_heads_per_layer, score=alike, order="low")
        protect, min_heads = {as_index(i) for i in protect}, as_count(min_heads_per_layer)
        unit = unit_sizes(layout, gqa)
        units = [hq // u for hq, u in zip(layout.num_heads, unit)]
        self.want = sum(unit_counts(chosen, layout, gqa).values())
        floors, ceils = site_caps(units, protect, min_heads, budget(ratio, count, sum(units)), "per_layer")
        allowed = [0 if i in protect else max(0, n - min_heads) for i, n in enumerate(units)]
        sizes = [self._sizes(n, k, lo, hi, a, gqa)
                 for n, k, lo, hi, a in zip(layout.num_heads, layout.num_kv_heads, floors, ceils, allowed)]
        self.options = [p for _, p in sizes]
        self.reach = self._reach(self.options)
        if self.want not in self.reach[0]:  # the preferred sizes cannot make the budget: every size
            self.options = [e for e, _ in sizes]
            self.reach = self._reach(self.options)
        self.open = [0 if i in protect else n for i, n in enumerate(units)]
        self.passed = self.taken = self.next = 0

    @staticmethod
    def _sizes(n: int, k: int, lo: int, hi: int, allowed: int, gqa: str) -> tuple:
        """``(every size, the sizes preferred)`` a site may give (units; see the class doc)."""
        from .layouts import even_layouts
        from .select import even_cap

        if gqa != "even":
            return (sorted({lo, hi}),) * 2
        if not (k and n // k > 1):  # no grouped queries: any number of heads up to the share's ceiling
            return list(range(min(hi, allowed) + 1)), sorted({lo, hi})
        layouts = even_layouts(n, k)  # sizes of whole groups or of heads from every group: one whole
        cap = min(even_cap(sorted(layouts), hi), allowed) if hi else 0  # group and one more head of each
        every = [r for r in sorted(layouts) if r <= cap]                 # other measured far worse (docs)
        pure = max(r for r in every if any(g == 0 or t == 0 for g, t in layouts[r]))
        return every, [r for r in every if r > pure or any(g == 0 or t == 0 for g, t in layouts[r])]

    def _reach(self, options: list) -> list:
        """``reach[i]``: the totals up to the budget that the sites from ``i`` on can give together."""
        reach = [{0}]
        for opts in reversed(options):
            reach.append({a + r for a in reach[-1] for r in opts if a + r <= self.want})
        return reach[::-1]

    def take(self, site: int) -> int:
        """Units site ``site`` gives (sites in order, each once): of its sizes after which the
        sites after it can still bring the total to the budget (any that fit where none can),
        the nearest to the running share."""
        if site != self.next:
            raise ValueError(f"site: the sites are taken in order, each once; expected site {self.next}, got {site!r}")
        self.next += 1
        self.passed += self.open[site]
        target = self.want * self.passed / max(1, sum(self.open))
        fits = [r for r in self.options[site] if self.taken + r <= self.want] or [0]
        fits = [r for r in fits if self.want - self.taken - r in self.reach[site + 1]] or fits
        r = min(fits, key=lambda r: (abs(self.taken + r - target), r))
        self.taken += r
        return r
