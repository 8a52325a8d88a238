"""Budgets spread over sites by measured costs: the per-site counts of least summed cost.

:func:`allocate_by_cost` is the pure half of :func:`headprune.hf.select_measured`: given, per
site, what removing each allowed number of heads costs (measured with that site alone pruned),
it picks one count per site so that the counts add up to the budget and the costs add up to
the least, by dynamic programming over the sites (exact for additive costs).
"""

from __future__ import annotations

import math

__all__ = ["allocate_by_cost"]


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
