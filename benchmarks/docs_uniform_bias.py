"""The table of docs/quality.md on a uniform layout refit without the output bias
(bench_uniform_bias.py, see make_docs.py and docs_tables.py)."""

from __future__ import annotations

from make_docs import num, pct, row, table

WITH, WITHOUT, ZEROED = "refit", "refit without the bias", "zeroed"


def uniform_bias_table(ctx, name: str = "uniform_bias") -> str:
    """Per evaluation text and ratio: the perplexity with each removal, and the refit without
    the bias against the refit with it."""
    res = ctx["R"][name]
    out = []
    for r in res["rows"]:
        if r["removal"] != WITH or not r["heads_pruned"]:
            continue
        text, ratio = r["evaluated_on"], r["ratio"]
        q = {k: row(res, "rows", evaluated_on=text, ratio=ratio, removal=k)["quality"] for k in (WITH, WITHOUT, ZEROED)}
        base = row(res, "rows", evaluated_on=text, removal="unpruned")["quality"]
        out.append([f"`{text}`", num(base, 4), pct(ratio), r["heads_pruned"], num(q[WITH], 4), num(q[WITHOUT], 4),
                    f"{q[WITHOUT] / q[WITH]:.3f}x", num(q[ZEROED], 4)])
    return table(["evaluated on", "unpruned", "ratio", "heads removed", "refit (kept columns and bias)",
                  "refit without the bias", "without / with", "heads zeroed"], out)


def uniform_bias_cost(ctx, ratio: float, name: str = "uniform_bias") -> str:
    """The largest cost of leaving the bias out at ``ratio`` over the texts (``1.006x``)."""
    res = ctx["R"][name]
    worst = max(row(res, "rows", evaluated_on=r["evaluated_on"], ratio=ratio, removal=WITHOUT)["quality"] / r["quality"]
                for r in res["rows"] if r["removal"] == WITH and r["ratio"] == ratio and r["heads_pruned"])
    return f"{worst:.3f}x"


TABLES = {f.__name__: f for f in (uniform_bias_table, uniform_bias_cost)}
