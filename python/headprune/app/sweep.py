"""``headprune sweep``: quality against the fraction of heads pruned, for the named recipes
(entropy-based and not) and a seeded random baseline under the same constraints (masking, which is exact and
reversible, so one loaded model serves every point)."""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Optional

from ..ranking import DEFAULT_GQA, select_heads
from ..ranking.recipes import default_allocation
from ..stats.moments import DEFAULT_DAMPING
from .evaluate import metric_of, quality
from .sweep_journal import SweepJournal
from .sweep_reach import (check_ratios, learned_budget, learned_scores, learned_selection, random_selection,
                          sequential_heads)
from .report import number
from .sweep_table import fraction_text, random_mean

#: how removed heads are replaced (``removal``): a least-squares refit of the kept columns, their mean output, or nothing
REMOVALS = ("refit", "mean", "zero")

#: name -> select_heads keyword arguments, plus optional ``removal`` (default: the config's),
#: ``iterative`` (re-collect between ratios) and ``sequential`` (layer-by-layer calibration of
#: the refit, see headprune.hf.sequential); ``score=None`` is select_heads' default recipe,
#: and a recipe without a scope spreads the budget as ``headprune prune`` does by default
#: (``scope="measured"``, see headprune.hf.allocation, for encoders with the refit).
RECIPES = {
    "default": {},
    "default, spread evenly over the layers": {"scope": "per_layer"},
    "default, sequential": {"sequential": True},
    "default, measured allocation": {"scope": "measured"},
    "default, measured allocation, heads ranked": {"scope": "measured", "choose": "ranking"},
    "reconstruction (OBS), per layer": {"score": "reconstruction", "scope": "per_layer"},
    "reconstruction (OBS), per layer, sequential": {"score": "reconstruction", "scope": "per_layer",
                                                    "sequential": True},
    "output variance, per layer": {"score": "variance", "order": "low", "scope": "per_layer"},
    "inert, per layer": {"score": "inert", "order": "high", "scope": "per_layer"},
    "inert, measured allocation": {"score": "inert", "order": "high", "scope": "measured"},
    "entropy, per layer": {"score": "entropy", "scope": "per_layer", "order": "high"},
    "entropy, global (as written)": {"score": "entropy", "scope": "global", "order": "high"},
    "entropy, global (as written), zeroed": {"score": "entropy", "scope": "global", "order": "high",
                                             "removal": "zero"},
    "output variance, per layer, mean compensation": {"score": "variance", "order": "low", "scope": "per_layer",
                                                      "removal": "mean"},
    "default, even KV groups": {"gqa": "even"},
    "default, whole KV groups": {"gqa": "group"},
    "default, uniform layout": {"uniform": True},
}
#: learned hard-concrete gates (:func:`headprune.hf.learned.learn_gates`, trained at each
#: ratio on the calibration batches) ranking heads within each layer like the default, with
#: the default's protected layers and the same removal; ``headprune sweep --learn-steps N``
#: adds it (training costs a forward and a backward pass per step and ratio)
LEARNED_RECIPE = {"learned gates (hard concrete), per layer": {"learned": {}, "scope": "per_layer"}}
#: the default calibrated layer by layer in one pass (``calibrate_sequentially(..., ratio=)``:
#: each layer's count decided as the pass reaches it), for benchmarks; not in a sweep by default
ONE_PASS_RECIPE = {"default, sequential in one pass": {"sequential": "one pass", "scope": "per_layer"}}


@dataclass
class SweepConfig:
    """What a sweep measures: the model's name (for the report), the fractions, the random
    baseline (seeds and scope), the removal (``gqa``, ``removal``: see :data:`REMOVALS`) and
    the evaluation."""

    model: str
    ratios: list
    seeds: int = 3
    random_scope: str = "per_layer"
    random_protect: bool = False  # the draws keep the default's protected layers whole (a causal LM's first)
    gqa: str = DEFAULT_GQA
    removal: str = "refit"
    values: Optional[bool] = None  # the refit includes value rows (None: where prune does it by default)
    damping: float = DEFAULT_DAMPING
    eval_windows: int = 48
    eval_paragraphs: Optional[int] = None
    fused: bool = True
    quiet: bool = False

    def __post_init__(self):
        if self.removal not in REMOVALS:
            raise ValueError(f"removal: expected one of {REMOVALS}, got {self.removal!r}")

    @classmethod
    def from_args(cls, args) -> "SweepConfig":
        """From the CLI's parsed arguments (``headprune sweep``)."""
        kw = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        kw["removal"] = removal_of(args)
        kw["values"] = getattr(args, "refit_values", None)
        return cls(**kw)


