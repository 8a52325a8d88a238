"""Prunable units and the order in which they go.

A *unit* is what gets pruned together: a query head (``gqa="query"``) or a whole KV group,
its query heads and their shared KV head (``gqa="group"``, scored by the mean of its query
heads). Orders are total and deterministic: ties break by (site, head).
"""

from __future__ import annotations

import math
import numbers
import operator

import torch

from ..stats.scores import HeadScores
from ..stats.moments import DEFAULT_DAMPING
from .reconstruction import reconstruction_score
from .recipes import GQA_MODES, ORDERS, resolve_recipe

__all__ = ["count_units", "rank_heads", "rank_positions", "unit_sizes"]


def _unit_size(hq: int, hkv: int, gqa: str) -> int:
    """Query heads pruned together: a whole KV group under ``gqa="group"``, else one."""
    return hq // hkv if gqa == "group" and hkv else 1


def unit_sizes(scores: HeadScores, gqa: str = "query") -> list:
    """Query heads per prunable unit at each site."""
    return [_unit_size(hq, hkv, gqa) for hq, hkv in zip(scores.num_heads, scores.num_kv_heads)]


def unit_counts(heads: dict, scores: HeadScores, gqa: str = "query") -> dict:
    """``{site: units}`` of a selection ``{site: heads}`` (heads, or KV groups under ``gqa="group"``)."""
    unit = unit_sizes(scores, gqa)
    return {site: len(hs) // unit[site] for site, hs in heads.items()}


def count_units(scores: HeadScores, gqa: str = "query") -> int:
    """Prunable units of the whole model (see :func:`select_heads`' ``gqa``)."""
    return sum(hq // u for hq, u in zip(scores.num_heads, unit_sizes(scores, gqa)))


def _units(scores: HeadScores, score, gqa: str, damping: float) -> list:
    """``(value, layer, first_head, heads)`` for every prunable unit."""
    if not isinstance(score, (str, torch.Tensor)):
        raise TypeError(f"score: expected a score name or a [sites, heads] tensor, got {type(score).__name__}")
    if isinstance(score, torch.Tensor) and (score.is_meta or score.is_complex() or score.dtype == torch.bool):
        raise ValueError(f"score: expected a tensor of real values, got a {score.dtype} tensor on {score.device}")
    if isinstance(score, torch.Tensor):  # an external per-head score, e.g. gradient importance
        if tuple(score.shape) != tuple(scores.entropy.shape):
            raise ValueError(f"score: expected a tensor of shape {tuple(scores.entropy.shape)}, got {tuple(score.shape)}")
        values = score.double()
    elif score == "reconstruction":  # depends on the unit (a head or a KV group)
        values = reconstruction_score(scores, "group" if gqa == "group" else "query", damping)
    else:
        values = scores.score(score)
    units = []
    for layer in range(scores.num_layers):
        hq, hkv = scores.num_heads[layer], scores.num_kv_heads[layer]
        size = _unit_size(hq, hkv, gqa)
        for start in range(0, hq, size):
            heads = list(range(start, start + size))
            v = values[layer, heads]
            named = f"score {score!r}" if isinstance(score, str) else "the score tensor"
            if torch.isnan(v).any():
                if not isinstance(score, str):  # not the statistics' doing
                    raise ValueError(f"score: the score tensor is NaN at layer {layer} ({scores.names[layer]}) "
                                     f"head(s) {heads}")
                raise ValueError(f"scores: layer {layer} ({scores.names[layer]}) head(s) {heads} have no statistics "
                                 f"({named} is NaN); collect on more data")
            if torch.isnan(v.mean()):  # +inf and -inf in one KV group: a NaN key left the sort in no order
                raise ValueError(f"scores: layer {layer} ({scores.names[layer]}) head(s) {heads} score +inf and -inf "
                                 f"({named}), so the group has no score")
            units.append((float(v.mean()), layer, start, heads))
    return units


def rank_heads(scores: HeadScores, *, score=None, order=None, seed: int = 0, gqa: str = "query",
               damping: float = DEFAULT_DAMPING) -> list:
    """All units in pruning order, as ``[(layer, [original head indices])]`` (see
    :func:`rank_positions` for the arguments)."""
    return [(site, scores.ids(site, hs)) for site, hs in rank_positions(scores, score=score, order=order, seed=seed,
                                                                          gqa=gqa, damping=damping)]


def as_index(i) -> int:
    """``operator.index`` without bools: a float such as 1.5 is not an index (``int`` would
    floor it), and ``True`` is not 1 here."""
    if isinstance(i, bool):
        raise TypeError(f"{i!r} is not an index")
    return operator.index(i)


def as_count(n):
    """``n`` as a non-negative ``int`` (numpy and 0-d tensor integers too), or ``None`` where it is
    none: a bool (a bool tensor too), a float, a tensor of more than one dimension, a negative number."""
    if isinstance(n, torch.Tensor) and (n.dim() != 0 or n.dtype == torch.bool):
        return None
    try:
        n = as_index(n)
    except TypeError:
        return None
    return n if n >= 0 else None


def count_arg(name: str, value, what: str = "a positive int", minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum`` (numpy and 0-d tensor integers too), else a
    ``ValueError`` naming ``name`` and saying ``what`` was expected."""
    n = as_count(value)
    if n is None or n < minimum:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return n


#: the largest learning rate the optimizers' float32 state holds (``recover``, ``learn_gates``)
MAX_LR = torch.finfo(torch.float32).max


def as_real(x):
    """``x`` as a finite ``float`` (numpy and 0-d tensor numbers too: ``np.float32(0.3)`` is a
    fraction as ``0.3`` is), or ``None`` where it is none: a bool, a string, a tensor of more than
    one element or of bools, NaN or an infinity."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.dtype == torch.bool or x.is_complex():
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def rank_positions(scores: HeadScores, *, score=None, order=None, seed: int = 0, gqa: str = "query",
                   damping: float = DEFAULT_DAMPING) -> list:
    """All units in pruning order, as ``[(layer, [head positions])]``.

    ``score``: a name (see ``HeadScores.score``) or a ``[sites, heads]`` tensor; ``None``:
    the default recipe's. ``order``: ``"high"`` (highest score first), ``"low"`` (lowest
    first), ``"random"`` (a permutation seeded by ``seed``, same for equal inputs) or
    ``None``: the score's natural order (highest first for entropies, lowest for costs).
    ``damping``: the refit's (see :func:`headprune.mask_heads`) whose errors the
    ``"reconstruction"`` score measures; other scores ignore it.
    """
    if not isinstance(scores, HeadScores):
        raise TypeError(f"scores: expected HeadScores, got {type(scores).__name__}")
    if score is None or order is None:
        recipe = resolve_recipe(scores, score, order, protect_layers=())
        score, order = recipe.score, recipe.order
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa: expected one of {GQA_MODES}, got {gqa!r}")
    try:  # int() floored 1.7 to 1 and named nothing for None; numpy and torch integers are ints
        seed = as_index(seed)
    except TypeError:
        raise TypeError(f"seed: expected an int, got {seed!r}") from None
    if order == "random" and isinstance(score, str) and score == "reconstruction":  # its costs order nothing here
        score = "entropy"  # (any collected statistic: the units, and heads without statistics refused)
    units = _units(scores, score, gqa, damping)
    if order == "random":
        g = torch.Generator().manual_seed(seed)
        units = [units[i] for i in torch.randperm(len(units), generator=g).tolist()]
    else:
        sign = -1.0 if order == "high" else 1.0
        units.sort(key=lambda u: (sign * u[0], u[1], u[2]))
    return [(u[1], u[3]) for u in units]


