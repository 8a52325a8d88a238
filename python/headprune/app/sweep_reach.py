"""Which fractions each sweep recipe can reach, checked before anything is evaluated (and,
by the command line, before the collection, on the model's layout alone); the learned-gate
recipes' options; the sequential recipes' layer-by-layer calibration."""

from __future__ import annotations

import torch

from ..ranking import select_heads, unit_counts
from ..ranking.recipes import default_allocation, default_protected, resolve_recipe
from ..ranking.reconstruction import SingularMoments
from .texts import rebatch


def check_ratios(config, scores, recipes: dict) -> None:
    """Refuse, before anything is evaluated, a fraction that a recipe's selection or the random
    baseline cannot reach (:func:`out_of_reach`), and a sequential recipe in one pass whose
    budget is not spread evenly over the layers."""
    for name, kw in recipes.items():
        fixed = [k for k in SEQUENTIAL_FIXES if kw.get("sequential") and kw.get(k, False) not in (None, False, 0)]
        if fixed:  # (a learned recipe's settings may be {}: named is asked for)
            raise ValueError(f"recipes: {name!r} re-chooses each layer's heads by the refit's error, layer by "
                             f"layer, so {', '.join(fixed)} would not decide them; drop one")
        if kw.get("sequential") == "one pass" and kw.get("scope") != "per_layer":
            raise ValueError(f"recipes: {name!r} calibrates in one pass, which spreads the budget evenly over the "
                             f"layers; give it scope='per_layer', not {kw.get('scope')!r}")
    for name, (r, e) in out_of_reach(config, scores, recipes).items():
        who = name if name == BASELINE else f"the recipe {name!r}"
        raise ValueError(f"ratios: {r:g} is out of reach of {who} ({e}); " + (
            "ask for larger fractions" if isinstance(e, NoHead) else
            "every recipe keeps its protected layers and a head in every layer: ask for smaller fractions"))


BASELINE = "the random baseline"
#: options a sequential recipe cannot honour: it keeps only each layer's count from the
#: selection (or, in one pass, its even share) and re-chooses the heads by greedy OBS
SEQUENTIAL_FIXES = ("order", "learned", "kv_ratio", "uniform", "iterative")


def random_selection(config, scores) -> dict:
    """:func:`select_heads` options of the random draws (less the seed): spread as
    ``config.random_scope`` says, keeping the default's protected layers whole where
    ``config.random_protect`` asks (the default keeps a causal LM's first layer)."""
    kw = {"order": "random", "scope": config.random_scope}
    return {**kw, "protect_layers": default_protected(scores)} if getattr(config, "random_protect", False) else kw


def out_of_reach(config, scores, recipes: dict, *, layout_only: bool = False) -> dict:
    """``{name: (ratio, why)}``: the first fraction that the random baseline (:data:`BASELINE`)
    or each recipe's selection cannot reach (its protected layers, the heads every layer keeps,
    its layouts). Measured allocations are left out: like ``headprune prune``, they take the
    nearest total they reach. ``layout_only``: ``scores`` holds a layout and no statistics
    (before the collection): every head is ranked alike, which reaches what the recipe's
    ranking reaches."""
    baseline = random_selection(config, scores)
    out = {}
    for name, kw in [(BASELINE, baseline)] * bool(config.seeds) + list(recipes.items()):
        removal, iterative = kw.get("removal", config.removal), bool(kw.get("iterative"))  # the recipe's own
        kw = {k: v for k, v in kw.items() if k not in ("removal", "iterative", "sequential", "values", "choose")}
        if "learned" in kw:  # ranked by gates trained later: the default's protection, any order
            kw = learned_protection({k: v for k, v in kw.items() if k != "learned"}, scores)
        gqa, scope = kw.pop("gqa", config.gqa), kw.pop("scope", None)
        scope = scope or default_allocation(scores, removal, iterative=iterative, uniform=bool(kw.get("uniform")),
                                            kv_ratio=kw.get("kv_ratio"))  # as the sweep resolves it
        if scope == "measured":
            continue
        if layout_only:
            kw, _ = on_layout(scores, kw)
        for r in config.ratios:
            try:
                heads = select_heads(scores, ratio=r, scope=scope, gqa=gqa, damping=config.damping, **kw)
            except SingularMoments:  # --damping's to change, not the fractions
                raise
            except ValueError as e:
                out[name] = (r, e)
                break
            if name == BASELINE and r > 0 and not any(heads.values()):  # its column would be the unpruned model
                out[name] = (r, NoHead("it rounds to no head in the layouts the selection allows"))
                break
    return out


class NoHead(ValueError):
    """A fraction too small for the random baseline to remove a head (a recipe's is shown as such)."""


def model_layout(model, moments: bool = True):
    """``model``'s sites and heads as scores without statistics, to check a selection before the
    collection; ``moments``: with empty second moments, where the collection will gather them,
    so that the default recipe resolves as it will afterwards."""
    from ..hf.collection import Collection
    from ..stats.moments import OutputMoments

    layout = Collection(model, "qk").scores()
    if moments:
        layout.moments = OutputMoments([None] * layout.num_sites)
    return layout


