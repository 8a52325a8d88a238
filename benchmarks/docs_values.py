"""The tables of docs/quality.md on the joint value/output refit (bench_values.py; see
make_docs.py and docs_tables.py)."""

from __future__ import annotations

from make_docs import num, pct, table


def _pairs(res: dict) -> dict:
    """``{(model, calibrated, evaluated): {False: row, True: row}}`` (output refit, value refit)."""
    out = {}
    for r in res["rows"]:
        out.setdefault((r["model"], r["calibrated_on"], r["evaluated_on"]), {})[bool(r["refit_values"])] = r
    return out


def _gain(pair: dict, i: int) -> float:
    """The value refit's gain at ratio ``i`` (fidelity up, or perplexity down as a ratio)."""
    a, b = pair[False], pair[True]
    return b["values"][i] / a["values"][i] if a["lower_is_better"] else b["values"][i] - a["values"][i]


def values_table(ctx, name: str = "quality_values") -> str:
    """Per model, calibration and evaluation text: both refits at every ratio."""
    res = ctx["R"][name]
    ratios = res["rows"][0]["ratios"]
    rows = []
    for (model, calib, text), p in _pairs(res).items():
        cells = []
        for i in range(len(ratios)):
            cells += [num(p[False]["values"][i], 4), num(p[True]["values"][i], 4) + f" ({_gain(p, i):+.4f})"]
        rows.append([model, f"`{calib}` -> `{text}`", *cells])
    head = [h for r in ratios for h in (f"{pct(r)}: output refit", f"{pct(r)}: with value rows (default)")]
    return table(["model", "calibrated -> evaluated", *head], rows)


def values_summary(ctx, name: str = "quality_values") -> str:
    """How many points the value refit wins, and the range of its gains."""
    res = ctx["R"][name]
    parts = []
    for lower in (False, True):  # fidelity gains are differences, perplexity gains ratios (below 1: better)
        gains = [_gain(p, i) for p in _pairs(res).values() if p[False]["lower_is_better"] == lower
                 for i in range(len(res["rows"][0]["ratios"]))]
        if not gains:
            continue
        better = sum(g < 1 if lower else g > 0 for g in gains)
        span = (f"{min(gains):.3f}x to {max(gains):.3f}x the perplexity" if lower else
                f"{min(gains):+.4f} to {max(gains):+.4f} fidelity (mean {sum(gains) / len(gains):+.4f})")
        parts.append(f"better at {better} of {len(gains)} points, by {span}")
    return "; ".join(parts)


def values_value(ctx, model: str, calib: str, text: str, ratio: float, refit_values: bool = True,
                 name: str = "quality_values") -> float:
    """One point of bench_values."""
    row = _pairs(ctx["R"][name])[(model, calib, text)][refit_values]
    return row["values"][row["ratios"].index(ratio)]


def values_timing(ctx, name: str = "quality_values") -> str:
    """What collecting the value moments cost, per calibration."""
    return "; ".join(f"calibrated on `{t['calibrated_on']}`, at {pct(t['ratio'])} of the heads: "
                     f"{t['seconds']:.1f} s and {t['bytes'] / 2**20:,.0f} MiB of moments, against "
                     f"{t['collect_seconds']:.1f} s for the collection with second moments"
                     for t in ctx["R"][name]["timings"])


TABLES = {f.__name__: f for f in (values_table, values_summary, values_value, values_timing)}