def _measurement_key(stats, gqa: str, damping: float, kw: dict) -> str:
    """What a measured allocation's layer costs depend on, besides the model and its batches."""
    from ..hf.allocation import resolve_choice

    choose = resolve_choice(stats, gqa, kw.get("score"), kw.get("order"), kw.get("choose"))
    rest = sorted((k, repr(v)) for k, v in kw.items() if k != "choose")
    return repr((gqa, damping, choose, rest))


def _reusable(costs, stats, gqa: str, damping: float, kw: dict):
    """``costs`` where they were measured as ``kw`` asks (a cache shared with an earlier sweep,
    e.g. of another damping, holds others by the same recipe name), else ``None``."""
    from ..hf.allocation import costs_differ

    select = {k: v for k, v in kw.items() if k != "sequences"}  # select_measured's options besides the budget
    return None if costs is None or costs_differ(costs, stats, gqa=gqa, damping=damping, **select) else costs


def run_sweep(config: SweepConfig, loaded, scores, held, settings, recipes: dict | None = None, batches=None,
              measured: dict | None = None, values_cache: dict | None = None, journal=None) -> dict:
    """Quality at every ratio of ``config`` for every recipe and the random baseline.

    ``recipes``: name -> select_heads keyword arguments (default :data:`RECIPES`), plus
    optional keys: ``removal`` (override ``config.removal`` for this recipe), ``values`` (override
    ``config.values``: the refit includes the kept heads' value rows), ``iterative``
    (re-collect on ``batches`` with the previous ratio's heads masked before selecting the
    next ratio's: iterative pruning with one round per ratio) and ``sequential`` (calibrate
    the refit layer by layer on ``batches``, the per-layer counts of the recipe's one-shot
    selection). ``scores`` need second moments for refits and the reconstruction score.
    ``measured``: a dict that keeps each measured-allocation recipe's layer costs by name,
    to share them with later sweeps of the same model, scores and batches (they do not depend
    on the evaluation text). ``values_cache``: a dict that keeps value moments by selection (each
    hundreds of MB on a small encoder) for later sweeps of the same model and batches.
    ``journal``: a :class:`~.sweep_journal.SweepJournal` whose points (but an iterative recipe's)
    are taken as measured and to which every point measured is added (an interrupted sweep's, to
    resume it)."""
    recipes = RECIPES if recipes is None else recipes
    off = refit_only(recipes, config.removal)
    if off:
        raise ValueError(f"recipes: {', '.join(map(repr, off))} calibrate or measure the least-squares refit, but "
                         f"would be evaluated with removal {config.removal!r}; leave them out or remove with 'refit'")
    if any("learned" in kw for kw in recipes.values()) and batches is None:
        raise ValueError("recipes: learned gates train on the calibration text; run_sweep needs the batches")
    if sorted(config.ratios) != list(config.ratios) and any(kw.get("iterative") for kw in recipes.values()):
        raise ValueError("ratios: iterative recipes need increasing ratios")
    check_ratios(config, scores, recipes)
    point = _Evaluator(config, loaded, held[: config.eval_paragraphs or len(held)], batches, values_cache)
    result = _new_result(config, loaded, point.baseline_value, recipes, settings, sum(scores.num_heads))
    if config.eval_paragraphs and config.eval_paragraphs < len(held):  # said in the table's heading
        result["eval_paragraphs"] = [config.eval_paragraphs, len(held)]
    result["values"] = point.values
    if point.values:  # said under the table, whose heading names the value refit
        result["output_refit_only"] = [k for k, kw in recipes.items() if kw.get("removal", config.removal) == "refit"
                                       and not refits_values(kw, True)]
    result["unbiased"] = [k for k, kw in recipes.items() if not refit_bias_of(  # as prune --uniform refits those
        loaded.model, kw.get("uniform"), kw.get("removal", config.removal), refits_values(kw, point.values))]
    journal = SweepJournal() if journal is None else journal
    state = {name: ({}, scores) for name in recipes}  # iterative recipes: heads so far, latest scores
    state["_costs"] = {} if measured is None else measured  # measured allocations' layer costs, by recipe
    t0 = time.perf_counter()
    bar = _bar(len(config.ratios) * (len(recipes) + config.seeds), config.quiet)
    for r in config.ratios:
        for name, kw in recipes.items():
            bar.set_postfix_str(f"{r:g}: {name}", refresh=True)
            # an iterative recipe's rounds build on each other: measured again, never taken
            done = None if kw.get("iterative") else journal.replay(r, name, state)
            if done is None:
                done = _recipe_point(config, point, scores, state, name, kw, r, batches)
                journal.record(r, name, *done, state)
            heads, value = done
            result["heads"].setdefault(name, []).append({str(k): v for k, v in heads.items()})
            result["recipes"][name].append(value)
            bar.update(1)
        bar.set_postfix_str(f"{r:g}: random heads", refresh=True)
        values, counts = journal.replay_random(r) or _random_point(config, point, scores, r, journal)
        result["random"].append(values)
        result["random_heads"].append(counts)  # even layouts: draws can differ
        bar.update(config.seeds)
        if not config.quiet:
            bar.write(f"ratio {fraction_text(r)}: " + ", ".join(f"{k}={number(v[-1])}" for k, v in result["recipes"].items())
                  + (f", random={number(random_mean(result['random'][-1], result['lower_is_better']))}"
                     if config.seeds else "")  # the table's mean (geometric for perplexity)
                  + f" ({time.perf_counter() - t0:.0f} s since the first point)")
    bar.close()
    if state.get("_learned_runs"):
        result["learned"] = state["_learned_runs"]
    costs = {k: v for k, v in journal.measured.items() if k in recipes}  # as recorded with each point
    if costs:
        result["measured_allocation"] = costs
    return result


