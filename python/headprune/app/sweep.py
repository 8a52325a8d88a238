"""``headprune sweep``: quality against the fraction of heads pruned, for the named recipes
(entropy-based and not) and a seeded random baseline under the same constraints (masking, which is exact and
reversible, so one loaded model serves every point)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Optional

from ..ranking import select_heads
from .evaluate import metric_of, quality

#: random-baseline scopes (``--random-scope``) and what each draws
RANDOM_SCOPES = {"per_layer": "spread evenly over the layers",
                 "global": "drawn from the whole model (at least one kept per layer)"}

#: name -> select_heads keyword arguments; "default" uses select_heads' own defaults.
RECIPES = {
    "inert, per layer": {"score": "inert", "order": "high", "scope": "per_layer"},
    "inert, per layer, iterative": {"score": "inert", "order": "high", "scope": "per_layer", "iterative": True},
    "entropy, per layer": {"score": "entropy", "scope": "per_layer", "order": "high"},
    "entropy, global (as written), zeroed": {"score": "entropy", "scope": "global", "order": "high",
                                             "compensate": False},
    "output variance, per layer": {"score": "variance", "order": "low", "scope": "per_layer"},
    "output variance, per layer, first layer kept": {"score": "variance", "order": "low", "scope": "per_layer",
                                                      "protect_layers": [0]},
    "output variance, per layer, iterative": {"score": "variance", "order": "low", "scope": "per_layer",
                                              "iterative": True},
}


@dataclass
class SweepConfig:
    """What a sweep measures: the model's name (for the report), the fractions, the random
    baseline (seeds and scope), the removal (``gqa``, ``compensate``) and the evaluation."""

    model: str
    ratios: list
    seeds: int = 3
    random_scope: str = "per_layer"
    gqa: str = "query"
    compensate: bool = True
    eval_windows: int = 48
    eval_paragraphs: Optional[int] = None
    fused: bool = True
    quiet: bool = False

    @classmethod
    def from_args(cls, args) -> "SweepConfig":
        """From the CLI's parsed arguments (``headprune sweep``)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def run_sweep(config: SweepConfig, loaded, scores, held, settings, recipes: dict | None = None, batches=None) -> dict:
    """Quality at every ratio of ``config`` for every recipe and the random baseline.

    ``recipes``: name -> select_heads keyword arguments (default :data:`RECIPES`), plus two
    optional keys: ``compensate`` (override ``config.compensate`` for this recipe) and
    ``iterative`` (re-collect on ``batches`` with the previous ratio's heads masked before
    selecting the next ratio's: iterative pruning with one round per ratio)."""
    recipes = RECIPES if recipes is None else recipes
    if sorted(config.ratios) != list(config.ratios) and any(kw.get("iterative") for kw in recipes.values()):
        raise ValueError("ratios: iterative recipes need increasing ratios")
    point = _Evaluator(config, loaded, held[: config.eval_paragraphs or len(held)])
    result = _new_result(config, loaded, point.baseline_value, recipes, settings)
    state = {name: ({}, scores) for name in recipes}  # iterative recipes: heads so far, latest scores
    t0 = time.perf_counter()
    for r in config.ratios:
        for name, kw in recipes.items():
            heads, value = _recipe_point(config, point, scores, state, name, kw, r, batches)
            result["heads"].setdefault(name, []).append({str(k): v for k, v in heads.items()})
            result["recipes"][name].append(value)
        result["random"].append([point(select_heads(scores, ratio=r, gqa=config.gqa, order="random", seed=s,
                                                    scope=config.random_scope), scores, config.compensate)
                                 for s in range(config.seeds)])
        if not config.quiet:
            print(f"ratio {r:.2f}: " + ", ".join(f"{k}={v[-1]:.4g}" for k, v in result["recipes"].items())
                  + (f", random={sum(result['random'][-1]) / config.seeds:.4g}" if config.seeds else "")
                  + f" ({time.perf_counter() - t0:.0f} s since the first point)", flush=True)
    return result


