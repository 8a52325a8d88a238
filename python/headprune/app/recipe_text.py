"""The recipe that ran, in words, for the console, report.md and report.json."""

from __future__ import annotations

from ..ranking import DEFAULT_GQA, DEFAULT_RECIPE, natural_order
from ..ranking.recipes import UNIFORM_MEASURED_SETS, default_choice

#: what each score is, in words
SCORE_WORDS = {
    "reconstruction": "what the least-squares refit cannot recover (greedy structured OBS)",
    "variance": "the output variance each head adds",
    "entropy": "mean attention entropy",
    "inert": "inertness (sink mass plus normalised entropy)",
    "normalized": "length-normalised attention entropy",
    "sink": "attention mass on the first token",
    "rest": "entropy of the attention after the first token",
    "rest_nonsink": "entropy after the first token times the mass not on it",
    "learned": "hard-concrete gates trained to keep the outputs under the head budget (log alpha)",
}
REMOVAL_WORDS = {
    "refit": "the kept heads' output projection refit by least squares",
    "mean": "removed heads replaced by their mean output",
    "zero": "removed heads zeroed",
}


def describe_recipe(select: dict, removal: str, sequential: bool = False, damping=None, default=None,
                    causal=None, grouped=None, measured_first=False, values=False, refit_bias=True,
                    steps: int = 1) -> str:
    """``select``: the selection options given (``score``, ``order``, ``scope``,
    ``protect_layers``, ``gqa``, ``uniform``, ...; absent ones take ``default``'s, the recipe
    the statistics allow, see :func:`headprune.ranking.recipes.default_for`; ``None``:
    :data:`DEFAULT_RECIPE`). ``causal``: whether the model has a causal stack (``False``:
    the default protection, which keeps causal stacks' first layers, is not mentioned);
    ``grouped``: whether it has grouped queries (``False``: KV-group layouts are not mentioned).
    ``measured_first``: a uniform layout's heads re-chosen by measurement
    (:func:`headprune.hf.uniform.measure_uniform`: a causal stack's first layer; an encoder's
    every layer, without grouped queries); ``values``: the refit includes the kept heads'
    value rows (:mod:`headprune.prune.values`); ``refit_bias=False``: the refit leaves the
    output bias out; ``steps``: rounds of iterative selection."""
    default = DEFAULT_RECIPE if default is None else default
    score = select.get("score")
    whole = score is None and select.get("order") is None
    score = default["score"] if score is None else score
    order = select.get("order") or (default["order"] if whole else natural_order(score))
    scope = select.get("scope") or default["scope"]
    if order == "random":
        what = f"random heads (seed {select.get('seed', 0)})"
    else:
        words = SCORE_WORDS.get(score, str(score))
        if score == "reconstruction" and removal != "refit":  # ranked by a refit that does not run
            words = "what a least-squares refit would not recover (greedy structured OBS; no refit applied)"
        what = f"{words}, {'lowest' if order == 'low' else 'highest'} first"
    where = {"per_layer": "within each layer", "global": "within each layer" if select.get("uniform") else  # a
             "over the whole model",  # layout's heads are each layer's own cheapest, however ranked
             "measured": "within each layer, each layer's share measured (the shares whose removal cost the "
                         "whole model least on calibration sequences)"}.get(scope, scope)
    units = "whole KV groups" if select.get("gqa") == "group" and grouped is not False else "query heads"
    parts = [f"{units} ranked by {what}, {where}"]
    choose = select.get("choose") or default_choice(grouped is False, select.get("score"), select.get("order"))
    if scope == "measured" and choose == "greedy" and not sequential:  # layer_costs' choice (--sequential re-ranks)
        parts = ["query heads removed one at a time within each layer, each the one whose removal cost the whole "
                 "model least on calibration sequences, each layer's share measured the same way"]
    if select.get("uniform"):
        parts.append("the same layout in every layer" + (
            ", the first layer's heads the set of that layout whose removal cost the whole model least on "
            f"calibration sequences (every set where it has at most {UNIFORM_MEASURED_SETS}, else one KV group's "
            f"heads at a time where that takes at most {UNIFORM_MEASURED_SETS} forwards)"
            if measured_first and causal is not False
            else ", each layer's heads removed one at a time, each the one whose removal cost the whole model least "
                 "on calibration sequences (the ranking's where those measured cheaper)"
            if measured_first and grouped is False else ""))
    elif select.get("gqa", DEFAULT_GQA) == "even" and grouped is not False:
        parts.append("removed in layouts where every KV group kept keeps the same number of query heads (the KV "
                     "cache never grows)" + (f", at least {100 * select['kv_ratio']:g}% of the KV heads in whole "
                                             "groups" if select.get("kv_ratio") else ""))
    if steps > 1:
        parts.append(f"chosen in {steps} rounds, the statistics collected again after each with the heads chosen so "
                     "far removed as below")
    parts += _kept_per_layer(select.get("min_heads_per_layer"), units)
    protect = select.get("protect_layers")
    if protect:
        parts.append(f"layer{'s' if len(protect) > 1 else ''} {', '.join(map(str, protect))} kept whole")
    elif protect is None and whole and causal is not False and not select.get("uniform"):
        parts.append("the first layer of each causal stack kept whole")
    how = REMOVAL_WORDS.get(removal, removal)
    if removal == "refit" and values:
        how = "the kept heads' value rows and output projection refit together by least squares"
    if removal == "refit" and damping is not None:
        how += f" (damping {damping:g})"
    if removal == "refit" and sequential:
        how += ", calibrated layer by layer"
    if removal == "refit" and not refit_bias:
        how += ", without an output bias (the family's config declares none, so the saved config stays plain)"
    parts.append(how)
    return "; ".join(parts)


def _kept_per_layer(keep, units: str) -> list:
    """The words for ``min_heads_per_layer`` where it is given and not select_heads' own 1."""
    if keep is None or keep == 1:
        return []
    unit = "KV group" if units == "whole KV groups" else "query head"
    return [f"at least {keep} {unit}{'s' * (keep != 1)} kept in every layer" if keep else "whole layers may go"]
