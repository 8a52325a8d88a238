"""docs/quality.md's recovery tables and sentences, from benchmarks/results/recover*.json."""

from __future__ import annotations

from make_docs import num, pct, table
from make_docs import row as one_row


def recover_table(ctx, name: str) -> str:
    """Unpruned, pruned and recovered quality on held-out and calibration text."""
    out = []
    for res in ctx["R"][name]["results"]:
        for row in res["rows"]:
            extra = f"{row['steps']} steps, {num(row['seconds'] / 60, 3)} min" if "steps" in row else ""
            if row.get("best_step") is not None:
                extra += f", kept step {row['best_step']}"
            out.append([f"{res['model']}, {pct(res['ratio'])} pruned", row["model"], num(row["held_out"], 4),
                        pct(row["held_out_gap_closed"]), num(row["calibration"], 4),
                        pct(row["calibration_gap_closed"]), extra])
    metric = ctx["R"][name]["results"][0]["metric"]
    return table(["model", "", f"held-out {metric}", "gap closed", f"calibration {metric}", "gap closed", "budget"],
                 out)


def trace_table(ctx, name: str) -> str:
    """Held-out quality of the weights being trained, every few steps, one column per run."""
    res = ctx["R"][name]["results"][0]
    runs = [r for r in res["rows"] if "trace" in r]
    pruned = one_row(res, "rows", model="pruned")["held_out"]
    steps = sorted({t["step"] for r in runs for t in r["trace"]})
    out = [["0 (pruned)"] + [num(pruned, 4)] * len(runs)]
    for st in steps:
        out.append([str(st)] + [next((num(t["held_out"], 4) for t in r["trace"] if t["step"] == st), "")
                                for r in runs])
    out.append(["kept (validation)"] + [f"{num(r['held_out'], 4)} (step {r['best_step']})" for r in runs])
    return table(["step"] + [f"lr {r['lr']:g}" for r in runs], out)


def recover_gain(ctx, name: str, model: str, goal: float) -> str:
    """One sentence: what recovery (the row ``model``) added to the pruned encoder's fidelity on
    held-out and calibration text, against ``goal`` on held-out text."""
    res = ctx["R"][name]["results"][0]
    pruned = one_row(res, "rows", model="pruned")
    rec = one_row(res, "rows", model=model)
    gain = rec["held_out"] - pruned["held_out"]
    return (f"Recovery adds {gain:+.4f} fidelity on held-out text ({pct(rec['held_out_gap_closed'])} of the gap) "
            f"and {rec['calibration'] - pruned['calibration']:+.4f} on the calibration text in {rec['steps']} steps, "
            f"{'meeting' if gain >= goal else 'short of'} the goal of {goal:+.2f} on held-out text.")


def recover_budget(ctx, name: str, model: str = "recovered attention lr=default", goal: float = 0.5) -> str:
    """One sentence: a causal LM's recovery (the row ``model``) within its time budget, the
    fraction of the held-out and the calibration text's gap it closed, against ``goal``."""
    res = ctx["R"][name]["results"][0]
    rec = one_row(res, "rows", model=model)
    closed = rec["held_out_gap_closed"]
    return (f"With a budget of {res['minutes']:g} minutes (the run took {num(rec['seconds'] / 60, 3)} minutes of wall "
            "time, the closing validation included: a step starts only if it is expected to end within the budget) "
            f"recovery closes {pct(closed)} of the held-out gap, {'meeting' if closed >= goal else 'short of'} the goal "
            f"of half, and {pct(rec['calibration_gap_closed'])} of the calibration text's: the held-out figure is the "
            "one to trust.")


def trace_band(ctx, name: str) -> str:
    """One sentence: the range the traced held-out quality spans after its first point and over
    the run's second half, as values and as fractions of the pruning's gap, and the step the
    validation batches kept."""
    res = ctx["R"][name]["results"][0]
    unpruned, pruned = (one_row(res, "rows", model=m)["held_out"] for m in ("unpruned", "pruned"))
    run = next(r for r in res["rows"] if "trace" in r)
    trace = run["trace"]
    half = [t for t in trace if t["step"] > trace[-1]["step"] / 2]

    def span(points: list) -> str:
        values = [t["held_out"] for t in points]
        closed = sorted((pruned - v) / (pruned - unpruned) for v in (min(values), max(values)))
        return f"between {num(min(values), 4)} and {num(max(values), 4)} ({pct(closed[0])} to {pct(closed[1])} of the gap)"

    return (f"From step {trace[1]['step']} on the traced held-out quality lies {span(trace[1:])}, over the second "
            f"half of the run {span(half)}; the validation batches kept step {run['best_step']}.")


def other_text(ctx, name: str) -> str:
    """One sentence: a run's quality on the text of another kind it never trained on, next to
    its held-out text's, unpruned, pruned and recovered (the default row)."""
    res = ctx["R"][name]["results"][0]
    unpruned, pruned, rec = (one_row(res, "rows", model=m) for m in
                             ("unpruned", "pruned", "recovered attention lr=default"))
    digits = 4 if res["metric"] == "fidelity" else 3

    def on(key: str) -> str:
        return (f"{num(unpruned[key], digits)} unpruned, {num(pruned[key], digits)} pruned, "
                f"{num(rec[key], digits)} recovered ({pct(rec[f'{key}_gap_closed'])} of the gap)")

    return (f"On `{res['other_text']}`, a kind of text recovery never trained on, a separate run of the "
            f"{res['model']} default{before_reference(ctx, name)} ({rec['steps']} steps, {num(rec['seconds'] / 60, 3)} min) measured {res['metric']} "
            f"{on('other')}; on its held-out text {on('held_out')}.")


def before_reference(ctx, name: str) -> str:
    """``" (...)"`` where the run of ``name`` selected heads on a calibration without the
    reference share (a run from before it), else nothing."""
    return "" if "reference" in ctx["R"][name]["results"][0]["calibration"] else (
        " (an earlier run, whose selection calibrated on the text alone, without the reference share)")


TABLES = {f.__name__: f for f in (recover_table, trace_table, recover_gain, recover_budget, trace_band, other_text,
                                  before_reference)}