def on_layout(layout, kw: dict) -> tuple:
    """``(select_heads options, recipe)``: ``kw`` for scores that hold a layout and no statistics,
    every head ranked alike (which reaches what the recipe's ranking reaches; a random order
    stays random), with the recipe's protected layers named; ``recipe`` says why it protects them."""
    recipe = resolve_recipe(layout, kw.get("score"), kw.get("order"), kw.get("protect_layers"),
                            uniform=bool(kw.get("uniform")))
    ranked = torch.zeros(layout.num_sites, max(layout.num_heads, default=0), dtype=torch.float64)
    return {**kw, "score": ranked, "order": "random" if kw.get("order") == "random" else "low",
            "protect_layers": list(recipe.protect_layers)}, recipe


def learned_selection(kw: dict, learned, stats) -> dict:
    """``select_heads`` options that rank by learned gate scores (lowest ``log alpha`` first),
    keeping the default's protected layers (:func:`learned_protection`): the recipe the sweep
    measures, and what ``prune --score learned`` runs."""
    return {**learned_protection(kw, stats), "score": learned, "order": "low"}


def learned_budget(kw: dict, stats, **budget) -> dict:
    """``learn_gates`` options that train the gates for the budget the learned selection will
    apply (``kw``: its ``select_heads`` options; ``budget``: ``ratio`` or ``count``, ``damping``,
    ``gqa``): the protected layers' gates stay open, and ``ratio`` is of the other layers' heads, as
    many as a selection with these options removes (its layouts rounded), held over them all (the
    previous behaviour: on MiniLM a budget held per layer, ``per_layer=True``, ranked worse at 30%
    and better at 50% of heads on both texts of bench_quality.py, one run each; not adopted).
    Refuses, by ``select_heads``' errors, a budget the selection cannot meet, before minutes of training."""
    dry = learned_selection(kw, torch.zeros(len(stats.num_heads), max(stats.num_heads)), stats)
    removed = select_heads(stats, **budget, **{k: v for k, v in dry.items() if k != "scope" or v != "measured"})
    protect = sorted(dry.get("protect_layers") or ())
    trained = sum(h for i, h in enumerate(stats.num_heads) if i not in protect)
    return {"ratio": sum(map(len, removed.values())) / trained, "protect_layers": protect}


def learned_protection(kw: dict, stats) -> dict:
    """``kw`` with the default's protected layers named, unless it names its own or asks for a
    uniform layout (learned gates keep them as the default recipe does)."""
    if kw.get("uniform") or "protect_layers" in kw:
        return kw
    return {**kw, "protect_layers": list(default_protected(stats))}


def sequential_heads(model, batches, stats, heads: dict, kw: dict, ratio: float, gqa: str, damping: float,
                     fused: bool = True, one_pass: bool = False) -> tuple:
    """``(heads, statistics)`` of a sequential recipe: the one-shot selection's ``heads`` keep
    their count per layer and are re-chosen and refit layer by layer, as ``prune --sequential``
    calibrates; ``one_pass`` (a budget spread evenly over the layers, ``kw["scope"] ==
    "per_layer"``): one pass that collects its own statistics (``fused`` as ``collect`` takes
    it), each layer's count decided when the pass reaches it, protected as ``select_heads``
    protects (the default recipe's layers where ``kw`` names no score or order)."""
    from ..hf.collect import moments_like
    from ..hf.sequential import calibrate_sequentially

    if one_pass:  # (scope="per_layer": check_ratios refuses another before anything is evaluated)
        protect = kw.get("protect_layers")
        if protect is None and (kw.get("score") is not None or kw.get("order") is not None):
            protect = ()
        return calibrate_sequentially(model, batches, ratio=ratio, gqa=gqa, damping=damping, protect_layers=protect,
                                      min_heads_per_layer=kw.get("min_heads_per_layer", 1), fused=fused,
                                      moments=moments_like(stats) or True)
    return calibrate_sequentially(model, batches, stats, unit_counts(heads, stats, gqa), gqa=gqa, damping=damping)


def learned_scores(point, stats, batches, name: str, ratio: float, settings: dict, state: dict):
    """Learned gate scores for the sweep's ``ratio``, trained once and kept in ``state`` (``settings``:
    ``learn_gates`` options, the budget's included (:func:`learned_budget`), ``"batch_size"``:
    sequences per step, the calibration batches split to it, ``"cache"``: a dict shared across calls of
    :func:`~.sweep.run_sweep` on the same model and batches, e.g. one per evaluation text)."""
    from ..hf.learned import learn_gates

    settings = {**settings, "protect_layers": tuple(settings.get("protect_layers", ()))}  # hashable, for the key
    cache = settings.pop("cache", state.setdefault("_learned", {}))
    settings["ratio"] = round(settings["ratio"], 9)  # of the heads whose gates train
    # keyed by the model's layout too: a cache shared with another model's sweep trains anew
    key = (name, tuple(sorted(settings.items())), stats.layout_fingerprint())
    size = settings.pop("batch_size", None)  # sequences per step: smaller batches, more steps per CPU-minute
    if key not in cache:
        chunks = list(batches) if size is None else rebatch(batches, size)
        cache[key] = learn_gates(point.loaded.model, chunks, scores=stats if stats.outputs is not None else None,
                                 progress=not point.config.quiet, **settings)
    r = cache[key]
    state.setdefault("_learned_runs", {}).setdefault(name, []).append(
        {"ratio": ratio, "steps": r.steps, "seconds": r.seconds, "stopped": r.stopped,
         "open_fraction": r.open_fraction, "target_open": r.target_open, "loss_first": r.loss_first,
         "loss_last": r.loss_last})
    return r.scores
