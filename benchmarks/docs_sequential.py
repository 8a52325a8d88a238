"""The table of docs/quality.md on layer-by-layer calibration (``--sequential``; bench_quality.py
with the sequential recipes, see make_docs.py and docs_tables.py)."""

from __future__ import annotations

from make_docs import change, num, pct, table

#: (one-shot recipe, the same recipe calibrated layer by layer)
PAIRS = (("default", "default, sequential"),
         ("reconstruction (OBS), per layer", "reconstruction (OBS), per layer, sequential"))


def sequential_table(ctx, name: str = "quality_sequential") -> str:
    """Per model, evaluation text and ratio: each pair's one-shot and sequential quality, and
    the sequential's against the one-shot (a ratio of perplexities, a difference of fidelities)."""
    rows = []
    for res in ctx["R"][name]["results"]:
        for i, ratio in enumerate(res["ratios"]):
            cells = []
            for one, seq in PAIRS:
                a, b = res["recipes"][one][i], res["recipes"][seq][i]
                cells += [num(a, 4), f"{num(b, 4)} ({change(b, a, res['lower_is_better'], 4)})"]
            rows.append([res["model"], f"`{res['evaluated_on']}`", num(res["baseline"], 4), pct(ratio), *cells])
    head = [h for one, _ in PAIRS for h in (f"`{one}`", "sequential")]
    return table(["model", "evaluated on", "unpruned", "heads", *head], rows)


def sequential_wins(ctx, pair: int = 0, name: str = "quality_sequential") -> tuple:
    """``(better, level, worse)``: the points where the sequential recipe of PAIRS[pair] is
    better than its one-shot recipe, level with it at the table's precision, and worse."""
    one, seq = PAIRS[pair]
    out = [0, 0, 0]
    for res in ctx["R"][name]["results"]:
        lower = res["lower_is_better"]
        for a, b in zip(res["recipes"][one], res["recipes"][seq]):
            level = num(a, 4) == num(b, 4)  # the values as the table prints them (its 1.00x hides 0.5%)
            out[1 if level else 0 if (b < a) == lower else 2] += 1
    return tuple(out)


ONE_PASS = ("default", "default, sequential", "default, sequential in one pass")


def one_pass_table(ctx, name: str = "quality_sequential_one_pass") -> str:
    """Per evaluation text and ratio: the default, calibrated layer by layer with its counts, and
    in one pass (each against the one-shot default, a ratio of perplexities)."""
    rows = []
    for res in ctx["R"][name]["results"]:
        for i, ratio in enumerate(res["ratios"]):
            a = res["recipes"][ONE_PASS[0]][i]
            cells = [num(a, 4)] + [f"{num(b, 4)} ({change(b, a, res['lower_is_better'], 4)})"
                                   for b in (res["recipes"][r][i] for r in ONE_PASS[1:])]
            rows.append([res["model"], f"`{res['evaluated_on']}`", num(res["baseline"], 4), pct(ratio), *cells])
    return table(["model", "evaluated on", "unpruned", "heads", "`default`", "sequential (counts of the default)",
                  "sequential in one pass"], rows)


def one_pass_standing(ctx, name: str = "quality_sequential_one_pass") -> tuple:
    """``(worse, points, largest)``: the points where one pass is worse than the sequential
    calibration with the default's counts, of all, and the largest ratio of perplexities."""
    worse, points, largest = 0, 0, 1.0
    for res in ctx["R"][name]["results"]:
        for a, b in zip(res["recipes"][ONE_PASS[1]], res["recipes"][ONE_PASS[2]]):
            points += 1
            worse += (b > a) == res["lower_is_better"] and num(a, 4) != num(b, 4)
            largest = max(largest, b / a if res["lower_is_better"] else a / b)
    return worse, points, largest


TABLES = {f.__name__: f for f in (sequential_table, sequential_wins, one_pass_table, one_pass_standing)}
