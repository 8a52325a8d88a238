"""Least-squares reconstruction of an output projection after some of its heads are removed.

The output projection of an attention site computes ``W x + b`` from ``x``, the heads' outputs
side by side. Keeping the columns ``K`` (the kept heads) and the constant, the kept columns and
the bias are refit so that ``W'_K x_K + b'`` reproduces ``W x + b`` over the calibration tokens
as well as least squares allows: with ``G = E[x~ x~^T]`` (``x~ = [x, 1]``, see
:class:`~headprune.stats.moments.OutputMoments`) and ``S = K + [constant]``,

    [W'_K, b'] = [W_K, b] + W_R G[R, S] (G[S, S] + lambda I_K)^-1      (R: the removed columns),

the minimiser of the squared output error plus ``lambda ||W'_K - W_K||^2``: the ridge pulls the
kept columns towards their original values (``anchor="original"``, the default). With
``anchor="zero"`` it pulls them towards zero, ``[W, b] G[:, S] (G[S, S] + lambda I_K)^-1``, the
structured Optimal Brain Surgeon update of SlimGPT and ZipLM; without damping the two are the
same. ``lambda`` is a ridge damping relative to the mean of ``diag(G[K, K])`` (the constant is
not damped, so the bias stays exact). Mean compensation is the same problem with the kept
columns frozen: only the bias moves, by what the removed heads add on average. Without the
bias (``fit_bias=False``: a family whose config declares no attention bias, so that plain
``from_pretrained`` still describes the model) ``S = K``: the kept columns alone reproduce
``W x`` as well as they can, the bias stays as it was.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..stats.moments import DEFAULT_DAMPING, check_damping, ridge

#: the least damping of a refit from second moments summed in float32: their rounding (about 1e-7
#: of each sum, more over many tokens) makes a singular G look full rank, and without a ridge the
#: refit fits it; this one is far below what calibration data pins down
COARSE_DAMPING = 1e-6

__all__ = ["DEFAULT_DAMPING", "refit_output", "kept_columns", "solve_damped"]


def kept_columns(num_heads: int, head_dim: int, removed) -> list:
    """Input columns of the output projection that the heads not in ``removed`` feed."""
    gone = set(removed)
    return [h * head_dim + j for h in range(num_heads) if h not in gone for j in range(head_dim)]


def _as_out_in(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return (weight.t() if conv1d else weight).double()


def refit_output(weight: torch.Tensor, bias: Optional[torch.Tensor], gram: torch.Tensor, keep: list, *,
                 damping: float = DEFAULT_DAMPING, conv1d: bool = False, freeze_kept: bool = False,
                 anchor: str = "original", fit_bias: bool = True) -> tuple:
    """``(new kept columns, new bias)`` of an output projection that keeps input columns ``keep``.

    Args:
        weight: ``[out, D]`` (``[D, out]`` for a ``Conv1D``); bias: ``[out]`` or ``None``.
        gram: ``[D + 1, D + 1]`` second moments of ``[x, 1]`` (sums or means: the scale cancels).
        keep: the kept input columns, in the order they will have.
        damping: ridge ``lambda`` relative to the mean of ``diag(G[K, K])``; 0 solves by least
            squares (a singular ``G[K, K]`` then gets the solution nearest the kept weights, so
            nothing changes where no column goes). Moments summed in float32 take at least
            :data:`COARSE_DAMPING`.
        anchor: what the ridge pulls the kept columns towards: ``"original"`` (their values
            before the refit: a large damping tends to mean compensation, and what the
            calibration text cannot pin down stays as the model had it) or ``"zero"`` (the
            classic ridge).
        freeze_kept: keep the kept columns as they are and move only the bias (mean compensation).
        fit_bias: ``False`` refits the kept columns without the constant and leaves the bias as
            it is (``None`` stays ``None``).

    Returns the kept columns in ``weight``'s layout and dtype (``[out, len(keep)]`` or
    ``[len(keep), out]``) and the bias ``[out]`` in float64 (``None`` for ``bias=None`` and
    ``fit_bias=False``).
    """
    d = gram.shape[0] - 1
    w = _as_out_in(weight, conv1d)
    if w.shape[1] != d:
        raise ValueError(f"gram: expected [{w.shape[1] + 1}, {w.shape[1] + 1}] for a weight with {w.shape[1]} inputs, "
                         f"got {list(gram.shape)}")
    damping = check_damping(damping)
    if anchor not in ("original", "zero"):
        raise ValueError(f"anchor: expected 'original' or 'zero', got {anchor!r}")
    if not isinstance(fit_bias, bool) or (freeze_kept and not fit_bias):
        raise ValueError(f"fit_bias: expected a bool, and True with freeze_kept (which moves only the bias), got "
                         f"{fit_bias!r}")
    coarse = gram.dtype != torch.float64  # sums in float32: a singular G looks full rank through their rounding
    g = gram.to(w.device, torch.float64)
    if not g[d, d] > 0:
        raise ValueError("gram: no calibration token was seen (the constant's moment is 0)")
    g = g / g[d, d]
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.detach().double()
    wt = torch.cat([w, b[:, None]], 1)  # [out, D + 1]
    keep_t = torch.as_tensor(list(keep), dtype=torch.long, device=w.device)
    if freeze_kept:
        gone = torch.ones(d, dtype=torch.bool, device=w.device)
        gone[keep_t] = False
        new_b = b + w[:, gone] @ g[:d, d][gone]
        return weight.index_select(0 if conv1d else 1, keep_t).clone(), new_b
    if not fit_bias:  # the fit of W x alone: the constant and the bias are left out of it
        g, wt = g[:d, :d], w
    s = torch.cat([keep_t, torch.tensor([d], device=w.device)]) if fit_bias else keep_t
    gone = torch.ones(g.shape[0], dtype=torch.bool, device=w.device)
    gone[s] = False
    a = g[s][:, s]
    k = len(keep)
    if coarse:  # a ridge the float32 sums' rounding cannot fake (kept columns 10,000x the original without)
        damping = max(damping, COARSE_DAMPING)
    c = ridge(a, damping, k) if damping > 0 and k > 0 else None
    if c is not None:
        a.diagonal()[:k] += c
    # With A = G[S, S] + c I_K the normal equations' right side G[S, :] W~^T + c [W_K, 0]^T is
    # A W~_S^T + G[S, R] W~_R^T (R: the removed columns), so the solution is the kept weights
    # plus A^-1 G[S, R] W~_R^T: a solve with |R| right sides instead of one per output.
    # singular (no damping, fewer tokens than inputs or heads that depend on each other): the
    # least change of the kept weights, by least squares (all of them kept: none)
    solve = _solver(a, rank_check=c is None)
    sol = wt[:, s].t() + (solve(g[s][:, gone]) @ wt[:, gone].t() if bool(gone.any()) else 0.0)  # none gone: as they are
    if anchor == "zero" and c is not None:  # the ridge pulls towards 0: the prior term goes
        prior = torch.zeros_like(sol)
        prior[:k] = w[:, keep_t].t()
        sol -= c * solve(prior)
    new_w = (sol[:-1] if fit_bias else sol).t()  # [out, |K|]
    new_w = new_w.t() if conv1d else new_w
    # copies: for a float64 model .to() returns the views of ``sol``, and parameters sharing one
    # storage cannot be saved as safetensors
    new_b = sol[-1].clone() if fit_bias else None if bias is None else b.clone()
    return new_w.to(weight.dtype).clone(memory_format=torch.contiguous_format), new_b


def solve_damped(a: torch.Tensor, rhs: torch.Tensor, damping: float, k: int, prior=None) -> torch.Tensor:
    """``(a + c I_k) x = rhs + c prior`` with ``c = damping * mean(diag(a[:k, :k]))`` (the ridge
    towards ``prior`` ``[k, out]``, or towards 0); Cholesky, least squares if singular."""
    a = a.clone()
    if damping > 0 and k > 0:
        c = ridge(a, damping, k)
        a.diagonal()[:k] += c
        if prior is not None:
            rhs = rhs.clone()
            rhs[:k] += c * prior
    return _solver(a)(rhs)


def _solver(a: torch.Tensor, rank_check: bool = False):
    """``solve(rhs)`` for ``a x = rhs``: by its Cholesky factor, by least squares where that
    fails or (``rank_check``, for moments without a ridge) where rounding let a factor of
    singular moments through (fewer tokens than columns: a pivot below 1e-6 of the largest, a
    condition number above 1e12, where float64 sums carry no more)."""
    chol, info = torch.linalg.cholesky_ex(a)
    factored = int(info) == 0
    if factored and rank_check and chol.numel():
        pivots = chol.diagonal().abs()
        factored = not bool(pivots.min() <= 1e-6 * pivots.max())
    return (lambda rhs: torch.cholesky_solve(rhs, chol)) if factored else (lambda rhs: _least_squares(a, rhs))


def _least_squares(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """The minimum-norm least-squares solution of a possibly singular ``a x = rhs``, on the CPU
    (the SVD driver it takes, ``gelsd``, is a CPU one: CUDA offers only ``gels``, for full rank)."""
    return torch.linalg.lstsq(a.cpu(), rhs.cpu(), driver="gelsd").solution.to(a.device)