class _Evaluator:
    """The metric of the model with some heads masked (one loaded model serves every point)."""

    def __init__(self, config: SweepConfig, loaded, held: list):
        self.config, self.loaded, self.held = config, loaded, held
        self.metric, self.lower = metric_of(loaded.kind)
        self.reference = self._quality(None)
        self.baseline_value = self.reference[self.metric]

    def _quality(self, reference) -> dict:
        return quality(self.loaded, self.held, reference, eval_windows=self.config.eval_windows, metric_only=True)

    def __call__(self, heads: dict, stats, compensate: bool) -> float:
        from ..hf import mask_heads

        with mask_heads(self.loaded.model, heads, compensate=stats if compensate else None):
            return self._quality(self.reference)[self.metric]


def _new_result(config: SweepConfig, loaded, baseline: float, recipes: dict, settings: dict) -> dict:
    metric, lower = metric_of(loaded.kind)
    return {"model": config.model, "data": settings["data"], "metric": metric, "lower_is_better": lower,
            "baseline": baseline, "ratios": list(config.ratios), "recipes": {k: [] for k in recipes}, "random": [],
            "settings": settings, "gqa": config.gqa, "random_scope": config.random_scope, "heads": {},
            "compensate": bool(config.compensate),
            "recipe_settings": {k: {n: (v if not hasattr(v, "shape") else "tensor") for n, v in kw.items()}
                                for k, kw in recipes.items()}}


def _recipe_point(config, point, scores, state, name, kw, ratio, batches) -> tuple:
    """``(heads, metric)`` of one recipe at one ratio (re-collecting first if iterative)."""
    from ..hf import collect, mask_heads

    kw = dict(kw)
    comp, iterative = kw.pop("compensate", config.compensate), kw.pop("iterative", False)
    stats, pruned = scores, None
    if iterative:
        pruned, stats = state[name]
        if pruned:
            if batches is None:
                raise ValueError(f"recipes: {name!r} is iterative; run_sweep needs the calibration batches")
            with mask_heads(point.loaded.model, pruned, compensate=stats if comp else None):
                stats = collect(point.loaded.model, batches, progress=False, fused=config.fused)
    heads = select_heads(stats, ratio=ratio, gqa=config.gqa, pruned=pruned, **kw)
    if iterative:
        state[name] = (heads, stats)
    return heads, point(heads, stats, comp)


def random_mean(values: list, lower: bool) -> float:
    """Geometric mean for perplexities (multiplicative scale), arithmetic otherwise."""
    if lower:
        return math.exp(sum(math.log(v) for v in values) / len(values))
    return sum(values) / len(values)


def sweep_markdown(result: dict) -> str:
    lower = result["lower_is_better"]
    names = list(result["recipes"])
    head = f"| fraction pruned | {' | '.join(names)} | random mean ({len(result['random'][0])} seeds) | random range |"
    how = "removed heads replaced by their mean output" if result.get("compensate") else "removed heads zeroed"
    how += f"; random heads {RANDOM_SCOPES[result.get('random_scope', 'per_layer')]}"
    lines = [f"{result['metric']} of {result['model']} on held-out `{result['data']}` "
             f"({'lower' if lower else 'higher'} is better; unpruned {result['baseline']:.4g}; {how}).", "", head,
             "|" + "---|" * (len(names) + 3)]
    for i, r in enumerate(result["ratios"]):
        rnd = result["random"][i]
        mean = random_mean(rnd, lower)
        cells = []
        for n in names:
            v = result["recipes"][n][i]
            better = v < mean if lower else v > mean
            cells.append(f"{v:.4g}" + (" *" if better else ""))
        lines.append(f"| {r:.2f} | {' | '.join(cells)} | {mean:.4g} | {min(rnd):.4g}-{max(rnd):.4g} |")
    lines += ["", "`*` = better than the random mean at that fraction."]
    return "\n".join(lines) + "\n"