def _random_point(config, point, scores, ratio: float, journal) -> tuple:
    """``(metrics, head counts)`` of the random draws at ``ratio``, added to ``journal``."""
    draws = [select_heads(scores, ratio=ratio, gqa=config.gqa, seed=s, **random_selection(config, scores))
             for s in range(config.seeds)]
    out = [point(h, scores, config.removal, point.values) for h in draws], [sum(map(len, h.values())) for h in draws]
    journal.record_random(ratio, *out)
    return out


def _bar(total: int, quiet: bool):
    """The sweep's progress over its points (recipes and random draws, ratio by ratio)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="headprune: sweep", unit="point", disable=quiet)


class _Evaluator:
    """The metric of the model with some heads masked (one loaded model serves every point)."""

    def __init__(self, config: SweepConfig, loaded, held: list, batches=None, values_cache: dict | None = None):
        from ..hf.values import refits_values_by_default

        self.config, self.loaded, self.held, self.batches = config, loaded, held, batches
        self.cache = values_cache  # value moments by selection, kept only where the caller asks
        self.values = (refits_values_by_default(loaded.model) if config.values is None else config.values) \
            and config.removal == "refit"
        self.metric, self.lower = metric_of(loaded.kind)
        self.reference = self._quality(None)
        self.baseline_value = self.reference[self.metric]

    def _quality(self, reference) -> dict:
        return quality(self.loaded, self.held, reference, eval_windows=self.config.eval_windows, metric_only=True)

    def value_moments(self, heads: dict):
        """The value moments of removing ``heads``, from the cache where it holds them, else
        collected on the calibration batches (and cached where there is a cache)."""
        from ..hf.values import collect_values

        if self.batches is None:
            raise ValueError("recipes: the value refit collects on the calibration text; run_sweep needs the batches")
        key = repr(sorted((int(k), sorted(v)) for k, v in heads.items() if v))
        found = None if self.cache is None else self.cache.get(key)
        if found is None:
            found = collect_values(self.loaded.model, self.batches, heads)
            if self.cache is not None:
                self.cache[key] = found
        return found

    def __call__(self, heads: dict, stats, removal: str, values: bool = False, refit_bias: bool = True) -> float:
        from ..hf import mask_heads

        how = removal_kwargs(removal, stats, self.config.damping, refit_bias)
        if values and removal == "refit" and any(heads.values()):
            how["values"] = self.value_moments(heads)
        with mask_heads(self.loaded.model, heads, **how):
            return self._quality(self.reference)[self.metric]


def _new_result(config: SweepConfig, loaded, baseline: float, recipes: dict, settings: dict, heads: int) -> dict:
    """The result before its points; ``heads`` (the model's) and ``random_heads`` (each draw's,
    by ratio) are the table's measure of each cell's budget."""
    metric, lower = metric_of(loaded.kind)
    settings = {**settings, "damping": config.damping,  # what the figures depend on besides the calibration
                **({"eval_windows": config.eval_windows} if loaded.kind == "causal" else {})}
    return {"model": config.model, "data": settings["data"], "metric": metric, "lower_is_better": lower,
            "baseline": baseline, "ratios": list(config.ratios), "recipes": {k: [] for k in recipes}, "random": [],
            "settings": settings, "gqa": config.gqa, "random_scope": config.random_scope,
            "random_protect": config.random_protect, "heads": {},
            "removal": config.removal, "default_recipe": "default" if "default" in recipes else None,
            "heads_total": heads, "random_heads": [],
            "recipe_settings": {k: {n: _setting(v) for n, v in kw.items()} for k, kw in recipes.items()}}


def _setting(value):
    """A recipe option for the JSON result (tensors and learned-gate caches by name)."""
    if hasattr(value, "shape"):
        return "tensor"
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "cache"}
    return value


def _recipe_point(config, point, scores, state, name, kw, ratio, batches) -> tuple:
    """``(heads, metric)`` of one recipe at one ratio (re-collecting first if iterative)."""
    from ..hf import collect, mask_heads
    from ..hf.collect import moments_like

    values, kw = refits_values(kw, point.values), dict(kw)
    removal = kw.pop("removal", config.removal)
    refit_bias = refit_bias_of(point.loaded.model, kw.get("uniform"), removal, values)  # as prune refits it
    iterative, sequential = kw.pop("iterative", False), kw.pop("sequential", False)
    kw.pop("values", None)
    if (iterative or sequential) and batches is None:
        raise ValueError(f"recipes: {name!r} re-calibrates; run_sweep needs the calibration batches")
    stats, pruned = scores, None
    if iterative:
        pruned, stats = state[name]
        if pruned:
            with mask_heads(point.loaded.model, pruned, **removal_kwargs(removal, stats, config.damping)):
                stats = collect(point.loaded.model, batches, progress=False, fused=config.fused,  # moments as before
                                moments=moments_like(stats))
    gqa = kw.pop("gqa", config.gqa)
    learned = kw.pop("learned", None)
    if learned is not None:
        budget = learned_budget(kw, stats, ratio=ratio, gqa=gqa, damping=config.damping)  # what the selection removes
        scored = learned_scores(point, stats, batches, name, ratio, {**learned, **budget}, state)
        kw = learned_selection(kw, scored, stats)
    if kw.get("scope") is None:
        kw["scope"] = default_allocation(stats, removal, iterative=iterative, uniform=bool(kw.get("uniform")),
                                         kv_ratio=kw.get("kv_ratio"))
    if kw.get("scope") == "measured":
        if iterative or batches is None:
            raise ValueError(f"recipes: {name!r} measures each layer's cost on the calibration batches in one round; "
                             "run_sweep needs the batches, and it is not iterative")
        from ..hf.allocation import select_measured

        kw.pop("scope")
        if sequential:  # the sequential pass re-chooses each layer's heads by the ranking: measure those
            kw.setdefault("choose", "ranking")
        cache, keys = state["_costs"], state.setdefault("_cost_keys", {})
        # recipes that measure alike share one measurement (the default and its measured
        # allocation, or ranked heads where the ranking is what greedy resolves to)
        keys[name] = _measurement_key(stats, gqa, config.damping, kw)
        same = next((cache[n] for n, k in keys.items() if k == keys[name] and n in cache), None)
        heads, cache[name] = select_measured(point.loaded.model, batches, stats, ratio=ratio, gqa=gqa,
                                             damping=config.damping,
                                             costs=_reusable(cache.get(name, same), stats, gqa, config.damping, kw),
                                             progress=not config.quiet, **kw)  # minutes: a bar of its own
    elif sequential == "one pass":  # it decides each layer's count as it goes: no selection to keep
        heads = {}
    else:
        heads = select_heads(stats, ratio=ratio, gqa=gqa, pruned=pruned, damping=config.damping, **kw)
        heads = _measured_uniform(config, point, stats, state, kw, removal, refit_bias, heads, batches,
                                  iterative or sequential)
    if iterative:
        state[name] = (heads, stats)
    if sequential:
        heads, stats = sequential_heads(point.loaded.model, batches, stats, heads, kw, ratio, gqa, config.damping,
                                        config.fused, one_pass=sequential == "one pass")
    return heads, point(heads, stats, removal, values, refit_bias)


def _measured_uniform(config, point, stats, state, kw, removal: str, refit_bias: bool, heads, batches,
                      again: bool) -> dict:
    """``heads`` with the first layer's re-chosen by measurement where ``prune --uniform`` does,
    refitting the output bias as the recipe's evaluation will (``refit_bias``; once per selection:
    ratios that round to the same one measure once); ``again``: an iterative or sequential
    recipe, which re-calibrates and is not measured."""
    from ..hf.uniform import measure_uniform, measures

    if not measures(kw, removal, stats, iterative=again, sequential=again) or batches is None:
        return heads
    done = state.setdefault("_uniform", {})
    key = (repr(sorted(heads.items())), refit_bias)
    if key not in done:
        done[key] = measure_uniform(point.loaded.model, batches, stats, heads, damping=config.damping,
                                    refit_bias=refit_bias)[0]
    return done[key]


def refits_values(kw: dict, default: bool) -> bool:
    """Whether a recipe's refit includes the kept heads' value rows (``default``: the sweep's):
    one-shot value moments do not fit a sequential or iterative calibration's refit."""
    return bool(kw.get("values", default)) and not (kw.get("sequential") or kw.get("iterative"))


def refit_only(recipes: dict, removal: str) -> list:
    """The recipes of ``recipes`` that calibrate the refit layer by layer (``sequential``) or
    measure what removing heads with it costs (``scope="measured"``), whose removal (their own,
    else ``removal``) is another: what they chose would be evaluated without the refit."""
    return [name for name, kw in recipes.items()
            if (kw.get("sequential") or kw.get("scope") == "measured") and kw.get("removal", removal) != "refit"]


def removal_of(args) -> str:
    """``refit``, ``mean`` or ``zero`` from the CLI's ``--reconstruct`` and ``--compensate``."""
    if getattr(args, "reconstruct", False):
        return "refit"
    return "mean" if getattr(args, "compensate", None) is not False else "zero"  # None: not given, on


def check_removal_options(args) -> None:
    """--compensate chooses what replaces a removed head without the refit: refused with it,
    where it would be silently ignored; --refit-values, with the options that rule it out
    (``--steps auto`` is resolved on the model, later), before the model loads."""
    if getattr(args, "reconstruct", False) and getattr(args, "compensate", None) is not None:
        flag = "--compensate" if args.compensate else "--no-compensate"
        raise ValueError(f"{flag}: applies with --no-reconstruct (the refit replaces removed heads otherwise); drop "
                         f"it, or add --no-reconstruct")
    if getattr(args, "refit_values", None):
        from .removal_stage import refuse_values_with, values_conflicts

        steps = getattr(args, "steps", 1)
        refuse_values_with(values_conflicts(args, removal_of(args), steps if isinstance(steps, int) else 1))


def refit_bias_of(model, uniform: bool, removal: str, values: bool) -> bool:
    """Whether ``prune`` (and the sweep, alike) refits the output bias: not for a uniform layout
    refit without value rows where the config cannot declare the bias
    (:func:`headprune.hf.uniform.refits_bias`: mistral, qwen2, phi3), so the directory stays plain."""
    from ..hf.uniform import refits_bias

    return not (uniform and removal == "refit" and not values) or refits_bias(model)


def removal_kwargs(removal: str, stats, damping: float = DEFAULT_DAMPING, refit_bias: bool = True) -> dict:
    if removal == "refit":
        return {"reconstruct": stats, "damping": damping, **({} if refit_bias else {"refit_bias": False})}
    return {"compensate": stats} if removal == "mean" else {}
