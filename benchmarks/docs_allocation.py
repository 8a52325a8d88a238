"""The tables of docs/quality.md on measured allocation (see make_docs.py and docs_tables.py)."""

from __future__ import annotations

from make_docs import mean as _mean
from make_docs import num, pct, table, x

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
                change = f"{x(measured / even)}" if lower else f"{measured - even:+.4f}"
                rows.append([res["model"], f"`{res['calibrated_on']}` -> `{res['evaluated_on']}`", pct(r),
                             num(even, 4), num(ranked[i], 4) if ranked else "", num(measured, 4), change,
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
            f"points, {sum(d > -0.001 for d in diffs)} of them within 0.001 or closer; the lowest, "
            f"{where}: {num(worst[1], 4)} against {num(worst[2], 4)}")


TABLES = {f.__name__: f for f in (allocation_table, allocation_seconds, greedy_gain)}
