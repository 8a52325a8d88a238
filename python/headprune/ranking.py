"""Which heads to prune, from ``HeadScores``: most diffuse (highest entropy) first.

A *unit* is what gets pruned together: a query head (``gqa="query"``) or a whole KV group,
its query heads and their shared KV head (``gqa="group"``, scored by the mean of its query
heads). Orders are total and deterministic: ties break by (layer, head).
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Iterable, Optional

import torch

from .scores import HeadScores

__all__ = ["select_heads", "rank_heads", "DEFAULT_RECIPE", "ENCODER_TYPES", "ORDERS", "SCOPES", "GQA_MODES"]

ORDERS = ("high", "low", "random")

#: What ``select_heads(scores, ratio=r)`` does with no options, chosen from the measurements in
#: the README (pruning quality): within each layer but the first attention layer (kept whole
#: except in encoder-only families, see ENCODER_TYPES: in a causal LM its heads mix the raw
#: token embeddings every later layer builds on), prune first the heads
#: that add the least output variance (``score="variance"``: what replacing a head by its mean
#: output costs; it needs the output statistics ``collect`` gathers). The best entropy recipe measured,
#: ``score="inert", order="high"`` (per layer), is the fallback for statistics without
#: output sums (plain ``nn.MultiheadAttention`` models, older files). The formula as written
#: (``score="entropy", order="high", scope="global"``) lost to random pruning on both models.
DEFAULT_RECIPE = {"score": "variance", "order": "low", "scope": "per_layer", "protect_layers": (0,)}
#: Families whose attention is bidirectional only: the default recipe keeps no layer whole for
#: them (on MiniLM, keeping the first layer lost at 10% of heads on an unseen text, and was
#: behind the unprotected recipe at all ten points of the two texts the recipe was chosen on).
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "vit"})
FALLBACK_RECIPE = {"score": "inert", "order": "high", "scope": "per_layer"}
#: the order a named score prunes in when none is given: entropy-like scores prune their
#: highest first (the method's premise), costs (``variance``, ``rest_nonsink``, an external
#: importance tensor) their lowest first
NATURAL_ORDER = {"entropy": "high", "normalized": "high", "sink": "high", "rest": "high", "inert": "high",
                 "rest_nonsink": "low", "variance": "low"}


def natural_order(score) -> str:
    return NATURAL_ORDER.get(score, "low") if isinstance(score, str) else "low"


#: rounds of ``headprune prune`` (``--steps``) without options: see ``select_iteratively``
DEFAULT_STEPS = 1
SCOPES = ("global", "per_layer")
GQA_MODES = ("query", "group")


def _unit_size(hq: int, hkv: int, gqa: str) -> int:
    """Query heads pruned together: a whole KV group under ``gqa="group"``, else one."""
    return hq // hkv if gqa == "group" and hkv else 1


def count_units(scores: HeadScores, gqa: str = "query") -> int:
    """Prunable units of the whole model (see :func:`select_heads`' ``gqa``)."""
    return sum(hq // _unit_size(hq, hkv, gqa) for hq, hkv in zip(scores.num_heads, scores.num_kv_heads))


def _units(scores: HeadScores, score: str, gqa: str) -> list:
    """``(value, layer, first_head, heads)`` for every prunable unit."""
    if isinstance(score, torch.Tensor):  # an external per-head score, e.g. gradient importance
        if tuple(score.shape) != tuple(scores.entropy.shape):
            raise ValueError(f"score: expected a tensor of shape {tuple(scores.entropy.shape)}, got {tuple(score.shape)}")
        values = score.double()
    else:
        values = scores.score(score)
    units = []
    for layer in range(scores.num_layers):
        hq, hkv = scores.num_heads[layer], scores.num_kv_heads[layer]
        size = _unit_size(hq, hkv, gqa)
        for start in range(0, hq, size):
            heads = list(range(start, start + size))
            v = values[layer, heads]
            if torch.isnan(v).any():
                raise ValueError(
                    f"scores: layer {layer} ({scores.names[layer]}) head(s) {heads} have no statistics "
                    f"(score {score!r} is NaN); collect on more data or protect the layer"
                )
            units.append((float(v.mean()), layer, start, heads))
    return units


def rank_heads(scores: HeadScores, *, score: str = "entropy", order: str = "high", seed: int = 0, gqa: str = "query") -> list:
    """All units in pruning order, as ``[(layer, [heads])]``.

    ``order``: ``"high"`` (highest score first, the method), ``"low"`` (the opposite, a
    baseline) or ``"random"`` (a permutation seeded by ``seed``, same for equal inputs).
    """
    if not isinstance(scores, HeadScores):
        raise TypeError(f"scores: expected HeadScores, got {type(scores).__name__}")
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa: expected one of {GQA_MODES}, got {gqa!r}")
    units = _units(scores, score, gqa)
    if order == "random":
        g = torch.Generator().manual_seed(int(seed))
        units = [units[i] for i in torch.randperm(len(units), generator=g).tolist()]
    else:
        sign = -1.0 if order == "high" else 1.0
        units.sort(key=lambda u: (sign * u[0], u[1], u[2]))
    return [(u[1], u[3]) for u in units]


def _budget(ratio, count, total: int, name_total: str) -> int:
    if (ratio is None) == (count is None):
        raise ValueError("ratio, count: give exactly one of them")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1 or math.isnan(ratio):
            raise ValueError(f"ratio: expected a number in [0, 1], got {ratio!r}")
        return int(math.floor(ratio * total + 1e-9))
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count: expected a non-negative int, got {count!r}")
    if count > total:
        raise ValueError(f"count: {count} exceeds the {total} {name_total}")
    return count


def _layer_index(i) -> int:
    """``operator.index``: a float such as 1.5 is not a layer index (``int`` would floor it)."""
    if isinstance(i, bool):
        raise TypeError(f"{i!r} is not a layer index")
    return operator.index(i)


def _check_layers(protect_layers: Iterable, n: int) -> set:
    try:
        protect = {_layer_index(i) for i in protect_layers}
    except (TypeError, ValueError) as e:
        raise TypeError(f"protect_layers: expected an iterable of layer indices, got {protect_layers!r}") from e
    bad = sorted(i for i in protect if not 0 <= i < n)
    if bad:
        raise ValueError(f"protect_layers: indices {bad} out of range for {n} layers")
    return protect


def select_heads(
    scores: HeadScores,
    *,
    ratio: Optional[float] = None,
    count: Optional[int] = None,
    scope: str = DEFAULT_RECIPE["scope"],
    min_heads_per_layer: int = 1,
    protect_layers: Optional[Iterable] = None,
    gqa: str = "query",
    score=None,
    order: Optional[str] = None,
    seed: int = 0,
    pruned: Optional[dict] = None,
) -> dict:
    """Heads to prune: ``{layer: sorted [query heads]}`` (layers with none are omitted).

    Args:
        ratio / count: how many units to prune in total (exactly one; ``ratio`` is a fraction
            of all units, floored). With ``scope="per_layer"`` the total is spread evenly:
            every layer gives its share rounded down or up (the extra units go to the layers
            whose next unit ranks first), so a 10% ratio of 9-head layers still prunes 10%.
        min_heads_per_layer: units every layer keeps (0 allows removing a whole layer).
        protect_layers: layer indices never pruned (``None``: the default recipe's, when
            ``score`` is ``None`` too and the model is not encoder-only, else none).
        gqa: ``"query"`` prunes query heads (a KV head goes only when its whole group goes);
            ``"group"`` prunes whole KV groups, so the KV cache shrinks too.
        score: which statistic ranks heads (a name, see ``HeadScores.score``), or a ``[L, H]``
            tensor of per-head values such as :func:`headprune.importance.gradient_importance`;
            ``None``: :data:`DEFAULT_RECIPE`.
        order / seed: see :func:`rank_heads`; ``order=None`` is the score's natural order
            (:data:`NATURAL_ORDER`: highest first for entropies, lowest first for costs).
        pruned: ``{layer: [query heads]}`` already pruned (masked) in an earlier step of
            iterative pruning; they are part of the result and count towards the budget,
            and ``scores`` ranks only the rest (see :func:`headprune.hf.select_iteratively`).

    Raises ``ValueError`` when the constraints cannot accommodate the request.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    if isinstance(min_heads_per_layer, bool) or not isinstance(min_heads_per_layer, int) or min_heads_per_layer < 0:
        raise ValueError(f"min_heads_per_layer: expected a non-negative int, got {min_heads_per_layer!r}")
    kept = ""  # why layers the caller did not name are protected
    if score is None:  # the default recipe, or its fallback without output statistics
        recipe = DEFAULT_RECIPE if getattr(scores, "outputs", None) is not None else FALLBACK_RECIPE
        if recipe is FALLBACK_RECIPE and isinstance(scores, HeadScores):
            warnings.warn("select_heads: these scores have no output statistics (plain torch model or an older file); "
                          f"the default recipe falls back to score={FALLBACK_RECIPE['score']!r}", stacklevel=2)
        default = order is None  # the whole recipe, not just its score (a random order takes none of it)
        score, order = recipe["score"], recipe["order"] if order is None else order
        if (default and protect_layers is None and isinstance(scores, HeadScores) and scores.num_layers > 1
                and scores.model_type not in ENCODER_TYPES):
            protect_layers = recipe.get("protect_layers", ())
            if protect_layers:
                kept = "; the default recipe keeps the first layer whole (protect_layers=[] allows it)"
    protect_layers = () if protect_layers is None else protect_layers
    order = natural_order(score) if order is None else order
    ranked = rank_heads(scores, score=score, order=order, seed=seed, gqa=gqa)
    protect = _check_layers(protect_layers, scores.num_layers)
    units_per_layer = [0] * scores.num_layers
    for layer, _ in ranked:
        units_per_layer[layer] += 1
    allowed = [0 if i in protect else max(0, n - min_heads_per_layer) for i, n in enumerate(units_per_layer)]
    first = _forced(ranked, pruned, scores)
    if first and any(layer in protect for layer, _ in first):
        bad = sorted({layer for layer, _ in first if layer in protect})
        raise ValueError(f"pruned: layers {bad} are in protect_layers")
    want = _budget(ratio, count, sum(units_per_layer), "units of the model")
    if scope == "global":
        floors = ceils = allowed
        spread = ""
    else:  # an even spread of the budget: floor or ceil of each layer's share
        open_units = sum(n for i, n in enumerate(units_per_layer) if i not in protect)
        frac = want / max(1, open_units)
        floors = [min(math.floor(frac * n + 1e-9), a) for n, a in zip(units_per_layer, allowed)]
        ceils = [min(math.ceil(frac * n - 1e-9), a) for n, a in zip(units_per_layer, allowed)]
        spread = " spread evenly over the layers"
    if want > sum(ceils):
        raise ValueError(
            f"ratio/count: {want} units requested but protect_layers and min_heads_per_layer={min_heads_per_layer} "
            f"allow at most {sum(ceils)}{spread}{kept}"
        )
    if len(first) > want:
        raise ValueError(f"pruned: {len(first)} units are already pruned, more than the {want} requested")
    taken = [0] * scores.num_layers
    chosen: dict = {}

    def take(layer, heads):
        taken[layer] += 1
        chosen.setdefault(layer, []).extend(heads)

    for layer, heads in first:
        if taken[layer] >= ceils[layer]:
            raise ValueError(f"pruned: layer {layer} already has more pruned heads than the constraints allow")
        take(layer, heads)
    done = {(layer, heads[0]) for layer, heads in first}
    rest = [(layer, heads) for layer, heads in ranked if (layer, heads[0]) not in done]
    for caps in (floors, ceils):  # per_layer: every layer's floor first, then the extras by rank
        for layer, heads in rest:
            if sum(taken) >= want:
                break
            if taken[layer] < caps[layer] and (layer, heads[0]) not in done:
                done.add((layer, heads[0]))
                take(layer, heads)
    return {layer: sorted(h) for layer, h in sorted(chosen.items())}


def _forced(ranked: list, pruned: Optional[dict], scores: HeadScores) -> list:
    """The units of ``pruned`` (whole units only), in ranking order."""
    if pruned is None:
        return []
    if not isinstance(pruned, dict):
        raise TypeError(f"pruned: expected a dict {{layer: [heads]}}, got {type(pruned).__name__}")
    want = {}
    for layer, heads in pruned.items():
        layer = _layer_index(layer)
        if not 0 <= layer < scores.num_layers:
            raise ValueError(f"pruned: layer {layer} out of range for {scores.num_layers} layers")
        hs = {_layer_index(h) for h in heads}
        bad = sorted(h for h in hs if not 0 <= h < scores.num_heads[layer])
        if bad:
            raise ValueError(f"pruned: heads {bad} out of range for layer {layer} ({scores.num_heads[layer]} heads)")
        if hs:
            want[layer] = hs
    out = [(layer, heads) for layer, heads in ranked if set(heads) <= want.get(layer, set())]
    covered = {(layer, h) for layer, heads in out for h in heads}
    partial_ = sorted((layer, h) for layer, hs in want.items() for h in hs if (layer, h) not in covered)
    if partial_:
        raise ValueError(f"pruned: heads {partial_} do not form whole units for gqa mode (a KV group is pruned whole)")
    return out
