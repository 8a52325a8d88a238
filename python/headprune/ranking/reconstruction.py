"""Selection by what the least-squares refit cannot recover (structured Optimal Brain Surgeon).

For one site with ``G = E[x~ x~^T]`` (damped as the refit damps it, see
:mod:`headprune.prune.reconstruct`), the projection ``W~ = [W, b]`` and the columns ``S``
still kept, the refit's weights are ``W* = W~ G[:, S] G[S, S]^-1`` and removing the block ``B``
of one unit (a head, or a KV group's heads) raises the output's squared error per token by

    cost(B) = tr(W*_B (M_BB)^-1 W*_B^T),    M = G[S, S]^-1.

Greedy removal takes the cheapest unit, then updates ``W*`` and ``M`` in place (the block
downdate ``M <- M_RR - M_RB M_BB^-1 M_BR``, ``W*_R <- W*_R - W*_B M_BB^-1 M_BR``: no
refactorisation), and repeats, as SlimGPT and ZipLM do. The marginal costs are divided by
the site's output energy ``E||W~ x~||^2`` so sites compare on one scale; made non-decreasing
along each site's greedy order, they are the ``reconstruction`` score, lowest first.
"""

from __future__ import annotations

import math

import torch

from ..stats.moments import DEFAULT_DAMPING, ridge
from ..stats.scores import HeadScores

__all__ = ["greedy_removal", "reconstruction_score", "site_units"]


def greedy_removal(gram: torch.Tensor, projection: torch.Tensor, units: list, *,
                   damping: float = DEFAULT_DAMPING) -> tuple:
    """``(order, costs, energy)``: the indices of ``units`` in greedy removal order, the
    squared output error per token each removal adds, and the site's output energy per token.

    ``units``: lists of input columns removed together; ``gram`` ``[D + 1, D + 1]`` (sums or
    means), ``projection`` ``[out, D + 1]``.
    """
    d = gram.shape[0] - 1
    g = gram.double()
    g = g / g[d, d]
    wt = projection.double().to(g.device)
    wg = wt @ g
    energy = float((wg * wt).sum())
    a = g.clone()
    if damping > 0 and d > 0:
        a.diagonal()[:d] += ridge(a, damping, d)
    chol, info = torch.linalg.cholesky_ex(a)
    m = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.inv(a)
    w_star = wg @ m  # [out, D + 1]: the refit with every column kept
    pos = {c: c for c in range(d + 1)}  # column -> its position in the current m / w_star
    left = list(range(len(units)))
    order, costs = [], []
    while left:
        best, best_cost = None, math.inf
        for u in left:
            b = [pos[c] for c in units[u]]
            wb = w_star[:, b]
            cost = float((torch.linalg.solve(m[b][:, b], wb.t()) * wb.t()).sum())
            if cost < best_cost:
                best, best_cost = u, cost
        m, w_star, pos = _downdate(m, w_star, pos, units[best])
        order.append(best)
        costs.append(max(best_cost, 0.0))
        left.remove(best)
    return order, costs, energy


def _downdate(m, w_star, pos, columns) -> tuple:
    """Remove ``columns`` from the kept set: the OBS update of the refit and of ``M``."""
    b = [pos[c] for c in columns]
    gone = set(b)
    keep = [i for i in range(m.shape[0]) if i not in gone]
    mbb_inv_mbr = torch.linalg.solve(m[b][:, b], m[b][:, keep])  # M_BB^-1 M_BR
    new_m = m[keep][:, keep] - m[keep][:, b] @ mbb_inv_mbr
    new_w = w_star[:, keep] - w_star[:, b] @ mbb_inv_mbr
    old = {p: c for c, p in pos.items() if p not in gone}
    new_pos = {old[p]: i for i, p in enumerate(keep)}
    return new_m, new_w, new_pos


def site_units(hq: int, hkv: int, d: int, gqa: str) -> list:
    """Column blocks of a site's prunable units (see ``headprune.ranking.units``)."""
    size = hq // hkv if gqa == "group" and hkv else 1
    return [[h * d + j for h in range(start, start + size) for j in range(d)] for start in range(0, hq, size)]


def reconstruction_score(scores: HeadScores, gqa: str = "query", damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``[sites, heads]``: each head's unit's greedy marginal cost divided by the site's output
    energy, non-decreasing along the site's greedy order (ties broken by that order), so
    ranking lowest first removes units in greedy order within a site and by normalised cost
    across sites. Needs the second moments (``collect(..., moments=True)``)."""
    if scores.moments is None or scores.moments.projection is None:
        raise ValueError("score: 'reconstruction' needs second moments; collect the scores with moments=True")
    gqa = "group" if gqa == "group" else "query"  # "even" layouts remove query heads one by one
    cache = scores.moments.__dict__.setdefault("_scores", {})
    key = (gqa, float(damping), tuple(scores.num_heads))
    if key not in cache:
        cache[key] = _score(scores, gqa, damping)
    return cache[key].clone()


def _score(scores: HeadScores, gqa: str, damping: float) -> torch.Tensor:
    out = torch.full((scores.num_sites, scores.num_query_heads), math.nan, dtype=torch.float64)
    for i in range(scores.num_sites):
        gram, proj = scores.moments.gram[i], scores.moments.projection[i]
        hq, hkv, d = scores.num_heads[i], scores.num_kv_heads[i], scores.head_dim[i]
        if gram is None or hq == 0 or not float(gram[-1, -1]) > 0:
            continue
        units = site_units(hq, hkv, d, gqa)
        order, costs, energy = greedy_removal(gram, proj, units, damping=damping)
        level = 0.0
        for rank, (u, c) in enumerate(zip(order, costs)):
            level = max(level, c / max(energy, 1e-300))
            heads = sorted({col // d for col in units[u]})
            out[i, heads] = level * (1 + 1e-9 * rank) + 1e-300 * rank
    return out
