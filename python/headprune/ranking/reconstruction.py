"""Selection by what the least-squares refit cannot recover (structured Optimal Brain Surgeon).

For one site with ``G = E[x~ x~^T]``, the projection ``W~ = [W, b]`` and the columns ``S``
still kept, the refit's weights are ``W* = W~ G[:, S] G[S, S]^-1`` and removing the block ``B``
of one unit (a head, or a KV group's heads) raises the output's squared error per token by

    cost(B) = tr(W*_B (M_BB)^-1 W*_B^T),    M = G[S, S]^-1.

Greedy removal takes the cheapest unit, then updates ``W*`` and ``M`` in place (the block
downdate ``M <- M_RR - M_RB M_BB^-1 M_BR``, ``W*_R <- W*_R - W*_B M_BB^-1 M_BR``: no
refactorisation), and repeats, as SlimGPT and ZipLM do. The marginal costs are divided by
the site's output energy ``E||W~ x~||^2`` so sites compare on one scale; made non-decreasing
along each site's greedy order, they are the ``reconstruction`` score, lowest first.

With ``damping`` the diagonal of ``G`` over all ``D`` head columns gets the ridge ``c`` of
:func:`~headprune.stats.moments.ridge`, and the costs are the rises of that ridge-towards-zero
objective (``anchor="zero"`` in :func:`~headprune.prune.reconstruct.refit_output`). Without
damping they are exactly the refit's errors; with it they can differ from the errors of the
refit applied by default, whose ridge pulls the kept columns towards their original values
(``anchor="original"``), so the greedy order is that of a close, not the same, objective.
"""

from __future__ import annotations

import math

import torch

from ..stats.moments import DEFAULT_DAMPING, check_damping, check_finite, ridge
from ..stats.scores import HeadScores

__all__ = ["greedy_removal", "reconstruction_score", "site_units"]


class SingularMoments(ValueError):
    """Costs asked of singular second moments without damping: a setting to change, not a
    fraction out of reach."""


