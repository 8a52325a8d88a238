"""The sweep tables of docs/quality.md against their random draws, and the paragraph on random
draws that keep the default's protected layers (bench_quality.py --random-protect, see
make_docs.py and docs_tables.py)."""

from __future__ import annotations

from make_docs import mean, num, pct, table

from headprune.app.sweep_table import budgets, draws_removal


def _points(ctx, name: str) -> list:
    """``(result, ratio index)`` of every measured point."""
    return [(res, i) for res in ctx["R"][name]["results"] for i in range(len(res["ratios"]))]


def _won(ctx, name: str) -> tuple:
    """``(points where the default beats every draw, points)``."""
    points = _points(ctx, name)
    return sum(1 for res, i in points if beats_every_draw(res["recipes"]["default"][i], res["random"][i],
                                                             res["lower_is_better"])), len(points)


def protected_wins(ctx, name: str = "quality_random_protected") -> str:
    """At how many points the default beats every protected draw, in words."""
    won, total = _won(ctx, name)
    return f"{won} of {total} points" if won < total else f"every one of the {total} points"


def protected_summary(ctx, name: str = "quality_random_protected", unprotected: str = "quality_default_smollm2") -> str:
    """The protected draws against the unprotected draws of the targets table over the seeds both
    drew (a draw's seed is its index), where both measured the same text and ratio under the same
    calibration (the default's figures checked equal)."""
    other = {(r["evaluated_on"], ratio): (r, i) for r in ctx["R"][unprotected]["results"]
             for i, ratio in enumerate(r["ratios"])}
    parts, gains = [], []
    for res, i in _points(ctx, name):
        key = (res["evaluated_on"], res["ratios"][i])
        if key in other:
            o, j = other[key]
            if abs(o["recipes"]["default"][j] - res["recipes"]["default"][i]) > 1e-5 * o["recipes"]["default"][j]:
                raise ValueError(f"{name}: the default at {key} differs from {unprotected}'s: not the same calibration")
            n = min(len(o["random"][j]), len(res["random"][i]))
            kept, free = mean(res["random"][i][:n], True), mean(o["random"][j][:n], True)
            gains.append(kept <= free * (1 + 1e-5))  # equal where no draw took a head there, to float rounding
            parts.append(f"`{key[0]}` at {pct(key[1])}: {num(kept, 4)} kept whole, {num(free, 4)} not")
    won, total = _won(ctx, name)
    verdict = ("The default's lead over random pruning is not its protection of the first layer." if won == total else
               f"At {total - won} of {total} points a random draw with the first layer kept whole is as good as the "
               "default or better.")
    helps = ("keeping the first layer whole helps random draws too, or changes nothing where no draw took a head "
             "there" if all(gains) else f"keeping it whole helped the draws at {sum(gains)} of {len(gains)} points")
    return (f"Over the seeds both drew ({n} per point), against the targets table's draws, which may take heads from "
            f"the first layer (geometric means): {'; '.join(parts)}: {helps}. {verdict}")


def beats_every_draw(v: float, draws: list, lower: bool) -> bool:
    """Better than each random draw (a value inside the draws' range is not told from random heads)."""
    return all(v < d if lower else v > d for d in draws)


def _removal(settings: dict, default: str) -> str:
    """How a recipe removed its heads, read as the draws' removal is (:func:`draws_removal`), or
    the draws' ``default`` where its settings say nothing of it."""
    return draws_removal(settings) if {"removal", "compensate"} & set(settings) else default


def sweep_table(ctx, result: dict, recipes=None, digits: int = 4) -> str:
    """One row per ratio: each recipe's metric (bold when better than every random draw: a value
    inside the draws' range is not told from random heads; never for a recipe that removes heads
    otherwise than the draws, or fewer of them, which the draws do not measure), the random mean
    (geometric for perplexities) and range."""
    lower = result["lower_is_better"]
    names = list(result["recipes"]) if recipes is None else recipes
    seeds = len(result["random"][0]) if result["random"] else 0
    removal = draws_removal(result)
    apart = [n for n in names if _removal(result.get("recipe_settings", {}).get(n, {}), removal) != removal]
    out = []
    for i, r in enumerate(result["ratios"]):
        rnd = result["random"][i] if result["random"] else []
        cells = []
        for n in names:
            v = result["recipes"][n][i]
            k, drawn = budgets(result, n, i)  # (None, []) where the result does not record them
            better = bool(rnd) and n not in apart and beats_every_draw(v, rnd, lower) and (k is None or k >= max(drawn))
            cells.append(f"**{num(v, digits)}**" if better else num(v, digits))
        rand = [f"{num(mean(rnd, lower), digits)} ({num(min(rnd), digits)}-{num(max(rnd), digits)})"] if rnd else []
        out.append([pct(r)] + cells + rand)
    head = ["pruned"] + names + ([f"random, mean of {seeds} (range)"] if seeds else [])
    note = (f"\n\n({', '.join(f'`{n}`' for n in apart)}: removed otherwise than the random draws, so never "
            "bold: the draws do not measure that removal.)") if apart and seeds else ""
    return table(head, out) + note


def sweep_caption(ctx, result: dict) -> str:
    better = "lower" if result["lower_is_better"] else "higher"
    if "evaluated_on" in result:
        where = f"calibrated on `{result['calibrated_on']}`, evaluated on held-out `{result['evaluated_on']}`"
    else:
        where = f"on held-out `{result['data']}`"
    return f"**{result['model']}**, {result['metric']} {where} ({better} is better; unpruned {num(result['baseline'], 4)})"


TABLES = {f.__name__: f for f in (protected_wins, protected_summary, sweep_table, sweep_caption)}
