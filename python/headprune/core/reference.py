"""Pure-PyTorch reference path: the oracle of the tests and the baseline of the benchmarks.

Everything here computes in float64 and materialises full attention maps, which is exactly
what the native ops avoid. Entropies are in nats.

The per-row statistics shared by all functions (reduced per head into the columns of
:class:`headprune.core.schema.Stat`):

* ``H``      entropy of the row, ``-sum_j p_j log p_j`` (the probs path uses ``log(p + eps)``,
             the formula as written);
* ``n``      number of visible keys (finite logit / non-zero probability);
* ``p_first`` probability mass on the first visible key (the "attention sink");
* ``H_rest`` entropy of the row renormalised over the visible keys other than the first.

A row with no visible key (fully masked, or an all-zero probability row) is not counted.
"""

from __future__ import annotations

import math

import torch

from .schema import MASKED_LOGIT, Stat

#: the bound the ops compare with, in every input type: float32's nearest value to MASKED_LOGIT
#: (-9.99999993e36, above -1e37: a float64 logit between the two is masked too)
MASKED_BOUND = float(torch.tensor(MASKED_LOGIT, dtype=torch.float32))


def attention_logits(query, key, scale, attn_mask=None, is_causal=False):
    """Float64 logits ``[B, Hq, Q, K]`` with ``-inf`` at masked keys.

    ``query [B, Hq, Q, D]``, ``key [B, Hkv, K, D]`` with ``Hq % Hkv == 0`` (grouped-query
    attention: query head ``h`` reads KV head ``h // (Hq // Hkv)``). ``attn_mask`` is boolean
    (True = attend) or additive float, broadcastable to ``[B, Hq, Q, K]``. ``is_causal``
    aligns the last query with the last key: query ``i`` sees keys ``j <= i + K - Q``.
    """
    q = query.double()
    k = key.double()
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
    z = torch.matmul(q, k.transpose(-1, -2)) * scale
    Q, K = z.shape[-2], z.shape[-1]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            z = z.masked_fill(~attn_mask, -math.inf)
        else:
            z = z + attn_mask.double()
    if is_causal:
        i = torch.arange(Q).unsqueeze(1)
        j = torch.arange(K).unsqueeze(0)
        z = z.masked_fill((j > i + (K - Q)).to(z.device), -math.inf)
    return z.masked_fill(z <= MASKED_BOUND, -math.inf)


def row_stats_from_logits(z):
    """Per-row ``(H, n, p_first, H_rest)`` from float64 logits (``-inf`` = masked)."""
    visible = torch.isfinite(z)
    n = visible.sum(-1)
    p = torch.softmax(z, dim=-1).nan_to_num(0.0)
    logp = torch.log_softmax(z, dim=-1)
    plogp = torch.where(visible, p * logp, torch.zeros((), dtype=z.dtype, device=z.device))
    H = -plogp.sum(-1)
    first = visible.to(torch.int8).argmax(-1, keepdim=True)
    p_first = p.gather(-1, first).squeeze(-1)
    rest = z.scatter(-1, first, -math.inf)
    rest_visible = torch.isfinite(rest)
    pr = torch.softmax(rest, dim=-1).nan_to_num(0.0)
    lpr = torch.log_softmax(rest, dim=-1)
    H_rest = -torch.where(rest_visible, pr * lpr, torch.zeros((), dtype=z.dtype, device=z.device)).sum(-1)
    H_rest = torch.where(n >= 2, H_rest, torch.zeros_like(H_rest))
    return H, n, p_first, H_rest


def row_stats_from_probs(probs, eps=1e-8):
    """Per-row ``(H, n, p_first, H_rest)`` from probabilities, with the formula as written:
    ``H = -sum_k p log(p + eps)``; ``n`` counts non-zero entries."""
    p = probs.double()
    visible = p != 0
    log_p = torch.log(p + eps)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    H = -torch.where(visible, p * log_p, zero).sum(-1)  # 0 log 0 = 0, also for eps = 0
    n = visible.sum(-1)
    first = visible.to(torch.int8).argmax(-1, keepdim=True)
    p_first = p.gather(-1, first).squeeze(-1)
    rest = visible & ~torch.zeros_like(visible).scatter(-1, first, True)
    s_rest = torch.where(rest, p, zero).sum(-1)
    # sum (p / s) log(p + eps) rather than (sum p log(p + eps)) / s: the weights p / s stay
    # normal floats when the rest's mass is subnormal in float64.
    s_safe = torch.where(n >= 2, s_rest, 1.0).unsqueeze(-1)
    weighted = torch.where(rest, p / s_safe * log_p, zero).sum(-1)
    H_rest = torch.where(n >= 2, torch.log(s_safe.squeeze(-1)) - weighted, zero)
    return H, n, p_first, H_rest


