"""Streaming per-head attention-entropy state of one attention call site.

Each update method is the accumulating op of the same name (``headprune.core.ops``, minus its
``_accumulate_`` suffix) with this accumulator as the target.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core import ops
from ..core.schema import NUM_STATS, STAT_FIELDS, Stat


def population_std(count: torch.Tensor, mean: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    """``sqrt(E[x^2] - E[x]^2)`` from running sums, with a variance the float64 sums cannot
    resolve reported as 0: summing ``count`` squares rounds ``E[x^2]`` by up to ``count * eps``
    of itself, so a smaller difference is rounding, not spread (identical rows otherwise read
    as a standard deviation of about 1e-8 of their value). NaN stays NaN."""
    var = mean_sq - mean * mean
    resolution = count.clamp_min(1) * torch.finfo(torch.float64).eps * mean_sq.abs()
    return torch.where(var <= resolution, torch.zeros_like(var), var).sqrt()


def _check_heads(t, name: str, heads: int) -> None:
    """The accumulator's head count against an input's (dim 1 of ``[B, H, Q, ...]``), named
    after the input rather than after the op's ``stats`` argument the caller never passed."""
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] != heads:
        raise ValueError(f"{name}: expected {heads} heads (dim 1) for this accumulator of {heads} heads, "
                         f"got shape {list(t.shape)}")


class EntropyAccumulator:
    """Per-head running statistics of attention-row entropies (nats), fed batch by batch.

    The state is one float64 tensor ``stats [num_heads, NUM_STATS]`` (columns
    :class:`~headprune.core.schema.Stat`), so accumulators merge by addition and all-reduce
    as one tensor.
    """

    def __init__(self, num_heads: int, device: torch.device | str = "cpu"):
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
        self.stats = torch.zeros(num_heads, NUM_STATS, dtype=torch.float64, device=device)

    @property
    def num_heads(self) -> int:
        return self.stats.shape[0]

    def entropy_stats_from_probs(self, probs: torch.Tensor, query_mask: Optional[torch.Tensor] = None,
                                 eps: float = 1e-8):
        """Adds the rows of ``probs [B, H, Q, K]`` (the formula as written)."""
        _check_heads(probs, "probs", self.num_heads)
        ops.entropy_stats_from_probs_accumulate_(self.stats, probs, query_mask, eps)
        return self

    def entropy_stats_from_qk(self, query, key, scale: float, attn_mask=None, is_causal: bool = False,
                              query_mask=None):
        """Adds the rows of ``softmax(query @ key^T * scale + attn_mask)`` without forming them."""
        _check_heads(query, "query", self.num_heads)
        ops.entropy_stats_from_qk_accumulate_(self.stats, query, key, scale, attn_mask, is_causal, query_mask)
        return self

    def attention_stats(self, query, key, value, scale: float, attn_mask=None, is_causal: bool = False,
                        query_mask=None):
        """Attention that measures itself: returns ``softmax(query @ key^T * scale + attn_mask)
        @ value`` and adds its rows, as :meth:`entropy_stats_from_qk` would (one fused pass on
        CPU; see ``headprune.core.ops.attention_stats_accumulate_``)."""
        _check_heads(query, "query", self.num_heads)
        return ops.attention_stats_accumulate_(self.stats, query, key, value, scale, attn_mask, is_causal, query_mask)

    def merge(self, other: "EntropyAccumulator") -> "EntropyAccumulator":
        """Adds another accumulator's state (e.g. from another data shard)."""
        if not isinstance(other, EntropyAccumulator):
            raise TypeError(f"other: expected an EntropyAccumulator, got {type(other).__name__}")
        if other.stats.shape != self.stats.shape:
            raise ValueError(f"other: expected {self.num_heads} heads, got {other.num_heads}")
        self.stats += other.stats.to(self.stats.device)
        return self

    @property
    def count(self) -> torch.Tensor:
        """Rows seen per head, ``[H]`` int64."""
        return self.stats[:, Stat.COUNT].round().long()

    def _mean(self, column: Stat) -> torch.Tensor:
        c = self.stats[:, Stat.COUNT]
        return torch.where(c > 0, self.stats[:, column] / c.clamp_min(1), torch.full_like(c, float("nan")))

    def mean(self) -> torch.Tensor:
        """Mean row entropy per head, ``[H]`` float64 (NaN for a head that saw no row)."""
        return self._mean(Stat.SUM)

    def std(self) -> torch.Tensor:
        """Population standard deviation of the row entropies per head (NaN for a head that
        saw no row; see :func:`population_std`)."""
        return population_std(self.stats[:, Stat.COUNT], self.mean(), self._mean(Stat.SUM_SQ))

    def normalized_mean(self) -> torch.Tensor:
        """Mean of ``H / log(n)`` (n = visible keys), rows with n >= 2 (others count as 0)."""
        return self._mean(Stat.SUM_NORM)

    def first_mass_mean(self) -> torch.Tensor:
        """Mean attention mass on each row's first visible key (the sink)."""
        return self._mean(Stat.SUM_FIRST)

    def rest_mean(self) -> torch.Tensor:
        """Mean entropy over the keys after each row's first visible key."""
        return self._mean(Stat.SUM_REST)

    def state_dict(self) -> dict:
        return {"stats": self.stats.detach().cpu().clone(), "fields": list(STAT_FIELDS)}

    def load_state_dict(self, state: dict) -> None:
        stats = state.get("stats") if isinstance(state, dict) else None
        if not isinstance(stats, torch.Tensor) or stats.shape != self.stats.shape:
            got = tuple(stats.shape) if isinstance(stats, torch.Tensor) else type(stats).__name__
            raise ValueError(f"state: expected 'stats' of shape {tuple(self.stats.shape)}, got {got}")
        if list(state.get("fields", STAT_FIELDS)) != list(STAT_FIELDS):
            raise ValueError(f"state: expected fields {list(STAT_FIELDS)}, got {state.get('fields')}")
        # the checks of the C++ EntropyAccumulator::load_stats, whose state comes here too
        if not stats.is_floating_point():
            raise TypeError(f"state: expected floating 'stats', got {stats.dtype}")
        wide = stats.to(self.stats.device, torch.float64)
        if not bool(torch.isfinite(wide).all()):
            raise ValueError("state: expected finite 'stats', got NaN or infinite values")
        if bool((wide[:, Stat.COUNT] < 0).any()):
            raise ValueError(f"state: expected non-negative counts ('stats' column {int(Stat.COUNT)}), got "
                             f"{wide[:, Stat.COUNT].min().item():g}")
        self.stats.copy_(wide)

    def __repr__(self) -> str:
        return f"EntropyAccumulator(num_heads={self.num_heads}, rows={int(self.stats[:, Stat.COUNT].sum())})"
