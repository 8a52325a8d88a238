"""Named recipes: which statistic ranks heads, in which order, within which scope.

The defaults come from the measurements in ``docs/quality.md``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from ..stats.scores import HeadScores

__all__ = ["ALLOCATIONS", "default_allocation", "DEFAULT_RECIPE", "OUTPUT_RECIPE", "FALLBACK_RECIPE", "default_for", "is_causal", "NATURAL_ORDER", "ORDERS", "SCOPES", "SCORES", "GQA_MODES", "DEFAULT_GQA", "DEFAULT_STEPS",
           "Recipe", "natural_order", "resolve_recipe", "default_protected", "default_choice"]

ORDERS = ("high", "low", "random")
SCOPES = ("global", "per_layer")
#: how ``headprune prune`` may spread the budget over the layers (``--scope``): the
#: ``select_heads`` scopes, or ``measured``: each layer's share from what removing its heads
#: costs the whole model on the calibration text (``headprune.hf.select_measured``, which needs
#: the model and the batches, so ``select_heads`` itself has no such scope)
ALLOCATIONS = (*SCOPES, "measured")
GQA_MODES = ("query", "even", "group")
#: how grouped-query models lose heads unless told: query heads in even layouts, so the KV
#: cache never grows (on SmolLM2-135M within about 3% of free query-head pruning's perplexity
#: from 10% to 50% of heads, where free pruning repeats KV heads: +62% KV at 30%; see
#: docs/quality.md). Models without grouped queries are unaffected.
DEFAULT_GQA = "even"

#: What ``select_heads(scores, ratio=r)`` does with no options (besides keeping the sites of
#: :func:`default_protected` whole): within each site, prune first the heads whose removal the
#: least-squares refit of the output projection recovers best (``score="reconstruction"``:
#: greedy structured OBS on the second moments ``collect(..., moments=True)`` gathers, see
#: :mod:`.reconstruction`). It is not an entropy; docs/quality.md has where every entropy recipe
#: stands against it.
DEFAULT_RECIPE = {"score": "reconstruction", "order": "low", "scope": "per_layer"}
#: (encoders without a causal site use :data:`OUTPUT_RECIPE` with the refit: on
#: all-MiniLM-L6-v2 output variance kept the embeddings closer than the reconstruction score)
#: The default for statistics with output sums but no second moments (``collect`` without
#: ``moments``, ``scores.json`` of ``headprune scan``): what replacing a head by its mean output costs.
OUTPUT_RECIPE = {"score": "variance", "order": "low", "scope": "per_layer"}
#: The best entropy recipe measured, for statistics without output sums (plain
#: ``nn.MultiheadAttention`` models, older files).
FALLBACK_RECIPE = {"score": "inert", "order": "high", "scope": "per_layer"}
#: the order a named score prunes in when none is given: entropy-like scores prune their
#: highest first (the method's premise), costs (``variance``, ``rest_nonsink``, an external
#: importance tensor) their lowest first
NATURAL_ORDER = {"entropy": "high", "normalized": "high", "sink": "high", "rest": "high", "inert": "high",
                 "rest_nonsink": "low", "variance": "low", "reconstruction": "low"}
#: every named score select_heads takes (``HeadScores.score`` names, plus ``reconstruction``,
#: which needs the second moments, see :mod:`.reconstruction`)
SCORES = tuple(sorted(NATURAL_ORDER))
#: rounds of ``headprune prune`` (``--steps``) without options: see ``select_iteratively``
DEFAULT_STEPS = 1


def default_allocation(scores, removal: str = "refit", *, iterative: bool = False, uniform: bool = False,
                       kv_ratio=None) -> str:
    """The scope ``headprune prune`` and the sweep use when none is given: ``"measured"`` for
    encoders whose heads are refit in one round, without a uniform layout or a KV budget (on
    all-MiniLM-L6-v2 it kept the embeddings much closer than an even spread, docs/quality.md),
    else the default recipe's ``per_layer`` (on SmolLM2-135M the measurement takes 145
    forwards, several times the whole pruning command; its quality there is not measured)."""
    if removal == "refit" and getattr(scores, "moments", None) is not None and not is_causal(scores) \
            and not (iterative or uniform or kv_ratio):  # a KV share of 0 asks for none
        return "measured"
    return DEFAULT_RECIPE["scope"]


#: the most sets of heads of one layout that ``--uniform`` measures in a layer it cannot keep
#: whole (:func:`headprune.hf.uniform.measure_uniform`; one forward each)
UNIFORM_MEASURED_SETS = 64


def default_choice(single_heads: bool, score, order) -> str:
    """How a measured allocation chooses each layer's heads when not told (``choose=None`` in
    :func:`headprune.hf.allocation.layer_costs`): ``"greedy"`` where every unit is one head (no
    grouped queries) and neither ``score`` nor ``order`` is given, else ``"ranking"``."""
    return "greedy" if single_heads and score is None and order is None else "ranking"


def natural_order(score) -> str:
    return NATURAL_ORDER.get(score, "low") if isinstance(score, str) else "low"


def default_protected(scores: HeadScores) -> tuple:
    """Sites the default recipe keeps whole: the first layer (``depth == 0``) of every causal
    stack (decoder-only LMs: layer 0; T5: the decoder's first self-attention; encoders:
    none). In a causal LM the first layer's heads mix the raw token embeddings every later
    layer builds on; on an encoder (MiniLM) keeping it measured worse. Nothing for a one-site
    model or statistics that do not say what is causal."""
    if scores.num_sites < 2 or scores.causal is None:
        return ()
    return tuple(i for i in range(scores.num_sites) if scores.causal[i] and scores.depth[i] == 0)


def is_causal(scores) -> bool:
    """Whether any site attends causally (statistics that do not say count as causal)."""
    causal = getattr(scores, "causal", None)
    return causal is None or any(causal)


def default_for(scores) -> dict:
    """The default recipe these statistics allow: :data:`DEFAULT_RECIPE` with second moments
    (:data:`OUTPUT_RECIPE` for encoders, where output variance measured better under the refit),
    :data:`OUTPUT_RECIPE` with output sums only, else :data:`FALLBACK_RECIPE` (with a warning
    naming what is missing when ``scores`` is a ``HeadScores``)."""
    if getattr(scores, "moments", None) is not None:
        return DEFAULT_RECIPE if is_causal(scores) else OUTPUT_RECIPE
    outputs = getattr(scores, "outputs", None) is not None
    if isinstance(scores, HeadScores):
        missing = "second moments (collect(..., moments=True))" if outputs else \
            "output statistics (plain torch model or an older file)"
        fallback = OUTPUT_RECIPE if outputs else FALLBACK_RECIPE
        warnings.warn(f"select_heads: these scores have no {missing}; the default recipe falls back to "
                      f"score={fallback['score']!r}", stacklevel=4)
    return OUTPUT_RECIPE if outputs else FALLBACK_RECIPE


@dataclass
class Recipe:
    """A resolved recipe: ``score`` (a name or a ``[sites, heads]`` tensor), ``order``, and the
    sites kept whole with the reason shown when the budget does not fit."""

    score: object
    order: str
    protect_layers: object  # an iterable of site indices, validated by select_heads
    why_protected: str = ""


def resolve_recipe(scores: HeadScores, score=None, order: Optional[str] = None, protect_layers=None, *,
                   uniform: bool = False) -> Recipe:
    """The recipe ``select_heads`` runs: the default (or its fallback without output
    statistics) when ``score`` is None, else the caller's, with the score's natural order.
    A ``uniform`` layout prunes every layer alike: it protects none."""
    why = ""
    if uniform:
        protect_layers = ()
    if score is None:
        recipe = default_for(scores)
        whole = order is None  # the whole recipe, not just its score (a random order takes none of it)
        score, order = recipe["score"], recipe["order"] if order is None else order
        if whole and protect_layers is None and recipe is not FALLBACK_RECIPE:
            protect_layers = default_protected(scores)
            if protect_layers:
                why = "; the default recipe keeps the first layer of each causal stack whole (protect_layers=[] allows it)"
    order = natural_order(score) if order is None else order
    return Recipe(score, order, () if protect_layers is None else protect_layers, why)