def _reduce(H, n, p_first, H_rest, query_mask):
    """Per-head statistics ``[H, NUM_STATS]`` over valid rows (``n > 0`` and query_mask)."""
    valid = n > 0
    if query_mask is not None:
        valid = valid & query_mask.bool()[:, None, :].to(valid.device)
    v = valid.double()
    logn = torch.log(n.double().clamp_min(1))
    norm = torch.where(n >= 2, H / logn.clamp_min(1e-300), 0.0)
    cols = {Stat.COUNT: v, Stat.SUM: H * v, Stat.SUM_SQ: H * H * v, Stat.SUM_NORM: norm * v,
            Stat.SUM_FIRST: p_first * v, Stat.SUM_REST: H_rest * v}
    cols = [cols[s] for s in Stat]
    cols = [torch.where(valid, c, 0.0) for c in cols]  # 0 * nan stays out
    return torch.stack([c.sum(dim=(0, 2)) for c in cols], dim=-1)


def entropy_stats_from_probs(probs, query_mask=None, eps=1e-8):
    """Statistics ``[H, NUM_STATS]`` (float64) of ``probs [B, H, Q, K]``."""
    return _reduce(*row_stats_from_probs(probs, eps), query_mask)


def entropy_stats_from_qk(query, key, scale, attn_mask=None, is_causal=False, query_mask=None):
    """Statistics ``[Hq, NUM_STATS]`` (float64) of ``softmax(q k^T * scale + mask)``."""
    z = attention_logits(query, key, scale, attn_mask, is_causal)
    return _reduce(*row_stats_from_logits(z), query_mask)


def attention_stats(query, key, value, scale, attn_mask=None, is_causal=False, query_mask=None):
    """``(output [B, Hq, Q, Dv], stats [Hq, NUM_STATS])`` in float64: the attention output
    ``softmax(q k^T * scale + mask) @ value`` (zero for rows with no visible key) and the
    statistics of :func:`entropy_stats_from_qk`."""
    z = attention_logits(query, key, scale, attn_mask, is_causal)
    v = value.double()
    group = query.shape[1] // value.shape[1]
    if group > 1:
        v = v.repeat_interleave(group, dim=1)
    out = torch.matmul(torch.softmax(z, dim=-1).nan_to_num(0.0), v)
    return out, _reduce(*row_stats_from_logits(z), query_mask)


def entropy_from_probs(probs, query_mask=None, eps=1e-8):
    """``(sums [H] float64, counts [H] int64)``: the formula as written,
    ``-(p * log(p + eps)).sum(-1)`` summed over valid query rows."""
    s = entropy_stats_from_probs(probs, query_mask, eps)
    return s[:, Stat.SUM], s[:, Stat.COUNT].long()


def entropy_from_qk(query, key, scale, attn_mask=None, is_causal=False, query_mask=None):
    """``(sums [Hq] float64, counts [Hq] int64)`` of the attention rows' entropies."""
    s = entropy_stats_from_qk(query, key, scale, attn_mask, is_causal, query_mask)
    return s[:, Stat.SUM], s[:, Stat.COUNT].long()


def apply_head_mask(x, mask, head_dim, dim):
    """Out-of-place reference of ``apply_head_mask_``: ``x`` with head ``h``'s slice along
    ``dim`` (laid out as ``num_heads x head_dim``) multiplied by ``mask[h]`` rounded to
    ``x``'s type (as the op takes it), the product rounded once."""
    dim = dim % x.dim()
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    gate = mask.to(x.dtype).double().repeat_interleave(head_dim).reshape(shape)
    return (x.double() * gate).to(x.dtype)


def formula_entropy(probs, query_mask=None, eps=1e-8):
    """The formula as a user writes it, in the input's dtype: ``(sums [H], counts [H])`` of
    ``-(p * log(p + eps)).sum(-1)`` over valid query rows. The benchmarks' baseline."""
    H = -(probs * torch.log(probs + eps)).sum(-1)  # [B, H, Q], several probs-sized temporaries
    if query_mask is None:
        return H.sum((0, 2)).double(), torch.full((probs.shape[1],), probs.shape[0] * probs.shape[2])
    m = query_mask[:, None, :].to(H.dtype)
    return (H * m).sum((0, 2)).double(), m.sum((0, 2)).long().expand(probs.shape[1])


def formula_entropy_from_qk(query, key, scale, attn_mask=None, is_causal=False, query_mask=None, eps=1e-8):
    """Baseline for the QK op: materialise ``softmax(q k^T * scale + mask)`` in the input dtype,
    then apply :func:`formula_entropy`."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    z = torch.matmul(query, k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        z = z.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else z + attn_mask
    if is_causal:
        Q, K = z.shape[-2:]
        z = z.masked_fill(torch.ones(Q, K, dtype=torch.bool, device=z.device).triu(K - Q + 1), -math.inf)
    return formula_entropy(torch.softmax(z, -1), query_mask, eps)
