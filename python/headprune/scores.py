"""Per-head attention statistics of a whole model, and the float64 accumulation they come from.

``HeadScores`` keeps the raw accumulator columns (``STAT_FIELDS``: count, sum, sum of squares,
length-normalised sum, first-key mass, entropy after the first key) for every attention site
(a layer's self- or cross-attention) and query head, so every ranking variant is a view of
the same pass and two collections (two shards, a resumed run) merge by addition.
Entropies are in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

__all__ = ["STAT_FIELDS", "NUM_STATS", "SCORE_NAMES", "HeadScores", "accumulate_qk_", "accumulate_probs_"]

from . import ops
from .reference import NUM_STATS, STAT_FIELDS

#: score name -> accumulator column averaged per valid query row
SCORE_NAMES = {"entropy": 1, "normalized": 3, "sink": 4, "rest": 5}
#: scores combining columns: name -> (help, function of HeadScores)
DERIVED_SCORES = {
    # entropy of the non-sink attention weighted by the mass that is not on the sink: low for
    # heads that look at few tokens other than the first one (see README, pruning quality)
    "rest_nonsink": lambda s: s._mean(5) * (1.0 - s._mean(4)),
    # how close a head is to a constant output: its mass on the sink plus, for the rest, the
    # length-normalised entropy (1 = spread evenly). Inert heads are the ones mean
    # compensation replaces best (see README, pruning quality)
    "inert": lambda s: s._mean(4) + (1.0 - s._mean(4)) * s._mean(3),
    # not an entropy: the output variance each head adds (needs the output statistics)
    "variance": lambda s: s.output_variance(),
}
#: columns of ``HeadScores.outputs``
OUTPUT_FIELDS = 4

def accumulate_qk_(stats, query, key, scale, attn_mask=None, is_causal=False, query_mask=None) -> None:
    """Add the statistics of ``softmax(query key^T * scale + attn_mask)`` into ``stats``
    (``[Hq, NUM_STATS]`` float64); shapes as in ``headprune.ops.entropy_stats_from_qk_accumulate_``."""
    ops.entropy_stats_from_qk_accumulate_(stats, query, key, float(scale), attn_mask, bool(is_causal), query_mask)


def accumulate_attention_(stats, query, key, value, scale, attn_mask=None, is_causal=False, query_mask=None):
    """The attention output ``[B, Hq, Q, Dv]``, with the statistics of its rows added into
    ``stats`` (see ``headprune.ops.attention_stats_accumulate_``)."""
    return ops.attention_stats_accumulate_(
        stats, query, key, value, float(scale), attn_mask, bool(is_causal), query_mask
    )


def accumulate_probs_(stats, probs, query_mask=None, eps: float = 1e-8) -> None:
    """Add the statistics of attention probabilities ``probs [B, H, Q, K]`` into ``stats``."""
    ops.entropy_stats_from_probs_accumulate_(stats, probs, query_mask, eps)


@dataclass
class HeadScores:
    """Statistics ``stats [num_layers, max_heads, NUM_STATS]`` (float64) per attention site
    ("layer") and query head, plus the head layout they were measured on.

    Sites are a model's attention blocks in order (for encoder-decoders: encoder self,
    decoder self, then cross-attention, see ``names`` and ``kinds``). When sites have fewer
    heads than ``max_heads`` (an unevenly pruned model) the extra slots stay at count 0 and
    read as NaN.
    """

    stats: torch.Tensor
    num_heads: list
    num_kv_heads: list
    head_dim: list
    names: list
    kinds: list
    model_type: Optional[str] = None
    method: str = "sdpa"
    meta: dict = field(default_factory=dict)
    #: ``[num_layers, max_heads, max_head_dim, 4]`` float64 or ``None``: per head and dimension
    #: of its attention output (the output projection's input), the count of tokens, the sum,
    #: the sum of squares, and the count times the squared norm of the output projection's
    #: column that dimension feeds (so every column adds across batches, shards and resumed
    #: runs). Gathered in the same pass as ``stats``; used to replace a removed head by its
    #: mean output (``compensate=`` of ``mask_heads``/``prune_heads``) and by the
    #: ``variance`` score.
    outputs: Optional[torch.Tensor] = None

    def __post_init__(self):
        if not isinstance(self.stats, torch.Tensor) or self.stats.dim() != 3 or self.stats.shape[-1] != NUM_STATS:
            raise ValueError(f"stats: expected a [layers, heads, {NUM_STATS}] tensor, got {getattr(self.stats, 'shape', type(self.stats))}")
        self.stats = self.stats.to(torch.float64)
        n = self.stats.shape[0]
        for name in ("num_heads", "num_kv_heads", "head_dim", "names", "kinds"):
            value = list(getattr(self, name))
            if len(value) != n:
                raise ValueError(f"{name}: expected {n} entries (one per layer), got {len(value)}")
            setattr(self, name, value)
        if self.outputs is not None:
            want = (n, self.stats.shape[1], max(self.head_dim, default=0), OUTPUT_FIELDS)
            if not isinstance(self.outputs, torch.Tensor) or tuple(self.outputs.shape) != want:
                raise ValueError(f"outputs: expected a {list(want)} tensor or None, got {getattr(self.outputs, 'shape', type(self.outputs))}")
            self.outputs = self.outputs.to(torch.float64)

    @staticmethod
    def empty_outputs(num_heads: Sequence[int], head_dim: Sequence[int]) -> torch.Tensor:
        return torch.zeros(len(num_heads), max(num_heads, default=0), max(head_dim, default=0), OUTPUT_FIELDS,
                           dtype=torch.float64)

    def output_variance(self) -> torch.Tensor:
        """``[L, H]``: the variance each head adds to its output projection's result,
        ``sum_d Var(o_hd) * ||W_o[:, h*D + d]||^2`` (diagonal approximation): what replacing
        the head by its mean output costs, to first order (the "fluctuation" of FLAP, An et
        al. 2024). NaN where nothing was seen."""
        mean = self.output_mean()  # NaN where nothing was seen, and so is the sum below
        n = self.outputs[..., 0].clamp_min(1)
        var = (self.outputs[..., 2] / n - mean**2).clamp_min(0)
        return (var * self.outputs[..., 3] / n).sum(-1)

    def output_mean(self) -> torch.Tensor:
        """Mean attention output ``[L, H, D]`` of every head (NaN where nothing was seen)."""
        if self.outputs is None:
            raise ValueError("scores: no output statistics (collected by an older headprune or a plain torch model)")
        c = self.outputs[..., 0]
        return torch.where(c > 0, self.outputs[..., 1] / c.clamp_min(1), torch.full_like(c, math.nan))

    @classmethod
    def empty(cls, num_heads: Sequence[int], num_kv_heads, head_dim, names, kinds, **kw) -> "HeadScores":
        stats = torch.zeros(len(num_heads), max(num_heads, default=0), NUM_STATS, dtype=torch.float64)
        if kw.pop("with_outputs", False):
            kw["outputs"] = cls.empty_outputs(num_heads, head_dim)
        return cls(stats, list(num_heads), list(num_kv_heads), list(head_dim), list(names), list(kinds), **kw)

    # ---- views -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.stats.shape[0]

    @property
    def num_query_heads(self) -> int:
        return self.stats.shape[1]

    @property
    def count(self) -> torch.Tensor:
        """Valid query rows seen per head ``[L, H]`` (float64)."""
        return self.stats[..., 0]

    def _mean(self, col: int) -> torch.Tensor:
        c = self.count
        return torch.where(c > 0, self.stats[..., col] / c.clamp_min(1), torch.full_like(c, math.nan))

    @property
    def entropy(self) -> torch.Tensor:
        """Mean attention entropy ``[L, H]`` in nats (NaN where nothing was seen)."""
        return self._mean(1)

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation of the row entropies ``[L, H]`` (population)."""
        var = self._mean(2) - self.entropy**2
        return var.clamp_min(0).sqrt()

    def score(self, name: str = "entropy") -> torch.Tensor:
        """A per-head score ``[L, H]``: ``entropy`` (nats), ``normalized`` (entropy / log of
        the visible keys), ``sink`` (mass on the first visible key), ``rest`` (entropy of
        the keys after the first), ``rest_nonsink`` (``rest * (1 - sink)``), ``inert``
        (``sink + (1 - sink) * normalized``), ``variance`` (see :meth:`output_variance`)."""
        if name in DERIVED_SCORES:
            return DERIVED_SCORES[name](self)
        if name not in SCORE_NAMES:
            raise ValueError(f"score: expected one of {sorted([*SCORE_NAMES, *DERIVED_SCORES])}, got {name!r}")
        return self._mean(SCORE_NAMES[name])

    def valid(self) -> torch.Tensor:
        """``[L, H]`` bool: the slot is a real head of its site."""
        h = torch.arange(self.num_query_heads)
        return h[None, :] < torch.tensor(self.num_heads, dtype=torch.long)[:, None]

    def block(self, kind: str) -> "HeadScores":
        """The sites of one kind ("self" or "cross"); indices are renumbered."""
        idx = [i for i, k in enumerate(self.kinds) if k == kind]
        return self._subset(idx)

    def _subset(self, idx) -> "HeadScores":
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return HeadScores(
            self.stats[idx].clone(), pick(self.num_heads), pick(self.num_kv_heads), pick(self.head_dim),
            pick(self.names), pick(self.kinds), self.model_type, self.method, dict(self.meta),
            None if self.outputs is None else self.outputs[idx][..., : max(pick(self.head_dim), default=0), :].clone(),
        )

    # ---- combination and serialisation -------------------------------------------------
    def _layout(self) -> tuple:
        return (self.num_heads, self.num_kv_heads, self.head_dim, self.names, self.kinds, self.model_type)

    def merge(self, other: "HeadScores") -> "HeadScores":
        """Scores of the union of both collections' batches (statistics add)."""
        if not isinstance(other, HeadScores):
            raise TypeError(f"other: expected HeadScores, got {type(other).__name__}")
        if self._layout() != other._layout():
            raise ValueError("other: head layouts differ (different model or pruning); cannot merge")
        outputs = None
        if self.outputs is not None and other.outputs is not None:
            outputs = self.outputs + other.outputs
        return HeadScores(self.stats + other.stats, *self._layout()[:5], self.model_type, self.method, dict(self.meta),
                          outputs)

    def to_dict(self) -> dict:
        """JSON-ready dict (plain lists and numbers; float64 values survive exactly)."""
        return {
            "format": "headprune.HeadScores/1",
            "stat_fields": list(STAT_FIELDS),
            "stats": self.stats.tolist(),
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "names": self.names,
            "kinds": self.kinds,
            "model_type": self.model_type,
            "method": self.method,
            "meta": self.meta,
            "outputs": None if self.outputs is None else self.outputs.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HeadScores":
        if not isinstance(d, dict) or "stats" not in d:
            raise ValueError("d: expected a dict written by HeadScores.to_dict()")
        if list(d.get("stat_fields", STAT_FIELDS)) != list(STAT_FIELDS):
            raise ValueError(f"d: stat_fields {d.get('stat_fields')} differ from {list(STAT_FIELDS)}")
        stats = torch.tensor(d["stats"], dtype=torch.float64).reshape(len(d["num_heads"]), -1, NUM_STATS)
        outputs = d.get("outputs")
        if outputs is not None:
            outputs = torch.tensor(outputs, dtype=torch.float64)
        return cls(
            stats, d["num_heads"], d["num_kv_heads"], d["head_dim"], d["names"], d["kinds"],
            d.get("model_type"), d.get("method", "sdpa"), dict(d.get("meta", {})), outputs,
        )

    def __repr__(self) -> str:
        return (
            f"HeadScores(model_type={self.model_type!r}, layers={self.num_layers}, heads={self.num_heads}, "
            f"method={self.method!r}, rows={int(self.count.sum())})"
        )
