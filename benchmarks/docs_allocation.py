"""The tables of docs/quality.md on measured allocation and the refit's damping (see make_docs.py
and docs_tables.py)."""

from __future__ import annotations

from make_docs import mean as _mean
from make_docs import change, num, pct, table

EVEN, MEASURED = "default, spread evenly over the layers", "default, measured allocation"
RANKED = "default, measured allocation, heads ranked"
#: the MiniLM sweeps with the measured allocation, by calibration text
FILES = ["quality_refit_minilm", "quality_allocation_minilm_tutorial", "quality_allocation_minilm_licences"]


def _allocations(res: dict) -> tuple:
    """The even spread's and the measured allocation's values of one sweep result (one of
    them may be the default itself), or ``None`` where the result lacks either."""
    measured_default = "default" in res.get("measured_allocation", {})
    even = res["recipes"].get(EVEN, None if measured_default else res["recipes"].get("default"))
    measured = res["recipes"].get(MEASURED, res["recipes"]["default"] if measured_default else None)
    return (even, measured) if even and measured else None


def allocation_table(ctx, names: list = FILES) -> str:
    """Per model, text and ratio: the default ranking with the budget spread evenly, by
    measured allocation with the heads the ranking chooses (where the results have it) and by
    the measured allocation, against the random mean."""
    rows = []
    for name in names:
        for res in ctx["R"][name]["results"]:
            pair = _allocations(res)
            if pair is None:
                continue
            lower, ranked = res["lower_is_better"], res["recipes"].get(RANKED)
            for i, r in enumerate(res["ratios"]):
                even, measured = pair[0][i], pair[1][i]
                diff = change(measured, even, lower, 4)
                rows.append([res["model"], f"`{res['calibrated_on']}` -> `{res['evaluated_on']}`", pct(r),
                             num(even, 4), num(ranked[i], 4) if ranked else "", num(measured, 4), diff,
                             num(_mean(res["random"][i], lower), 4) if res["random"] else ""])
    return table(["model", "calibrated -> evaluated", "pruned", "spread evenly", "measured, heads ranked",
                  "measured (default)", "default vs even", "random, same removal"], rows)


def allocation_seconds(ctx, name: str, recipe: str = "default") -> str:
    """The seconds ``recipe``'s measurement took, over the evaluation texts of one results file."""
    secs = sorted({res["measured_allocation"][recipe]["seconds"] for res in ctx["R"][name]["results"]
                   if recipe in res.get("measured_allocation", {})})
    return f"{num(min(secs))}-{num(max(secs))} s" if len(secs) > 1 else f"{num(secs[0])} s"


def greedy_gain(ctx, same: bool, names: list = FILES) -> str:
    """The default's measured allocation against the same allocation with the heads the ranking
    chooses (fidelity), calibrated and evaluated on the same text (``same``) or on different
    ones: the range and the mean of the differences over those texts and ratios, and the point
    that lost most."""
    points = []
    for name in names:
        for res in ctx["R"][name]["results"]:
            if (res["calibrated_on"] == res["evaluated_on"]) != same:
                continue
            if RANKED in res["recipes"] and "default" in res.get("measured_allocation", {}):
                points += [(d - r, d, r, ratio, res) for d, r, ratio in
                           zip(res["recipes"]["default"], res["recipes"][RANKED], res["ratios"])]
    if not points:
        return "not measured"
    diffs = [p[0] for p in points]
    worst = min(points, key=lambda p: p[0])
    where = f"`{worst[4]['calibrated_on']}` -> `{worst[4]['evaluated_on']}` at {pct(worst[3])}"
    return (f"{min(diffs):+.4f} to {max(diffs):+.4f} (mean {sum(diffs) / len(diffs):+.4f}) over {len(diffs)} "
            f"points, {sum(d > -0.001 for d in diffs)} of them better or less than 0.001 worse; the lowest, "
            f"{where}: {num(worst[1], 4)} against {num(worst[2], 4)}")


def _damping_points(res: dict) -> dict:
    """``{(model, calibrated, evaluated, ratio): {damping: value}}`` of bench_damping's rows."""
    points = {}
    for r in res["rows"]:
        for ratio, v in zip(r["ratios"], r["values"]):
            points.setdefault((r["model"], r["calibrated_on"], r["evaluated_on"], ratio), {})[r["damping"]] = v
    return points


def _best(by: dict, lower: bool) -> str:
    """The best value of one point as the tables print it (ties at that precision are all best)."""
    return num((min if lower else max)(by.values()), 4)


def damping_table(ctx, name: str = "quality_damping") -> str:
    """The default recipe's quality at each damping (the best of each row in bold)."""
    res = ctx["R"][name]
    lower = {r["model"]: r["lower_is_better"] for r in res["rows"]}
    dampings = sorted({r["damping"] for r in res["rows"]})
    rows = []
    for (model, calib, ev, ratio), by in _damping_points(res).items():
        best = _best(by, lower[model])
        cells = [num(by[d], 4) if d in by else "" for d in dampings]
        rows.append([model, f"`{calib}` -> `{ev}`", pct(ratio), *[f"**{c}**" if c == best else c for c in cells]])
    names = [f"{d:g}" + (" (default)" if d == res["default_damping"] else "") for d in dampings]
    return table(["model", "calibrated -> evaluated", "pruned", *names], rows)


def damping_standing(ctx, name: str = "quality_damping") -> str:
    """Per model, where the default damping stands against the best damping of each point,
    and how the largest and the smaller dampings compare with the default."""
    res = ctx["R"][name]
    lower = {r["model"]: r["lower_is_better"] for r in res["rows"]}
    default = res["default_damping"]
    gaps, larger, smaller = {}, [], {}
    for (model, calib, ev, ratio), by in _damping_points(res).items():
        best, own = (min if lower[model] else max)(by.values()), by[default]
        gap = 0.0 if num(own, 4) == _best(by, lower[model]) else (own / best - 1 if lower[model] else best - own)
        gaps.setdefault(model, []).append((gap, ev, ratio, own, best))
        worse = (lambda v: v > own) if lower[model] else (lambda v: v < own)
        larger.append(worse(by[max(by)]) and num(by[max(by)], 4) != num(own, 4))
        smaller.setdefault(model, []).extend(abs(v / own - 1) if lower[model] else abs(v - own)
                                             for d, v in by.items() if d < default)
    parts = []
    for model, g in gaps.items():
        worst = max(g)
        text = f"{model}: the default is the best of the dampings measured at {sum(p[0] == 0 for p in g)} of {len(g)} points"
        if worst[0] > 0:
            lost = f"{100 * worst[0]:.1f}% higher perplexity" if lower[model] else f"{worst[0]:.4f} lower fidelity"
            text += (f", elsewhere at most {lost} than the best (`{worst[1]}` at {pct(worst[2])}: "
                     f"{num(worst[3], 4)} against {num(worst[4], 4)})")
        parts.append(text)
    near = ", ".join((f"{100 * max(v):.1f}% of its perplexity" if lower[m] else f"{max(v):.4f} of its fidelity")
                     + f" on {m}" for m, v in smaller.items() if v)
    return ("; ".join(parts) + f". The largest damping measured ({max(r['damping'] for r in res['rows']):g}), which "
            f"holds the kept columns near their original values, is worse than the default at {sum(larger)} of "
            f"{len(larger)} points; the smaller ones stay within {near}")


TABLES = {f.__name__: f for f in (allocation_table, allocation_seconds, greedy_gain, damping_table, damping_standing)}
