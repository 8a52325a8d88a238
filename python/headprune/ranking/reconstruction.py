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

from ..stats.moments import DEFAULT_DAMPING, check_damping, ridge
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
    energy = float((wt @ g).mul_(wt).sum())
    a = g.clone()
    c = ridge(a, damping, d) if damping > 0 and d > 0 else None
    if c is not None:
        a.diagonal()[:d] += c
    chol, info = torch.linalg.cholesky_ex(a)
    m = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.inv(a)
    # the refit with every column kept, transposed ([D + 1, out]: a unit's rows are contiguous):
    # W* = W~ G M = W~ (A - C) M = W~ - c W~[:, :d] M[:d]  (A = G + C, C the ridge on the first d)
    ws = wt.t().contiguous() if c is None else torch.addmm(wt.t(), m[:, :d], wt[:, :d].t(), alpha=-float(c))
    sizes = {len(u) for u in units}
    if len(sizes) > 1:
        raise ValueError(f"units: expected blocks of one size, got sizes {sorted(sizes)}")
    cols = torch.tensor(units, dtype=torch.long, device=m.device).reshape(len(units), -1)  # [n, k]
    where = torch.arange(d + 1, device=m.device)  # original column -> its position in m / ws
    left = list(range(len(units)))
    order, costs = [], []
    while left:
        # every remaining unit's cost in one batched solve
        pos = where[cols[left]]  # [r, k]
        mbb = m[pos[:, :, None], pos[:, None, :]]  # [r, k, k]
        wb = ws[pos]  # [r, k, out]
        chol, info = torch.linalg.cholesky_ex(mbb)
        if int(info.max()) == 0:  # tr(M_BB^-1 W*_B^T W*_B), the [k, k] products first
            cost = (torch.cholesky_inverse(chol) * (wb @ wb.transpose(1, 2))).sum((1, 2))
        else:
            cost = (torch.linalg.solve(mbb, wb) * wb).sum((1, 2))
        j = int(torch.argmin(torch.nan_to_num(cost, nan=math.inf)))  # the first of equal minima
        order.append(left.pop(j))
        costs.append(max(float(cost[j]), 0.0))
        if left:
            m, ws, where = _downdate(m, ws, where, pos[j], mbb[j], wb[j])
    return order, costs, energy


def _downdate(m, ws, where, b, mbb, wb) -> tuple:
    """Remove the columns at positions ``b`` (``mbb = M_BB``, ``wb = W*_B^T`` as rows of
    ``ws = W*^T``) from the kept set: the OBS update of the refit and of ``M`` (symmetric),
    ``M_RR - M_RB X`` and ``W*_R^T - X^T W*_B^T`` with ``X = M_BB^-1 M_BR``; ``where`` maps
    original columns to positions."""
    alive = torch.ones(m.shape[0], dtype=torch.bool, device=m.device)
    alive[b] = False
    keep = alive.nonzero().flatten()
    m_br = m.index_select(0, b).index_select(1, keep)  # [k, R]
    x = torch.linalg.solve(mbb, m_br)  # [k, R]
    new_m = m.index_select(0, keep).index_select(1, keep).addmm_(m_br.t(), x, alpha=-1.0)
    new_w = ws.index_select(0, keep).addmm_(x.t(), wb, alpha=-1.0)
    new_pos = torch.full_like(alive, -1, dtype=torch.long)
    new_pos[keep] = torch.arange(len(keep), device=m.device)
    return new_m, new_w, torch.where(where >= 0, new_pos[where.clamp_min(0)], -1)


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
    damping = check_damping(damping)
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
