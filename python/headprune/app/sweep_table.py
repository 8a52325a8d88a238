"""The sweep's result as a markdown table: each recipe's metric at every fraction pruned,
against a seeded random baseline's mean and range."""

from __future__ import annotations

import math

from ..ranking import DEFAULT_GQA
from .report import calibration_text, masked_first, number

#: random-baseline scopes (``--random-scope``) and what each draws
RANDOM_SCOPES = {"per_layer": "spread evenly over the layers",
                 "global": "drawn from the whole model (at least one kept per layer)"}


def random_mean(values: list, lower: bool) -> float:
    """Geometric mean for perplexities (multiplicative scale), arithmetic otherwise."""
    if lower:
        return math.exp(sum(math.log(v) for v in values) / len(values))
    return sum(values) / len(values)


def sweep_markdown(result: dict) -> str:
    """The sweep as a markdown table; without random draws (a benchmark's ``--seeds 0``) the
    random columns and the marks against them are left out."""
    lower, names = result["lower_is_better"], list(result["recipes"])
    draws = len(result["random"][0]) if result["random"] else 0
    mean_name, seeds = "geometric mean" if lower else "mean", f"{draws} seed{'s' * (draws != 1)}"
    columns = ["fraction pruned", *names, *([f"random {mean_name} ({seeds})", "random range"] if draws else [])]
    lines = [_heading(result, draws), "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    heads, empty, other = result.get("heads", {}), set(), set()  # (no head): the unpruned model
    removal = draws_removal(result)  # the random draws'
    apart = [n for n in names if result.get("recipe_settings", {}).get(n, {}).get("removal", removal) != removal
             or n in result.get("unbiased", ())]
    for i, r in enumerate(result["ratios"]):
        rnd = result["random"][i] if draws else []
        mean = random_mean(rnd, lower) if rnd else None
        cells, marked = [fraction_text(r)], False
        for n in names:
            v = result["recipes"][n][i]
            if r > 0 and n in heads and not sum(map(len, heads[n][i].values())):
                empty.add(n)
                cells.append(number(v) + " (no head)")
                continue
            # not starred where the table shows the same number as the random mean
            better = mean is not None and (v < mean if lower else v > mean) and number(v) != number(mean)
            better = better and n not in apart  # removed otherwise than the draws: no comparison
            k, drawn = budgets(result, n, i)
            uneven = k is not None and {k} != set(drawn)  # its layout removes another number of heads than the draws
            if uneven:
                other.add(n)
                marked = True
                better = better and k >= max(drawn)
            cells.append(number(v) + (f" ({k / result['heads_total']:.0%} of heads)" if uneven else "")
                         + (" *" if better else ""))
        if rnd:
            span = [number(min(rnd)), number(max(rnd))] if not any(map(math.isnan, rnd)) else ["nan"] * 2
            # (min and max of NaN depended on where it was)
            cells += [number(mean) + (_drawn_share(result, i) if marked else ""), "-".join(span)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _star_notes(draws, mean_name, [n for n in apart if n not in result.get("unbiased", ())])
    if result.get("unbiased"):
        lines += ["", f"{', '.join(f'`{n}`' for n in result['unbiased'])}: kept heads refit without the output bias, "
                      "which the model's config cannot declare for a uniform layout (as `prune --uniform` saves it)."]
    if other:
        lines += ["", "`(x% of heads)`: the share of the heads removed, where the recipe's layout removes another "
                      "number of heads than the random draws at that fraction (or the draws differ among themselves), "
                      "and beside the random mean the draws' share there; starred only where it removes at least as "
                      "many as each draw."]
    if result.get("output_refit_only") and result.get("values") and result.get("removal") == "refit":
        only = ", ".join(f"`{n}`" for n in result["output_refit_only"])
        lines += ["", f"{only}: output columns refit only (a calibration layer by layer or round by round does not "
                      "fit the one-shot value moments)."]
    if empty:
        lines += ["", f"`(no head)`: the layout of {', '.join(sorted(empty))} rounds to no head there (unpruned)."]
    return "\n".join(lines) + "\n"


def draws_removal(result: dict) -> str:
    """How the sweep removed heads (the random draws' removal; earlier results files say
    ``compensate`` instead)."""
    return result.get("removal", "mean" if result.get("compensate") else "zero")


def fraction_text(r: float) -> str:
    """A fraction as the table prints it: two digits, more where they round it (0.125 is not 0.12)."""
    return f"{r:.2f}" if round(r, 2) == r else f"{r:g}"


def _heading(result: dict, draws: int) -> str:
    """The sentence above the table: what was measured, on which text, and how heads were removed."""
    how = {"refit": "kept heads refit by least squares", "mean": "removed heads replaced by their mean output",
           "zero": "removed heads zeroed"}[draws_removal(result)]
    if result.get("values") and result.get("removal") == "refit":
        how = "kept heads' value rows and output columns refit by least squares"
    s = result.get("settings")
    if draws_removal(result) == "refit" and (s or {}).get("damping") is not None:
        how += f" (damping {s['damping']:g})"
    if draws:
        how += f"; random heads {RANDOM_SCOPES[result.get('random_scope', 'per_layer')]}"
        how += ", the default's protected layers kept whole" * bool(result.get("random_protect"))
        gqa = result.get("gqa")
        how += f", in --gqa {gqa} layouts" * (gqa is not None and gqa != DEFAULT_GQA)
    calibrated = f" Calibrated on {calibration_text(s)}." if s and "samples" in s else ""
    calibrated += masked_first(s or {}, "counted in the fractions") + _other_layouts(result)
    evaluated = (s or {}).get("evaluated_on") or result["data"]  # a benchmark evaluates other texts too
    part = result.get("eval_paragraphs")
    where = f"`{evaluated}`" + (f", its first {part[0]} of {part[1]} paragraphs" if part else "")
    stored = (s or {}).get("checkpoint_dtype")
    rounded = {"gguf": (s or {}).get("saved_dtype", "bfloat16"), "float16": "float16", "bfloat16": "bfloat16"}.get(stored)
    rounded = None if rounded == "float32" else rounded
    if rounded and (s or {}).get("dtype", "float32") in ("float32", "float64"):  # the refit is evaluated unrounded
        calibrated += (f" Evaluated in {(s or {}).get('dtype', 'float32')} with the refit unrounded; `headprune prune` "
                       f"of this {stored} checkpoint rounds the pruned model to {rounded}, the type it saves.")
    return (f"{result['metric']} of {result['model']} on held-out {where} "
            f"({'lower' if result['lower_is_better'] else 'higher'} is better; unpruned {result['baseline']:.4g}; "
            f"{how}).{calibrated}")


def _other_layouts(result: dict) -> str:
    """The uniform recipes that ran in other --gqa layouts than the heading's, each with its own
    (one under --gqa query keeps every KV group even; the KV-layout recipes' names say theirs)."""
    gqa = result.get("gqa")
    return "".join(f" `{name}`: in --gqa {kw['gqa']} layouts" + " (a config declares one layout)" * (kw["gqa"] == "even")
                   + "." for name, kw in (result.get("recipe_settings") or {}).items()
                   if gqa is not None and kw.get("uniform") and kw.get("gqa") not in (None, gqa))


def _star_notes(draws: int, mean_name: str, apart: list) -> list:
    """What a star means, and which recipes none can mark (``apart``: removed otherwise than the draws)."""
    if not draws:
        return []
    lines = ["", f"`*` = better than the random {mean_name} at that fraction."]
    if apart:
        lines += ["", f"{', '.join(f'`{n}`' for n in apart)}: removed otherwise than the random draws (whose removal the "
                      "heading names), so not starred either way: a random baseline of their own removal is what "
                      "they compare with."]
    return lines


def _drawn_share(result: dict, i: int) -> str:
    """The random draws' share of the heads at the ``i``-th ratio, as the marks of the recipes
    that remove another number of heads give theirs."""
    drawn, total = result["random_heads"][i], result["heads_total"]
    low, high = f"{min(drawn) / total:.0%}", f"{max(drawn) / total:.0%}"
    return f" ({low if low == high else low + '-' + high} of heads)"


def budgets(result: dict, name: str, i: int) -> tuple:
    """``(heads the recipe removed, [heads each random draw removed])`` at the ``i``-th ratio, or
    ``(None, [])`` where the result does not say (earlier results files)."""
    random = result.get("random_heads") or []
    chosen = result.get("heads", {}).get(name)
    if not result.get("heads_total") or i >= len(random) or not random[i] or not chosen:
        return None, []
    return sum(map(len, chosen[i].values())), random[i]
