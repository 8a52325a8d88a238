"""Joint refit of the kept heads' value rows and output columns after heads are removed.

The output-projection refit (:mod:`.reconstruct`) keeps each kept head's output as it was and
refits the columns that read it. A head's output is ``o_h = A_h X W_vh^T + b_vh``: its
attention ``A_h`` applied to the layer's input ``X``, read through the ``d`` rows of the value
projection. Its whole contribution to the projection's output is ``M_h z_h`` with
``z_h = A_h x`` (``[hidden]`` per token) and ``M_h = W_oh W_vh`` (``[out, hidden]``, rank
``d``), so refitting the value rows too lets each kept head choose which ``d`` directions of
``A_h X`` it carries: with the removed heads gone, the kept ones can carry some of what those
added where their attention is alike.

With the second moments ``G = sum [z_K, 1][z_K, 1]^T`` of the kept heads' ``z`` and
``T = sum y [z_K, 1]^T`` (``y``: the unpruned projection's output), the ridge-damped error

    sum ||y - sum_h M_h z_h - c||^2 + sum_h mu_h ||M_h - M0_h||^2_F

(``M0_h``: the head's original map; ``mu_h = damping * mean(diag G[h, h])``, as in the
output refit, and at least :data:`MIN_RIDGE` times the trace of ``G``) is minimised over rank-``d``
maps ``M_h`` and the bias ``c`` by block coordinate descent from the output refit: each kept
head in turn gets the best rank-``d`` map given the others (reduced-rank regression: the top
``d`` directions of the unconstrained solution in the metric of its damped moments; a step
that would raise the error, as rounding can make it where that metric is near singular, is
not taken), the bias is exact after each step, and the damped error never rises. ``M_h`` is written back as ``W'_oh = U sqrt(S)``,
``W'_vh = sqrt(S) V^T``; value biases are kept and the output bias absorbs them (attention rows
sum to one, so a value bias reaches the output as a constant).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..stats.moments import DEFAULT_DAMPING, check_damping, ridge
from .reconstruct import solve_damped

__all__ = ["DEFAULT_SWEEPS", "refit_values"]

#: sweeps of block coordinate descent over the kept heads; measured on all-MiniLM-L6-v2, most
#: of the gain comes in the first sweep and four take nearly all of it
DEFAULT_SWEEPS = 4

#: the least ridge of every block, relative to the trace of the kept heads' moments: they are
#: float32 products summed in float64, and their rounding can make them indefinite (fewer
#: tokens than dimensions, or heads that attend alike: all-MiniLM-L6-v2 on 318 tokens, smallest
#: eigenvalue -1e-8 of the largest); with no ridge the descent then ran off (damping=0: errors
#: from -0.008 to 7.5e5, NaN or unrelated embeddings). Below the default damping's ridge there.
MIN_RIDGE = 1e-7


def _block_diag_values(wv: torch.Tensor, bv: Optional[torch.Tensor], kept: list, d: int) -> torch.Tensor:
    """``V~`` with ``[x_K, 1] = V~ [z_K, 1]``: the kept heads' value rows on the block diagonal,
    their biases in the last column (``[len(kept) d + 1, len(kept) hidden + 1]``)."""
    hid = wv.shape[1]
    k = len(kept)
    v = torch.zeros(k * d + 1, k * hid + 1, dtype=torch.float64, device=wv.device)
    for j, h in enumerate(kept):
        v[j * d:(j + 1) * d, j * hid:(j + 1) * hid] = wv[h * d:(h + 1) * d]
        if bv is not None:
            v[j * d:(j + 1) * d, -1] = bv[h * d:(h + 1) * d]
    v[-1, -1] = 1.0
    return v


def _output_refit(wo, gram, cross, vt, kept, d, damping):
    """The output-projection refit of :mod:`.reconstruct` from these moments: ``[W'_K, b']``
    against ``[x_K, 1]`` (the same fit, on the same tokens, by the same damped solve)."""
    anchor = torch.cat([wo[:, h * d:(h + 1) * d] for h in kept], 1)
    return solve_damped(vt @ gram @ vt.t(), vt @ cross.t(), damping, len(kept) * d, anchor.t()).t()


def refit_values(wo: torch.Tensor, wv: torch.Tensor, bv: Optional[torch.Tensor],
                 gram: torch.Tensor, cross: torch.Tensor, kept: list, d: int, *, damping: float = DEFAULT_DAMPING,
                 sweeps: int = DEFAULT_SWEEPS) -> tuple:
    """``(kept output columns [out, len(kept) d], output bias [out], kept value rows
    [len(kept) d, hidden], errors)`` (float64, on ``gram``'s device) of one site.

    Args:
        wo: the output projection's weight ``[out, heads d]`` (out x in layout; its bias is in ``cross``).
        wv, bv: the value projection ``[heads d, hidden]`` and its bias or ``None``.
        gram: ``[len(kept) hidden + 1]^2`` sums of ``[z_K, 1][z_K, 1]^T`` (blocks in ``kept``'s order).
        cross: ``[out, len(kept) hidden + 1]`` sums of ``y [z_K, 1]^T``, ``y`` the unpruned output.
        kept: the kept heads; d: the head size.
        sweeps: passes of block coordinate descent; 0 gives the output-projection refit.

    ``errors``: the damped error per token before the first sweep and after each, less the
    constant ``E||y||^2`` (the objective as it is minimised: only differences mean anything).
    """
    damping = check_damping(damping)
    if isinstance(sweeps, bool) or not isinstance(sweeps, numbers.Integral) or sweeps < 0:
        raise ValueError(f"sweeps: expected a non-negative int, got {sweeps!r}")
    sweeps = int(sweeps)
    gram, cross = gram.double(), cross.to(gram.device, torch.float64)  # on the moments' device (a CUDA model's
    wo, wv = wo.to(gram.device, torch.float64), wv.to(gram.device, torch.float64)  # moments are kept on the CPU)
    bv = None if bv is None else bv.to(gram.device, torch.float64)
    hid, k = wv.shape[1], len(kept)
    if gram.shape != (k * hid + 1, k * hid + 1) or cross.shape != (wo.shape[0], k * hid + 1):
        raise ValueError(f"gram, cross: expected [{k * hid + 1}]^2 and [{wo.shape[0]}, {k * hid + 1}] for "
                         f"{k} kept heads of width {hid}, got {tuple(gram.shape)} and {tuple(cross.shape)}")
    n = gram[-1, -1]
    if not float(n) > 0:
        raise ValueError("gram: no calibration token")
    vt = _block_diag_values(wv, bv, kept, d)
    # a floor for the output refit the descent starts from too, relative to its moments' mean
    # diagonal: MIN_RIDGE * k * hid (the z-moments' trace over their mean diagonal; the value
    # moments' rounding reaches these through V, and k * d would be the x-moments' own count)
    p = _output_refit(wo, gram, cross, vt, kept, d, max(damping, MIN_RIDGE * k * hid))
    blk = [slice(j * hid, (j + 1) * hid) for j in range(k)]
    m0 = [wo[:, h * d:(h + 1) * d] @ wv[h * d:(h + 1) * d] for h in kept]
    m = [p[:, j * d:(j + 1) * d] @ wv[h * d:(h + 1) * d] for j, h in enumerate(kept)]
    c = p[:, -1] + (p[:, :-1] @ vt[:-1, -1])  # the bias with the value biases folded in
    floor = MIN_RIDGE * gram.diagonal()[:-1].sum()
    mu = [torch.maximum(ridge(gram[b, b], damping, hid), floor) for b in blk]
    eye = torch.eye(hid, dtype=torch.float64, device=gram.device)

    def error():
        full = torch.cat(m + [c[:, None]], 1)
        fit = (full @ gram * full).sum() - 2 * (full * cross).sum()
        prior = sum(u * (a - b).square().sum() for u, a, b in zip(mu, m, m0))
        return float((fit + prior) / n)

    errors = [error()]
    for _ in range(sweeps):
        for j in range(k):
            b = blk[j]
            target = cross[:, b] - c[:, None] @ gram[-1:, b]
            for i in range(k):
                if i != j:
                    target = target - m[i] @ gram[blk[i], b]
            m[j] = _block_step(gram[b, b] + mu[j] * eye, target + mu[j] * m0[j], d, m[j])
            c = (cross[:, -1] - sum(m[i] @ gram[blk[i], -1] for i in range(k))) / n
        errors.append(error())
    cols, rows = [], []
    for mj in m:
        u, s, vh = torch.linalg.svd(mj, full_matrices=False)
        root = s[:d].sqrt()
        cols.append(u[:, :d] * root)
        rows.append(root[:, None] * vh[:d])
    cols, rows = torch.cat(cols, 1), torch.cat(rows, 0)
    if bv is not None:
        c = c - cols @ torch.cat([bv[h * d:(h + 1) * d] for h in kept])
    return cols, c, rows, errors


def _block_step(metric: torch.Tensor, target: torch.Tensor, d: int, current: torch.Tensor) -> torch.Tensor:
    """The best rank-``d`` map ``M`` of one block given the others: minimising
    ``tr(M metric M^T) - 2 tr(M target^T)`` (reduced-rank regression in the metric), or
    ``current`` where rounding made that step uphill (a near-singular ``metric``)."""
    free, root = _solve_psd(metric, target.t())
    free = free.t()
    u = torch.linalg.svd(free @ root, full_matrices=False)[0][:, :d]
    new = u @ (u.t() @ free)

    def error(m):
        return float(((m @ metric) * m).sum() - 2 * (m * target).sum())

    return new if error(new) <= error(current) else current


def _solve_psd(a: torch.Tensor, rhs: torch.Tensor) -> tuple:
    """``(a^-1 rhs, L)`` with ``a = L L^T``, for a symmetric positive semi-definite ``a``: by
    Cholesky, or where ``a`` is singular (``damping=0`` with value inputs that span fewer
    dimensions than the hidden size) the minimum-norm solution and an eigenvalue root."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.linalg.solve(a, rhs), chol
    e, v = torch.linalg.eigh(a)
    return torch.linalg.pinv(a, hermitian=True) @ rhs, v * e.clamp_min(0).sqrt()