def greedy_removal(gram: torch.Tensor, projection: torch.Tensor, units: list, *,
                   damping: float = DEFAULT_DAMPING, energy: bool = True) -> tuple:
    """``(order, costs, energy)``: the indices of ``units`` in greedy removal order, the
    squared output error per token each removal adds (under the ridge towards zero, see the
    module doc), and the site's output energy per token (``None`` with ``energy=False``, for a
    caller that needs the order alone).

    ``units``: lists of input columns removed together; ``gram`` ``[D + 1, D + 1]`` (sums or
    means), ``projection`` ``[out, D + 1]``.
    """
    d = gram.shape[0] - 1
    g = gram.double()
    g = g / g[d, d]  # a new tensor, written in place below
    wt = projection.double().to(g.device)
    total = None
    if energy:  # a normaliser only: float32 products, a float64 sum (relative error ~1e-6, half the time)
        w32 = wt.float()
        total = float((w32 @ g.float()).mul_(w32).sum(dtype=torch.float64))
    k, perm = _layout(units, d)
    nb = k * len(units)  # the blocks' end, where the fixed columns start
    c = ridge(g, damping, d) if damping > 0 and d > 0 else None
    if perm != list(range(d + 1)):
        perm = torch.tensor(perm, dtype=torch.long, device=g.device)
        g = g.index_select(0, perm).index_select(1, perm)
        wt = wt.index_select(1, perm)
    if c is not None:
        g.diagonal()[:-1] += c
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0 and c is None:  # an inverse of singular moments gives costs of rounding, or none
        raise SingularMoments("damping: 0 leaves these second moments singular (fewer calibration tokens than the site's "
                         f"{d} inputs, or heads whose outputs depend on each other); pass a positive damping")
    m = torch.cholesky_inverse(chol) if int(info) == 0 else torch.linalg.inv(g)
    # the refit with every column kept, transposed ([D + 1, out]: a unit's rows are contiguous):
    # W* = W~ G M = W~ (A - C) M = W~ - c W~[:, :D] M[:D]  (A = G + C, C: the ridge, not on the constant)
    ws = wt.t().contiguous() if c is None else torch.addmm(wt.t(), m[:, :-1], wt[:, :-1].t(), alpha=-float(c))
    slots = list(range(len(units)))  # the unit in each live block, in block order
    order, costs, s = [], [], 0  # s: the live region's start
    while slots:
        live = len(slots)
        # every live unit's cost in one batched solve: tr(W*_B M_BB^-1 W*_B^T) = ||L^-1 W*_B^T||^2
        # with M_BB = L L^T, the diagonal blocks of the live part of M
        mbb = m[s:nb, s:nb].reshape(live, k, live, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [live, k, k]
        wb = ws[s:nb].view(live, k, -1)  # [live, k, out]
        chol, info = torch.linalg.cholesky_ex(mbb)
        if int(info.max()) == 0:
            cost = torch.linalg.solve_triangular(chol, wb, upper=False).square_().sum((1, 2))
        else:
            cost = (torch.linalg.solve(mbb, wb) * wb).sum((1, 2))
        cost = torch.nan_to_num(cost, nan=math.inf).tolist()
        low = min(cost)
        j = min((i for i in range(live) if cost[i] == low), key=lambda i: slots[i])  # the first unit of equal minima
        order.append(slots[j])
        costs.append(max(cost[j], 0.0))
        if live > 1:
            _swap_blocks_(m, ws, s, s + j * k, k)
            slots[j] = slots[0]
            _downdate_(m, ws, s, s + k)
        slots.pop(0)
        s += k
    return order, costs, total


def _layout(units: list, d: int) -> tuple:
    """``(k, perm)``: the units' size, and the columns reordered (a site's heads in order, the
    constant last: as they are): the units' blocks side by side, then any column outside every
    unit and the constant (always kept). A removed unit's block is swapped to the start of the
    live region, which then starts after it, so every step works on views of the live part."""
    sizes = {len(u) for u in units}
    if len(sizes) > 1:
        raise ValueError(f"units: expected blocks of one size, got sizes {sorted(sizes)}")
    k = len(units[0]) if units else 0
    inside = {col for u in units for col in u}
    if len(inside) != k * len(units) or not inside <= set(range(d)):
        raise ValueError(f"units: expected disjoint blocks of the {d} input columns")
    return k, [col for u in units for col in u] + [col for col in range(d) if col not in inside] + [d]


def _swap_blocks_(m, ws, p, q, k) -> None:
    """Swap the blocks of ``k`` rows and columns at ``p`` (the live part's start) and ``q`` of
    the live ``m[p:, p:]`` and the rows of ``ws``."""
    if p == q:
        return
    for t in (m[:, p:], ws):
        rows = t[p : p + k].clone()
        t[p : p + k] = t[q : q + k]
        t[q : q + k] = rows
    cols = m[p:, p : p + k].clone()
    m[p:, p : p + k] = m[p:, q : q + k]
    m[p:, q : q + k] = cols


def _downdate_(m, ws, b, r) -> None:
    """Remove the live block ``B = [b, r)`` (the start of the live part) from the kept set, in
    place on the live part ``[r:]`` that remains: the OBS update of ``M`` (symmetric) and of
    the refit, ``M_RR - M_RB X`` and ``W*_R^T - X^T W*_B^T`` with ``X = M_BB^-1 M_BR``."""
    m_br = m[b:r, r:]  # [k, R]: rows outside the updated part, so read safely while it is written
    x = torch.linalg.solve(m[b:r, b:r], m_br)  # [k, R]
    m[r:, r:].addmm_(m_br.t(), x, alpha=-1.0)
    ws[r:].addmm_(x.t(), ws[b:r], alpha=-1.0)


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
        check_finite("scores", scores.names[i], gram, proj)
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
