"""``headprune sweep``: quality against the fraction of heads pruned, for the entropy recipes
and a seeded random baseline under the same constraints (masking, which is exact and
reversible, so one loaded model serves every point)."""

from __future__ import annotations

import math
import time

from .ranking import select_heads

#: name -> select_heads keyword arguments; "default" uses select_heads' own defaults.
RECIPES = {
    "default": {},
    "entropy, global (as written)": {"score": "entropy", "scope": "global", "order": "high"},
    "entropy, per layer": {"score": "entropy", "scope": "per_layer", "order": "high"},
    "lowest entropy, global": {"score": "entropy", "scope": "global", "order": "low"},
}


def run_sweep(args, loaded, scores, held, settings, recipes: dict | None = None) -> dict:
    """``recipes``: name -> select_heads keyword arguments (default :data:`RECIPES`)."""
    from .hf import mask_heads
    from .pipeline import _metric, quality

    recipes = RECIPES if recipes is None else recipes
    metric, lower = _metric(loaded.kind)
    held = held[: getattr(args, "eval_paragraphs", None) or len(held)]
    reference = quality(args, loaded, held, sweep=True)
    base = reference[metric]
    result = {"model": args.model, "data": settings["data"], "metric": metric, "lower_is_better": lower,
              "baseline": base, "ratios": list(args.ratios), "recipes": {k: [] for k in recipes}, "random": [],
              "settings": settings, "gqa": args.gqa}

    compensate = scores if getattr(args, "compensate", False) else None
    result["compensate"] = compensate is not None

    def score_of(heads):
        with mask_heads(loaded.model, heads, compensate=compensate):
            return quality(args, loaded, held, reference=reference, sweep=True)[metric]

    t0 = time.perf_counter()
    for r in args.ratios:
        for name, kw in recipes.items():
            result["recipes"][name].append(score_of(select_heads(scores, ratio=r, gqa=args.gqa, **kw)))
        result["random"].append([score_of(select_heads(scores, ratio=r, gqa=args.gqa, order="random", seed=s))
                                 for s in range(args.seeds)])
        if not args.quiet:
            print(f"ratio {r:.2f}: " + ", ".join(f"{k}={v[-1]:.4g}" for k, v in result["recipes"].items())
                  + f", random={sum(result['random'][-1]) / args.seeds:.4g} ({time.perf_counter() - t0:.0f} s)",
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
    lines = [f"{result['metric']} of {result['model']} on held-out `{result['data']}` "
             f"({'lower' if lower else 'higher'} is better; unpruned {result['baseline']:.4g}).", "", head,
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
