"""The tables of docs/performance.md on pruned models' speed (bench_pruned.py; see make_docs.py
and docs_tables.py)."""

from __future__ import annotations

from make_docs import num, table, x


PRUNED_NAMES = {"base": "unpruned", "masked30": "masked 30% (control: every shape kept)",
                "even30": "30%, default (even layouts)", "even50": "50%, default (even layouts)",
                "group33": "33%, whole KV groups, uniform", "query30": "30%, `--gqa query`"}


def _spread(r: dict, control: dict | None, clock: str = "") -> str:
    """A row's speed-up as ``headprune.hf.speed.verdict`` judges it: against 1.0 and the spread of
    the masked control at the same shape, which times the unpruned computation (results written
    before the benchmark judged rows against it get the control's spread here)."""
    from headprune.hf.speed import verdict

    if r["model"] == "base":
        return "reference"
    lo, hi = r[f"speedup{clock}_low"], r[f"speedup{clock}_high"]
    if r["model"] == "masked30":
        return f"control: {x(r[f'speedup{clock}'])} ({lo:.2f}-{hi:.2f}x)"
    row = dict(r)
    if control is not None and f"control{clock}_low" not in row:
        row[f"control{clock}_low"], row[f"control{clock}_high"] = (control[f"speedup{clock}_low"],
                                                                   control[f"speedup{clock}_high"])
    text = verdict(row, clock, control=None)  # the control's own row is beside it
    head, _, tail = text.partition(" (")
    return text if head.startswith("no ") else f"**{head}** ({tail}"


def _as_spread_now(r: dict) -> dict:
    """A row of a file written before fewer than 5 rounds were spread by their least and greatest
    (``headprune.hf.speed.quartiles``): its 3 rounds' spread was the midpoints of neighbouring
    rounds (inclusive quartiles), from which the least and greatest come back exactly (to the
    file's rounding: 2 low - median, 2 high - median)."""
    if r.get("rounds") != 3 or "speedup_low" not in r:
        return r
    r = dict(r)
    for clock in ("", "_cpu"):
        s = r[f"speedup{clock}"]
        r[f"speedup{clock}_low"] = round(2 * r[f"speedup{clock}_low"] - s, 3)
        r[f"speedup{clock}_high"] = round(2 * r[f"speedup{clock}_high"] - s, 3)
        r.pop(f"control{clock}_low", None)  # the control's, likewise: from its own row
        r.pop(f"control{clock}_high", None)
    return r


def _pruned_rows(ctx, kind: str) -> list:
    """``(row, the masked control's row at its shape, or None)`` of the pruned-model benchmark."""
    results = ctx["R"]["pruned_cpu"]
    rows = [r for r in results["rows"] if r["kind"] == kind]
    if "spread" not in results:  # written before the spread was recorded: by midpoints
        rows = [_as_spread_now(r) for r in rows]
    control = {r["shape"]: r for r in rows if r["model"] == "masked30"}
    return [(r, control.get(r["shape"])) for r in rows]


def prefill_table(ctx) -> str:
    out = [[r["shape"], PRUNED_NAMES.get(r["model"], r["model"]), f"{r['q_heads']} / {r['kv_heads']}",
            f"{num(r['wall_s'])} s", _spread(r, c), _spread(r, c, "_cpu"), x(r["flop_speedup"])]
           for r, c in _pruned_rows(ctx, "prefill")]
    return table(["prefill, batch x tokens", "model", "query / KV heads", "median wall time",
                  "speed-up, wall (spread)", "speed-up, CPU time (spread)", "FLOP-model speed-up"], out)


def decode_table(ctx) -> str:
    out = [[r["shape"], PRUNED_NAMES.get(r["model"], r["model"]), r["kv_heads"], f"{num(r['kv_cache_MB'])} MB",
            num(r["tokens_per_s"]), _spread(r, c), _spread(r, c, "_cpu")]
           for r, c in _pruned_rows(ctx, "decode")]
    return table(["decode, batch x context", "model", "KV heads", "KV cache (float32)", "tokens/s",
                  "speed-up, wall (spread)", "speed-up, CPU time (spread)"], out)


TABLES = {f.__name__: f for f in (prefill_table, decode_table)}
