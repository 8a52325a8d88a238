"""``headprune sweep``: quality against the fraction of heads pruned, for the entropy recipes
and a seeded random baseline under the same constraints (masking, which is exact and
reversible, so one loaded model serves every point)."""

from __future__ import annotations

import math
import time

from .ranking import select_heads

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


def run_sweep(args, loaded, scores, held, settings, recipes: dict | None = None, batches=None) -> dict:
    """``recipes``: name -> select_heads keyword arguments (default :data:`RECIPES`), plus two
    optional keys: ``compensate`` (override ``args.compensate`` for this recipe) and
    ``iterative`` (re-collect on ``batches`` with the previous ratio's heads masked before
    selecting the next ratio's: iterative pruning with one round per ratio)."""
    from .hf import collect, mask_heads
    from .pipeline import _metric, quality

    recipes = RECIPES if recipes is None else recipes
    metric, lower = _metric(loaded.kind)
    held = held[: getattr(args, "eval_paragraphs", None) or len(held)]
    reference = quality(args, loaded, held, sweep=True)
    base = reference[metric]
    result = {"model": args.model, "data": settings["data"], "metric": metric, "lower_is_better": lower,
              "baseline": base, "ratios": list(args.ratios), "recipes": {k: [] for k in recipes}, "random": [],
              "settings": settings, "gqa": args.gqa}

    random_scope = getattr(args, "random_scope", "per_layer")
    result["random_scope"] = random_scope
    result["heads"] = {}  # recipe -> the selection at each ratio
    default_comp = bool(getattr(args, "compensate", False))
    result["compensate"] = default_comp
    result["recipe_settings"] = {k: {n: (v if not hasattr(v, "shape") else "tensor") for n, v in kw.items()}
                                 for k, kw in recipes.items()}

    def score_of(heads, stats, comp):
        with mask_heads(loaded.model, heads, compensate=stats if comp else None):
            return quality(args, loaded, held, reference=reference, sweep=True)[metric]

    state = {name: ({}, scores) for name in recipes}  # iterative recipes: heads so far, latest scores
    if sorted(args.ratios) != list(args.ratios) and any(kw.get("iterative") for kw in recipes.values()):
        raise ValueError("ratios: iterative recipes need increasing ratios")
    t0 = time.perf_counter()
    for r in args.ratios:
        for name, kw in recipes.items():
            kw = dict(kw)
            comp, iterative = kw.pop("compensate", default_comp), kw.pop("iterative", False)
            stats, pruned = scores, None
            if iterative:
                pruned, stats = state[name]
                if pruned:
                    if batches is None:
                        raise ValueError(f"recipes: {name!r} is iterative; run_sweep needs the calibration batches")
                    with mask_heads(loaded.model, pruned, compensate=stats if comp else None):
                        stats = collect(loaded.model, batches, progress=False, fused=getattr(args, "fused", True))
            heads = select_heads(stats, ratio=r, gqa=args.gqa, pruned=pruned, **kw)
            if iterative:
                state[name] = (heads, stats)
            result["heads"].setdefault(name, []).append({str(k): v for k, v in heads.items()})
            result["recipes"][name].append(score_of(heads, stats, comp))
        result["random"].append([score_of(select_heads(scores, ratio=r, gqa=args.gqa, order="random", seed=s,
                                                       scope=random_scope), scores, default_comp)
                                 for s in range(args.seeds)])
        if not args.quiet:
            print(f"ratio {r:.2f}: " + ", ".join(f"{k}={v[-1]:.4g}" for k, v in result["recipes"].items())
                  + (f", random={sum(result['random'][-1]) / args.seeds:.4g}" if args.seeds else "")
                  + f" ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return result


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
