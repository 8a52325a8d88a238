"""Thin typed wrappers over the native ops ``torch.ops.headprune.*``.

All entropies are in nats and accumulated in float64 whatever the input dtype. The
accumulating ops (trailing ``_``) add into caller-owned tensors and return ``None``; on any
error the accumulators are left unchanged. The one exception, ``attention_stats_accumulate_``,
returns the attention output it computed. The entropy ops are not differentiable: while grad
mode is on they refuse a tensor that requires grad (call them under ``torch.no_grad()`` or on
detached tensors). Every tensor must be on the device of ``probs`` / ``query``. The native
extension is loaded when this module is imported, where it loads (otherwise the first call
raises why; see :mod:`headprune.core.build`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import build

__all__ = [
    "apply_head_mask_",
    "attention_stats_accumulate_",
    "entropy_from_probs_accumulate_",
    "entropy_from_qk_accumulate_",
    "entropy_stats_from_probs_accumulate_",
    "entropy_stats_from_qk_accumulate_",
]


#: what loading the extension on import raised or warned, said by the first op call instead
_AT_IMPORT = {"error": None, "warnings": []}


def _ops():
    """``torch.ops.headprune``, with the extension loaded (so the pure-Python layers import
    without a build, and the first call says why it does not load)."""
    while _AT_IMPORT["warnings"]:
        w = _AT_IMPORT["warnings"].pop(0)
        warnings.warn(w.message, w.category, stacklevel=3)
    if _AT_IMPORT["error"] is not None and build._loaded is None:
        raise _AT_IMPORT["error"]  # (a stale build's fakes fail: loading again would fail otherwise)
    build.load_extension()
    return torch.ops.headprune


def _load_if_built() -> None:
    """Loads the extension on import where it loads: torch.compile cannot trace the loader (its
    lock), so a compiled function whose op call was the process's first use failed under
    ``fullgraph=True``. Nothing is raised or warned at import (``-W error`` imports too): without
    a usable build the pure-Python layers still import, and the first call raises why or warns."""
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            build.load_extension()
        _AT_IMPORT["warnings"] = list(seen)
    except Exception as e:  # noqa: BLE001 - raised by the first call
        _AT_IMPORT["error"] = e


_load_if_built()


def entropy_from_probs_accumulate_(
    sums: torch.Tensor,
    counts: torch.Tensor,
    probs: torch.Tensor,
    query_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> None:
    """Add per-head row entropies of attention probabilities.

    Args:
        sums: ``[H]`` float64, receives ``sum over valid rows of -sum_k p log(p + eps)``.
        counts: ``[H]`` int64, receives the number of valid rows.
        probs: ``[B, H, Q, K]`` float16/bfloat16/float32/float64, any strides, ``>= 0``.
        query_mask: optional ``[B, Q]`` bool, False excludes a (padded) query row.
        eps: added inside the log (the formula as written): finite, ``>= 0`` and within the
            range of the type the rows are computed in (float32, float64 for float64 probs).

    All-zero rows (fully masked) are not counted. NaN or inf in a row that ``query_mask`` keeps
    raise (rows it excludes are not read for them); a negative value raises wherever it is, in
    excluded rows too. Nothing is accumulated when an error is raised.
    """
    _ops().entropy_from_probs_accumulate_(sums, counts, probs, query_mask, eps)


def entropy_from_qk_accumulate_(
    sums: torch.Tensor,
    counts: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    query_mask: Optional[torch.Tensor] = None,
) -> None:
    """Add per-head entropies of ``softmax(query @ key^T * scale + attn_mask)`` rows without
    materialising the ``Q x K`` map (online max / sum-exp / sum z*exp per row).

    Args:
        sums: ``[Hq]`` float64; counts: ``[Hq]`` int64.
        query: ``[B, Hq, Q, D]``; key: ``[B, Hkv, K, D]`` with ``Hq % Hkv == 0`` (GQA:
            query head ``h`` reads KV head ``h // (Hq // Hkv)``). Same floating dtype.
        scale: logit scale, usually ``D ** -0.5``; finite and within the range of the type
            the logits are computed in (float32, float64 for float64 inputs).
        attn_mask: bool (True = attend) or additive float, broadcastable to
            ``[B, Hq, Q, K]``; additive values ``<= -1e37`` (``-inf``, float32 min) mask a key
            (the bound is float32's nearest, -9.99999993e36, also for float64 inputs).
        is_causal: query ``i`` sees keys ``j <= i + K - Q`` (last query aligned with last key).
        query_mask: optional ``[B, Q]`` bool excluding padded query rows.

    Rows whose keys are all masked are not counted (never NaN).
    """
    _ops().entropy_from_qk_accumulate_(sums, counts, query, key, scale, attn_mask, is_causal, query_mask)


def entropy_stats_from_probs_accumulate_(
    stats: torch.Tensor,
    probs: torch.Tensor,
    query_mask: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
) -> None:
    """Like :func:`entropy_from_probs_accumulate_` but adds every :class:`~headprune.core.schema.Stat`
    column into ``stats [H, NUM_STATS]`` float64 (count, sum, sum of squares, length-normalised sum,
    first-key mass, entropy over the keys after the first)."""
    _ops().entropy_stats_from_probs_accumulate_(stats, probs, query_mask, eps)


def entropy_stats_from_qk_accumulate_(
    stats: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    query_mask: Optional[torch.Tensor] = None,
) -> None:
    """Like :func:`entropy_from_qk_accumulate_` but adds every :class:`~headprune.core.schema.Stat`
    column into ``stats [Hq, NUM_STATS]`` float64, all from the same streaming pass."""
    _ops().entropy_stats_from_qk_accumulate_(stats, query, key, scale, attn_mask, is_causal, query_mask)


def attention_stats_accumulate_(
    stats: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    query_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention that measures itself: returns ``softmax(query key^T * scale + attn_mask) @
    value`` (``[B, Hq, Q, Dv]``, query's dtype) and adds the statistics of its rows into
    ``stats`` as :func:`entropy_stats_from_qk_accumulate_` would: the same statistics of the
    same rows, not bit for bit (the two kernels' exponentials differ by float32 rounding).

    ``value`` is ``[B, Hkv, K, Dv]`` (same dtype as ``key``); the other arguments are those of
    :func:`entropy_from_qk_accumulate_`. On CPU one fused streaming kernel forms each block of
    logits once, for the output and the statistics (float32 exponentials with about 2e-6
    relative error, as ATen's CPU flash attention; float64 inputs are computed in float64);
    on CUDA it is the device's ``scaled_dot_product_attention`` followed by the statistics
    kernel. Rows with no visible key get a zero output and are not counted. Not differentiable:
    under grad mode, a ``query``, ``key`` or ``value`` that requires grad is refused.
    """
    return _ops().attention_stats_accumulate_(stats, query, key, value, scale, attn_mask, is_causal, query_mask)


def apply_head_mask_(x: torch.Tensor, mask: torch.Tensor, head_dim: int, dim: int) -> None:
    """In place: multiply head ``h``'s slice of ``x`` along ``dim`` by ``mask[h]``.

    ``x.shape[dim] == num_heads * head_dim`` (heads outermost), ``mask [num_heads]`` with 0/1
    or real-valued gates. ``x`` is never reallocated. Differentiable in ``x`` (and in
    ``mask`` when it requires grad); a leaf that requires grad is refused unless under
    ``torch.no_grad()``.
    """
    _ops().apply_head_mask_(x, mask, head_dim, dim)
