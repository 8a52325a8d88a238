"""Per-head attention statistics of a whole model: :class:`HeadScores`.

``HeadScores`` keeps the raw accumulator columns (:class:`~headprune.core.schema.Stat`) for
every attention *site* (one layer's self- or cross-attention; for every family but T5, site i
is layer i) and query head, so every ranking is a view of the same pass, and two collections
(two shards, a resumed run) merge by addition. Entropies are in nats.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..core.schema import NUM_OUTPUT_STATS, NUM_STATS, STAT_FIELDS, OutputStat, Stat
from .accumulator import population_std
from .moments import OutputMoments

__all__ = ["HeadScores", "SCORE_NAMES", "DERIVED_SCORES", "FORMAT", "refuse_all_padding"]

FORMAT = "headprune.HeadScores/2"
_READABLE = ("headprune.HeadScores/1", FORMAT)

#: score name -> accumulator column averaged per valid query row
SCORE_NAMES = {"entropy": Stat.SUM, "normalized": Stat.SUM_NORM, "sink": Stat.SUM_FIRST, "rest": Stat.SUM_REST}
#: scores combining columns: name -> function of HeadScores
DERIVED_SCORES = {
    # entropy of the non-sink attention weighted by the mass that is not on the sink: low for
    # heads that look at few tokens other than the first one
    "rest_nonsink": lambda s: s.mean(Stat.SUM_REST) * (1.0 - s.mean(Stat.SUM_FIRST)),
    # how close a head is to a constant output: its mass on the sink plus, for the rest, the
    # length-normalised entropy (1 = spread evenly); the heads mean compensation replaces best
    "inert": lambda s: s.mean(Stat.SUM_FIRST) + (1.0 - s.mean(Stat.SUM_FIRST)) * s.mean(Stat.SUM_NORM),
    # not an entropy: the output variance each head adds (needs the output statistics)
    "variance": lambda s: s.output_variance(),
}


def repeated_kv(kv_ids) -> list:
    """Sites whose KV rows (``kv_ids``: per site, each row's original KV head) repeat a KV head:
    an earlier ``gqa="query"`` pruning split its group, so the rows are not whole KV groups."""
    return [i for i, ids in enumerate(kv_ids or ()) if len(set(ids)) < len(ids)]


@dataclass
class HeadScores:
    """Statistics ``stats [num_sites, max_heads, NUM_STATS]`` (float64) per attention site and
    query head, plus the head layout they were measured on.

    Sites are a model's attention blocks in order (for encoder-decoders: encoder self, decoder
    self, then cross-attention; see ``names`` and ``kinds``). ``depth[i]`` is site i's layer
    within its stack (0 = the stack's first layer) and ``causal[i]`` whether it attends
    causally (``None``: unknown, files of format 1). When sites have fewer heads than
    ``max_heads`` (an unevenly pruned model) the extra slots stay at count 0 and read as NaN.
    The selection API (``select_heads``, ``protect_layers``) calls site indices "layers".
    """

    stats: torch.Tensor
    num_heads: list
    num_kv_heads: list
    head_dim: list
    names: list
    kinds: list
    model_type: Optional[str] = None
    method: str = "sdpa"
    #: ``[num_sites, max_heads, max_head_dim, NUM_OUTPUT_STATS]`` float64 or ``None``: per head
    #: and dimension of its attention output (the output projection's input), the columns of
    #: :class:`~headprune.core.schema.OutputStat`. Gathered in the same pass as ``stats``; used
    #: to replace a removed head by its mean output and by the ``variance`` score.
    outputs: Optional[torch.Tensor] = None
    causal: Optional[list] = None
    depth: Optional[list] = None
    #: second moments of every site's output-projection input (``collect(..., moments=True)``),
    #: for least-squares refits; kept out of :meth:`to_dict` (they are large: saved as
    #: safetensors by ``OutputMoments.save``)
    moments: Optional[OutputMoments] = None
    #: per site, the original index of the head at each position, for a model an earlier
    #: pruning left with fewer heads (``None``: positions are the original indices); the
    #: selection API speaks original indices, as ``prune_heads`` takes them
    head_ids: Optional[list] = None
    #: per site, the original KV head of each KV row of a pruned model (``None``: unpruned);
    #: a ``gqa="query"`` pruning that split a group repeats rows, and then the rows are not the
    #: model's KV groups (:meth:`repeated_kv_sites`)
    kv_ids: Optional[list] = None

    def __post_init__(self):
        if not isinstance(self.stats, torch.Tensor) or self.stats.dim() != 3 or self.stats.shape[-1] != NUM_STATS:
            raise ValueError(f"stats: expected a [sites, heads, {NUM_STATS}] tensor, got {getattr(self.stats, 'shape', type(self.stats))}")
        self.stats = self.stats.to(torch.float64)
        n = self.stats.shape[0]
        for name in ("num_heads", "num_kv_heads", "head_dim", "names", "kinds", "causal", "depth", "head_ids",
                     "kv_ids"):
            value = getattr(self, name)
            if value is None and name in ("causal", "depth", "head_ids", "kv_ids"):
                continue
            value = list(value)
            if len(value) != n:
                raise ValueError(f"{name}: expected {n} entries (one per site), got {len(value)}")
            setattr(self, name, value)
        if self.depth is None:
            self.depth = list(range(n))
        if self.stats.shape[1] < max(self.num_heads, default=0):
            raise ValueError(f"stats: {self.stats.shape[1]} head slots per site, but a site has {max(self.num_heads)} "
                             "heads (num_heads)")
        if self.head_ids is not None:
            self.head_ids = [list(map(int, ids)) for ids in self.head_ids]
            bad = [i for i, (ids, h) in enumerate(zip(self.head_ids, self.num_heads)) if len(ids) != h]
            if bad:
                raise ValueError(f"head_ids: sites {bad[:5]} list another number of heads than num_heads")
        if self.kv_ids is not None:
            self.kv_ids = [list(map(int, ids)) for ids in self.kv_ids]
            bad = [i for i, (ids, h, kv) in enumerate(zip(self.kv_ids, self.num_heads, self.num_kv_heads))
                   if len(ids) != (kv or h)]
            if bad:
                raise ValueError(f"kv_ids: sites {bad[:5]} list another number of KV heads than num_kv_heads")
        if self.outputs is not None:
            want = (n, self.stats.shape[1], max(self.head_dim, default=0), NUM_OUTPUT_STATS)
            if not isinstance(self.outputs, torch.Tensor) or tuple(self.outputs.shape) != want:
                raise ValueError(f"outputs: expected a {list(want)} tensor or None, got {getattr(self.outputs, 'shape', type(self.outputs))}")
            self.outputs = self.outputs.to(torch.float64)
        if self.moments is not None:
            if not isinstance(self.moments, OutputMoments) or self.moments.num_sites != n:
                raise ValueError(f"moments: expected OutputMoments of {n} sites or None, got {self.moments!r}")

    @classmethod
    def empty(cls, num_heads: Sequence[int], num_kv_heads, head_dim, names, kinds, *, with_outputs: bool = False,
              **kw) -> "HeadScores":
        stats = torch.zeros(len(num_heads), max(num_heads, default=0), NUM_STATS, dtype=torch.float64)
        if with_outputs:
            kw["outputs"] = cls.empty_outputs(num_heads, head_dim)
        return cls(stats, list(num_heads), list(num_kv_heads), list(head_dim), list(names), list(kinds), **kw)

    @staticmethod
    def empty_outputs(num_heads: Sequence[int], head_dim: Sequence[int]) -> torch.Tensor:
        return torch.zeros(len(num_heads), max(num_heads, default=0), max(head_dim, default=0), NUM_OUTPUT_STATS,
                           dtype=torch.float64)

    # ---- views -------------------------------------------------------------------------
    @property
    def num_sites(self) -> int:
        return self.stats.shape[0]

    num_layers = num_sites  # the selection API's word for a site

    @property
    def num_query_heads(self) -> int:
        return self.stats.shape[1]

    @property
    def count(self) -> torch.Tensor:
        """Valid query rows seen per head ``[sites, heads]`` (float64)."""
        return self.stats[..., Stat.COUNT]

    def mean(self, column: Stat) -> torch.Tensor:
        """Per-row mean of an accumulator column ``[sites, heads]`` (NaN where nothing was seen)."""
        c = self.count
        return torch.where(c > 0, self.stats[..., column] / c.clamp_min(1), torch.full_like(c, math.nan))

    @property
    def entropy(self) -> torch.Tensor:
        """Mean attention entropy ``[sites, heads]`` in nats (NaN where nothing was seen)."""
        return self.mean(Stat.SUM)

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation of the row entropies ``[sites, heads]`` (population; NaN where
        nothing was seen; see :func:`~headprune.stats.accumulator.population_std`)."""
        return population_std(self.count, self.entropy, self.mean(Stat.SUM_SQ))

    def output_mean(self) -> torch.Tensor:
        """Mean attention output ``[sites, heads, head_dim]`` of every head (NaN where nothing was seen)."""
        if self.outputs is None:
            raise ValueError("scores: no output statistics (collected by an older headprune or a plain torch model)")
        c = self.outputs[..., OutputStat.COUNT]
        return torch.where(c > 0, self.outputs[..., OutputStat.SUM] / c.clamp_min(1), torch.full_like(c, math.nan))

    def output_variance(self) -> torch.Tensor:
        """``[sites, heads]``: the variance each head adds to its output projection's result,
        ``sum_d Var(o_hd) * ||W_o[:, h*D + d]||^2`` (diagonal approximation): what replacing
        the head by its mean output costs, to first order (the "fluctuation" of FLAP, An et
        al. 2024). NaN where nothing was seen."""
        mean = self.output_mean()  # NaN where nothing was seen, and so is the sum below
        n = self.outputs[..., OutputStat.COUNT].clamp_min(1)
        var = (self.outputs[..., OutputStat.SUM_SQ] / n - mean**2).clamp_min(0)
        return (var * self.outputs[..., OutputStat.COUNT_NORM] / n).sum(-1)

    def score(self, name: str = "entropy") -> torch.Tensor:
        """A per-head score ``[sites, heads]``: ``entropy`` (nats), ``normalized`` (entropy / log
        of the visible keys), ``sink`` (mass on the first visible key), ``rest`` (entropy of
        the keys after the first), ``rest_nonsink`` (``rest * (1 - sink)``), ``inert``
        (``sink + (1 - sink) * normalized``), ``variance`` (see :meth:`output_variance`)."""
        if name in DERIVED_SCORES:
            return DERIVED_SCORES[name](self)
        if name not in SCORE_NAMES:
            raise ValueError(f"score: expected one of {sorted([*SCORE_NAMES, *DERIVED_SCORES])}, got {name!r}")
        return self.mean(SCORE_NAMES[name])

    def ids(self, site: int, positions) -> list:
        """The original indices of the heads at ``positions`` of ``site``."""
        return list(positions) if self.head_ids is None else [self.head_ids[site][p] for p in positions]

    def site_heads(self) -> list:
        """Each site's heads by original index, in position order."""
        return [self.ids(i, range(n)) for i, n in enumerate(self.num_heads)]

    def other_site(self, kept: dict):
        """The first site whose heads are not ``kept[site]`` (a model's heads by original index,
        as ``headprune.kept_heads`` gives them), or ``None``: statistics name heads by position,
        so those of another pruning of the same counts describe other heads."""
        return next((i for i, ids in enumerate(self.site_heads()) if ids != list(kept[i])), None)

    def positions(self, site: int, heads) -> list:
        """The positions in ``site`` of the heads of original indices ``heads`` (the inverse of
        :meth:`ids`; a ``ValueError`` for a head the site no longer has)."""
        if self.head_ids is None:
            return list(heads)
        where = {h: p for p, h in enumerate(self.head_ids[site])}
        bad = [h for h in heads if h not in where]
        if bad:
            raise ValueError(f"heads: site {site} heads {bad} are not among its heads {self.head_ids[site]}")
        return [where[h] for h in heads]

    def valid(self) -> torch.Tensor:
        """``[sites, heads]`` bool: the slot is a real head of its site."""
        h = torch.arange(self.num_query_heads)
        return h[None, :] < torch.tensor(self.num_heads, dtype=torch.long)[:, None]

    def block(self, kind: str) -> "HeadScores":
        """The sites of one kind ("self" or "cross"); indices are renumbered."""
        return self._subset([i for i, k in enumerate(self.kinds) if k == kind])

    def _subset(self, idx) -> "HeadScores":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        outputs = None
        if self.outputs is not None:
            outputs = self.outputs[idx][..., : max(pick(self.head_dim), default=0), :].clone()
        moments = None if self.moments is None else self.moments.subset(idx)
        return HeadScores(self.stats[idx].clone(), pick(self.num_heads), pick(self.num_kv_heads), pick(self.head_dim),
                          pick(self.names), pick(self.kinds), self.model_type, self.method, outputs,
                          pick(self.causal), pick(self.depth), moments, pick(self.head_ids), pick(self.kv_ids))

    def repeated_kv_sites(self) -> list:
        """Sites whose KV rows repeat an original KV head (:func:`repeated_kv`)."""
        return repeated_kv(self.kv_ids)

    # ---- combination and serialisation -------------------------------------------------
    def layout(self) -> tuple:
        """What must agree for two collections to add: heads, KV heads, head sizes, site
        names and kinds, model type."""
        base = (self.num_heads, self.num_kv_heads, self.head_dim, self.names, self.kinds, self.model_type)
        return base if self.head_ids is None else (*base, self.head_ids)

    def layout_fingerprint(self) -> str:
        """Hex SHA-256 of :meth:`layout`, the method and the tensors' shapes (a checkpoint or
        another rank must match it)."""
        key = [*self.layout(), self.method, list(self.stats.shape)]
        if self.outputs is not None:  # fingerprints without output statistics stay as they were
            key.append(list(self.outputs.shape))
        if self.moments is not None:  # the projections' shapes fix the moments' (sites without data included)
            key.append(["moments", [None if p is None else list(p.shape) for p in self.moments.projection or []]])
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def with_sums(self, stats: torch.Tensor, outputs: Optional[torch.Tensor],
                  moments: Optional[OutputMoments] = None) -> "HeadScores":
        """The same layout holding other sums (a merge, an all-reduce)."""
        return dataclasses.replace(self, stats=stats, outputs=outputs, moments=moments)

    def merge(self, other: "HeadScores") -> "HeadScores":
        """Scores of the union of both collections' batches (statistics add)."""
        if not isinstance(other, HeadScores):
            raise TypeError(f"other: expected HeadScores, got {type(other).__name__}")
        if self.layout() != other.layout():
            raise ValueError("other: head layouts differ (different model or pruning); cannot merge")
        if self.method != other.method:
            raise ValueError(f"other: collected with method {other.method!r}, these with {self.method!r}; cannot merge")
        for what, mine, theirs in (("output statistics", self.outputs, other.outputs),
                                   ("second moments", self.moments, other.moments)):
            if (mine is None) != (theirs is None):  # the merge would drop them, and the default recipe with them
                raise ValueError(f"other: only {'these' if theirs is None else 'other'} scores hold {what}; collect "
                                 "both alike to merge them")
        outputs = None if self.outputs is None else self.outputs + other.outputs
        moments = None if self.moments is None else self.moments.merge(other.moments)
        if self.kv_ids is not None and other.kv_ids is not None and self.kv_ids != other.kv_ids:
            raise ValueError("other: KV rows differ (different model or pruning); cannot merge")
        kv_ids = self.kv_ids if self.kv_ids is not None else other.kv_ids  # a file from before kv_ids has none
        causal = self.causal if self.causal is not None else other.causal  # likewise before causal
        return dataclasses.replace(self.with_sums(self.stats + other.stats, outputs, moments), kv_ids=kv_ids,
                                   causal=causal)

    def to_dict(self) -> dict:
        """JSON-ready dict (plain lists and numbers; float64 values survive exactly), without
        the moments (see ``OutputMoments.save``)."""
        return {
            "format": FORMAT,
            "stat_fields": list(STAT_FIELDS),
            "stats": self.stats.tolist(),
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "names": self.names,
            "kinds": self.kinds,
            "causal": self.causal,
            "depth": self.depth,
            "head_ids": self.head_ids,
            "kv_ids": self.kv_ids,
            "model_type": self.model_type,
            "method": self.method,
            "outputs": None if self.outputs is None else self.outputs.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "HeadScores":
        if not isinstance(d, dict) or "stats" not in d:
            raise ValueError("d: expected a dict written by HeadScores.to_dict()")
        if d.get("format", _READABLE[0]) not in _READABLE:
            raise ValueError(f"d: format {d.get('format')!r} is not one of {list(_READABLE)}")
        if list(d.get("stat_fields", STAT_FIELDS)) != list(STAT_FIELDS):
            raise ValueError(f"d: stat_fields {d.get('stat_fields')} differ from {list(STAT_FIELDS)}")
        stats = torch.tensor(d["stats"], dtype=torch.float64)
        n = len(d["num_heads"])  # no sites, or no heads in any: the lists hold no number to infer a shape from
        if stats.numel() and (stats.dim() != 3 or stats.shape[0] != n):
            raise ValueError(f"d: stats of shape {list(stats.shape)}, expected [{n} sites, heads, {NUM_STATS}]")
        stats = stats.reshape(n, -1 if stats.numel() else 0, NUM_STATS)
        outputs = d.get("outputs")
        if outputs is not None:
            outputs = torch.tensor(outputs, dtype=torch.float64)
            if not outputs.numel():
                outputs = outputs.reshape(n, stats.shape[1], max(d["head_dim"], default=0), NUM_OUTPUT_STATS)
        return cls(
            stats, d["num_heads"], d["num_kv_heads"], d["head_dim"], d["names"], d["kinds"],
            d.get("model_type"), d.get("method", "sdpa"), outputs, d.get("causal"), d.get("depth"),
            head_ids=d.get("head_ids"), kv_ids=d.get("kv_ids"),
        )

    def __repr__(self) -> str:
        return (
            f"HeadScores(model_type={self.model_type!r}, sites={self.num_sites}, heads={self.num_heads}, "
            f"method={self.method!r}, rows={int(self.count.sum())})"
        )


def refuse_all_padding(scores: HeadScores, allow_empty: bool, padded_by: str) -> HeadScores:
    """``scores``, or a ``ValueError`` naming ``batches`` where every query position was padding
    (``padded_by``: what marked it) and ``allow_empty`` does not take that: every statistic is
    NaN, refused later, less clearly."""
    if not allow_empty and not int(scores.count.sum()):
        raise ValueError(f"batches: every query position is padding ({padded_by}), so no attention row was recorded")
    return scores
