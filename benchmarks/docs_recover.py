"""docs/quality.md's recovery tables and sentences, from benchmarks/results/recover*.json."""

from __future__ import annotations

from make_docs import num, pct, table
from make_docs import row as one_row


def recover_table(ctx, name: str) -> str:
    """Unpruned, pruned and recovered quality on held-out and calibration text."""
    out = []
    for res in ctx["R"][name]["results"]:
        for row in res["rows"]:
            extra = f"{row['steps']} steps, {num(row['seconds'] / 60, 2)} min" if "steps" in row else ""
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


def trace_band(ctx, name: str) -> str:
    """One sentence: the band the traced held-out quality stays in after its first point,
    as values and as fractions of the pruning's gap, and the step the validation kept."""
    res = ctx["R"][name]["results"][0]
    unpruned, pruned = (one_row(res, "rows", model=m)["held_out"] for m in ("unpruned", "pruned"))
    run = next(r for r in res["rows"] if "trace" in r)
    later = [t["held_out"] for t in run["trace"][1:]]
    closed = sorted((pruned - v) / (pruned - unpruned) for v in (min(later), max(later)))
    return (f"From step {run['trace'][1]['step']} on it stays between {num(min(later), 4)} and "
            f"{num(max(later), 4)} without a trend ({pct(closed[0])} to {pct(closed[1])} of the gap), so the step "
            f"the validation batches keep (step {run['best_step']} here) is one draw from that band.")


TABLES = {f.__name__: f for f in (recover_table, trace_table, recover_gain, trace_band)}
