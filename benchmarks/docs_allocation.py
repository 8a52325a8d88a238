"""The tables of docs/quality.md on measured allocation (see make_docs.py and docs_tables.py)."""

from __future__ import annotations

from make_docs import mean as _mean
from make_docs import num, pct, table, x

EVEN, MEASURED = "default, spread evenly over the layers", "default, measured allocation"


def _allocations(res: dict) -> tuple:
    """The even spread's and the measured allocation's values of one sweep result (one of
    them may be the default itself), or ``None`` where the result lacks either."""
    measured_default = "default" in res.get("measured_allocation", {})
    even = res["recipes"].get(EVEN, None if measured_default else res["recipes"].get("default"))
    measured = res["recipes"].get(MEASURED, res["recipes"]["default"] if measured_default else None)
    return (even, measured) if even and measured else None


def allocation_table(ctx, names: list) -> str:
    """Per model, text and ratio: the default ranking with the budget spread evenly and by
    measured allocation, against the random mean."""
    rows = []
    for name in names:
        for res in ctx["R"][name]["results"]:
            pair = _allocations(res)
            if pair is None:
                continue
            lower = res["lower_is_better"]
            for i, r in enumerate(res["ratios"]):
                even, measured = pair[0][i], pair[1][i]
                change = f"{x(measured / even)}" if lower else f"{measured - even:+.4f}"
                rows.append([res["model"], f"`{res['calibrated_on']}` -> `{res['evaluated_on']}`", pct(r),
                             num(even, 4), num(measured, 4), change,
                             num(_mean(res["random"][i], lower), 4) if res["random"] else ""])
    return table(["model", "calibrated -> evaluated", "pruned", "spread evenly", "measured allocation",
                  "measured vs even", "random, same removal"], rows)


def allocation_seconds(ctx, name: str) -> str:
    """The seconds the measurement took, over the evaluation texts of one results file."""
    secs = [m["seconds"] for res in ctx["R"][name]["results"] for m in res.get("measured_allocation", {}).values()]
    return f"{num(min(secs))}-{num(max(secs))} s" if len(secs) > 1 else f"{num(secs[0])} s"


TABLES = {f.__name__: f for f in (allocation_table, allocation_seconds)}
