"""The tables of docs/ (see make_docs.py), each a function of the loaded results."""

from __future__ import annotations

from docs_allocation import TABLES as _ALLOCATION
from docs_pruned import TABLES as _PRUNED
from docs_random import TABLES as _RANDOM
from docs_random import beats_every_draw
from docs_recover import TABLES as _RECOVER
from docs_reference import TABLES as _REFERENCE
from docs_sequential import TABLES as _SEQUENTIAL
from docs_uniform_bias import TABLES as _UNIFORM_BIAS
from docs_values import TABLES as _VALUES
from make_docs import mean as _mean
from make_docs import change, num, pct, table, x
from make_docs import row as one_row


def probs_table(ctx, dtype: str = "float32") -> str:
    out = []
    for r in ctx["R"]["entropy_cpu"]["probs"]:
        if r["dtype"] != dtype:
            continue
        out.append([f"({r['B']}, {r['H']}, {r['S']})", f"{num(r['native_ms'])} ms", f"{num(r['pure_ms'])} ms",
                    x(r["speedup"], 1), f"~{num(r['native_extra_MB'], 2)} / {num(r['pure_extra_MB'])} MB",
                    pct(r["bw_vs_sum"])])
    return table([f"probs op, {dtype} (B, H, S)", "native", "formula as written", "speed-up",
                  "extra memory (native / formula)", "bandwidth vs `probs.sum(-1)`"], out)


def qk_table(ctx) -> str:
    qk = ctx["R"]["entropy_cpu"]["qk"]
    lengths = sorted({r["S"] for r in qk})
    get = {(r["dtype"], r["S"]): r for r in qk}
    lines = []
    for dtype in ("float32", "bfloat16"):
        lines.append([f"{dtype}: SDPA time / QK op time"] + [x(get[dtype, s]["native_vs_sdpa"]) for s in lengths])
    for dtype in ("float32", "bfloat16"):
        lines.append([f"{dtype}: fused attention + statistics time / SDPA time"]
                     + [x(get[dtype, s]["fused_vs_sdpa"]) for s in lengths])
    lines.append(["float32: materialising formula"] + [
        f"{num(get['float32', s]['pure_ms'])} ms, {num(get['float32', s]['pure_extra_MB'])} MB"
        if "pure_ms" in get["float32", s] else "not run" for s in lengths])
    r0 = qk[0]
    return table([f"causal, {r0['H']} query / {r0['Hkv']} KV heads, D = {r0['D']}"] + [f"S = {s:,}" for s in lengths],
                 lines)


def collection_table(ctx, name: str = "collect_cpu_fused") -> str:
    out = []
    for r in ctx["R"][name]["rows"]:
        eager = (f"{x(r['eager_cpu_x'], 1)} time, {x(r['eager_mem_x'], 1)} memory"
                 if r.get("eager_cpu_x") else f"skipped: the maps alone need {num(r['eager_maps_GB'])} GB")
        out.append([f"{r['model']}, {r['batch']} x {r['seq']:,}",
                    f"{num(r['plain_ms'] / 1e3)} s, {num(r['plain_MB'])} MB",
                    f"**{x(r['headprune_cpu_x'])}** plain ({x(r['headprune_vs_body_cpu_x'])} body); "
                    f"{x(r['headprune_mem_x'])} memory ({x(r['headprune_vs_body_mem_x'])} body)",
                    f"{x(r['unfused_cpu_x'])} plain ({x(r['unfused_vs_body_cpu_x'])} body)", eager])
    return table(["model, batch x tokens", "plain SDPA forward", "headprune collection (fused)",
                  "unfused collection", "eager + `output_attentions` + formula"], out)


def memory_probe_table(ctx) -> str:
    out = [[f"{r['seq']:,}", f"{num(r['collect_MB_default'])} / {num(r['body_MB_default'])} MB "
            f"({x(r['collect_vs_body_default'])})",
            f"{num(r['collect_MB_fixed'])} / {num(r['body_MB_fixed'])} MB ({x(r['collect_vs_body_fixed'])})"]
           for r in ctx["R"]["collect_memory_probe"]["rows"]]
    fixed = ctx["R"]["collect_memory_probe"]["mmap_threshold_fixed"]
    return table(["tokens", "collection / body peak RSS, malloc defaults",
                  f"the same, `MALLOC_MMAP_THRESHOLD_={fixed}`"], out)


TABLES = {f.__name__: f for f in (probs_table, qk_table, collection_table, memory_probe_table)}


#: the quality targets of the default recipe: (model, same text as the calibration?) -> {ratio: bound}
#: perplexity bounds are multiples of the unpruned model's, fidelity bounds are absolute
TARGETS = {("smollm2", True): {0.3: 1.10, 0.5: 1.35}, ("smollm2", False): {0.3: 1.20, 0.5: 1.50},
           ("minilm", True): {0.3: 0.98, 0.5: 0.95}, ("minilm", False): {0.3: 0.98, 0.5: 0.95}}


def targets_table(ctx, names: list, default: str = "default", previous: str = None) -> str:
    """One row per (result, ratio): the default's value, against the unpruned model, its target,
    the random mean under the same removal, and ``previous`` (the former default)."""
    rows = []
    for name in names:
        for res in ctx["R"][name]["results"]:
            lower = res["lower_is_better"]
            same = res.get("calibrated_on") == res.get("evaluated_on")
            bounds = TARGETS.get((res["model"], same), {})
            for i, r in enumerate(res["ratios"]):
                v = res["recipes"][default][i]
                rel = v / res["baseline"] if lower else v
                bound = bounds.get(r)
                met = "" if bound is None else ("met" if (rel <= bound if lower else rel >= bound) else "**not met**")
                draws = res["random"][i] if res["random"] else []
                rnd = _mean(draws, lower) if draws else None
                prev = res["recipes"][previous][i] if previous and previous in res["recipes"] else None
                beats = lambda o: o is not None and (v < o if lower else v > o)  # noqa: E731
                rows.append([res["model"], f"`{res['calibrated_on']}` -> `{res['evaluated_on']}`", pct(r), num(v, 4),
                             x(rel) if lower else num(v, 3),
                             ("" if bound is None else (f"<= {x(bound)}" if lower else f">= {num(bound, 3)}")) + (f" {met}" if met else ""),
                             "" if rnd is None else f"{num(rnd, 4)} ({_against_draws(v, draws, lower)})",
                             "" if prev is None else f"{num(prev, 4)} ({'beaten' if beats(prev) else '**not beaten**'})"])
    return table(["model", "calibrated -> evaluated", "pruned", "default", "x unpruned / fidelity", "target",
                  "random, same removal", "previous default"], rows)


def _against_draws(v: float, draws: list, lower: bool) -> str:
    """``beaten``: better than every random draw; better than their mean only: within the draws
    (one draw did as well); else not beaten."""
    if beats_every_draw(v, draws, lower):
        return "beaten"
    mean = _mean(draws, lower)
    return "within the draws' range" if (v < mean if lower else v > mean) else "**not beaten**"


def standing(ctx, names: list, recipes: list, default: str = "default") -> str:
    """Where each recipe stands: its metric relative to the default's and to the random mean,
    averaged (geometrically for perplexities) over every ratio and evaluation text."""
    rows = []
    for name in names:
        for rec in recipes:
            for res in ctx["R"][name]["results"]:
                if rec not in res["recipes"]:
                    continue
                lower = res["lower_is_better"]
                vs_def = [a / b if lower else a - b for a, b in zip(res["recipes"][rec], res["recipes"][default])]
                vs_rnd = [a / _mean(rr, lower) if lower else a - _mean(rr, lower)
                          for a, rr in zip(res["recipes"][rec], res["random"])]
                fmt = (lambda v: x(v)) if lower else (lambda v: f"{v:+.3f}")
                rows.append([res["model"], f"`{res['calibrated_on']}` -> `{res['evaluated_on']}`", rec,
                             ", ".join(fmt(v) for v in vs_def), ", ".join(fmt(v) for v in vs_rnd)])
    return table(["model", "calibrated -> evaluated", "recipe", "vs the default, per ratio",
                  "vs random (same removal), per ratio"], rows)


def recipe_value(ctx, name: str, evaluated_on: str, ratio: float, recipe: str = "default") -> float:
    """``recipe``'s quality at ``ratio`` in the sweep result of ``name`` evaluated on ``evaluated_on``."""
    res = one_row(ctx["R"][name], "results", evaluated_on=evaluated_on)
    return res["recipes"][recipe][res["ratios"].index(ratio)]


def calibration_table(ctx) -> str:
    rows = []
    for name, r in ctx["R"]["calibration_cpu"]["rows"].items():
        target = "" if "target_x" not in r else f"<= {x(r['target_x'])}: " + (
            "met" if r["ratio_max"] <= r["target_x"] else "met at the median, not in every round"
            if r["ratio_median"] <= r["target_x"] else "**not met**")
        rows.append([f"`{name}`", f"{num(r['median_s'])} s ({num(r['min_s'])}-{num(r['max_s'])})",
                     f"{x(r['ratio_median'])} ({x(r['ratio_min'])}-{x(r['ratio_max'])})", target])
    return table(["variant", "median (range)", "ratio, median (range)", "target"], rows)


def cli_rows_text(ctx) -> str:
    """What the whole-command rows of bench_calibration measure, where the run has them."""
    res = ctx["R"]["calibration_cpu"]
    if "prune_cli" not in res["rows"]:
        return ""
    return (f" `prune_cli` is the whole command `headprune prune smollm2 --ratio 0.3` with its defaults"
            f" (load, calibrate on 64 x 256 tokens, choose, remove, evaluate both models, time both, save,"
            f" report; a fresh process each run, {res['cli_rounds']} rounds) against `prune_cli_before`, the same"
            f" command with the recipe before second moments (`{' '.join(res['cli_before_flags'])}`). The step alone"
            f" costs more than the command: the greedy removal of the reconstruction score works on every layer's"
            f" moments (float64, one column per head dimension) whatever the calibration's length, a fixed cost that"
            f" weighs on {res['tokens']:,} tokens and {_in_command(res['rows']['prune_cli'])}.")


def _in_command(r: dict) -> str:
    """How the step's cost shows in the whole command: inside its rounds' range, or not."""
    if r["ratio_min"] <= 1.0 <= r["ratio_max"]:
        return "disappears in the spread of the whole command"
    return (f"is small but measurable in the whole command ({x(r['ratio_median'])}, "
            f"{x(r['ratio_min'])}-{x(r['ratio_max'])} over its rounds)")


def layout_value(ctx, layout: str, ratio: float, text: str, field: str = "quality", model: int = 0,
                 name: str = "layouts"):
    """One value of a bench_layouts row (``model``: the index of the model's results)."""
    return one_row(ctx["R"][name]["results"][model], "rows", layout=layout, ratio=ratio, evaluated_on=text)[field]


def layouts_table(ctx, names: tuple = ("layouts", "layouts_minilm")) -> str:
    """Per model and evaluation text, one row per (ratio, layout): heads removed, KV heads and
    KV bytes per token left, the quality and how it compares with the free query layout's (a
    ratio of perplexities, a difference of fidelities); a model's run in a later file replaces it."""
    out = []
    for res in {res["model"]: res for n in names if n in ctx["R"] for res in ctx["R"][n]["results"]}.values():
        free = {(r["evaluated_on"], r["ratio"]): r["quality"] for r in res["rows"] if r["layout"] == "query"}
        base = {r["evaluated_on"]: r for r in res["rows"] if r["layout"] == "unpruned"}
        for r in res["rows"]:
            if r["layout"] == "unpruned":
                continue
            b = base[r["evaluated_on"]]
            plain = "" if "plain_loadable" not in r else (
                "no (config cannot describe it)" if not r["plain_loadable"] else
                "yes, identical" if r["plain_equal"] else "yes, **differs**")
            q0 = free[(r["evaluated_on"], r["ratio"])]
            rel = change(r["quality"], q0, res["metric"] == "perplexity")
            out.append([res["model"], r["evaluated_on"], pct(r["ratio"]), f"`{r['layout']}`",
                        f"{r['heads_pruned']} ({pct(r['heads_pruned'] / res['heads_total'])})",
                        f"{r['kv_heads']} ({'+' if r['kv_heads'] > b['kv_heads'] else ''}"
                        f"{pct(r['kv_heads'] / b['kv_heads'] - 1)})",
                        num(r["quality"], 4), rel, plain])
    return table(["model", "evaluated on", "ratio", "layout", "heads removed", "KV heads (vs unpruned)",
                  "perplexity / fidelity", "vs query", "plain from_pretrained"], out)


def kv_table(ctx, name: str = "kv_shares") -> str:
    """One row per (ratio, KV share): the KV heads left and, per evaluation text, the
    perplexity and its ratio to the same ratio's even layout without a KV share."""
    res = ctx["R"][name]
    texts = list(dict.fromkeys(r["evaluated_on"] for r in res["rows"]))
    q = {(r["evaluated_on"], r["ratio"], r["kv_share"]): r for r in res["rows"]}
    out = []
    for (text, ratio, share), r in q.items():
        if text != texts[0] or ratio == 0:
            continue
        cells = [f"{num(q[t, ratio, share]['quality'], 4)} ({kv_change(ctx, ratio, share, t, name)})" for t in texts]
        out.append([pct(ratio), "none (default)" if share == 0 else f"`--kv-ratio {share:g}`",
                    f"{r['kv_heads']} ({pct(r['kv_heads'] / res['kv_heads_total'] - 1)})", *cells])
    base = [num(q[t, 0.0, 0.0]["quality"], 4) for t in texts]
    out.insert(0, ["0%", "", str(res["kv_heads_total"]), *base])
    return table(["heads", "KV share", "KV heads", *[f"`{t}`" for t in texts]], out)


def kv_value(ctx, ratio: float, share: float, text: str, key: str = "quality", name: str = "kv_shares"):
    """A field of one row of bench_kv's results."""
    return one_row(ctx["R"][name], "rows", ratio=ratio, kv_share=share, evaluated_on=text)[key]


def kv_change(ctx, ratio: float, share: float, text: str, name: str = "kv_shares") -> str:
    """The perplexity at a KV share against the same ratio's without one (``1.15x``)."""
    return change(kv_value(ctx, ratio, share, text, name=name), kv_value(ctx, ratio, 0.0, text, name=name), True)


def gguf_table(ctx, name: str = "gguf") -> str:
    """Perplexity of the unpruned and the pruned model, in float32 and as GGUF, per engine."""
    res = ctx["R"][name]["results"][0]
    texts = list(next(iter(res["rows"].values())))
    return table(["model", *[f"perplexity, {t}" for t in texts]],
                 [[m, *[num(v[t], 4) for t in texts]] for m, v in res["rows"].items()])


def gguf_generation(ctx, name: str = "gguf") -> str:
    """What llama.cpp generated from the pruned GGUF, or that it was not run."""
    gen = ctx["R"][name]["results"][0].get("generated")
    if not gen:
        return "llama.cpp was not run for these results (no `llama_cpp` given to the benchmark)."
    return "Greedy continuations of \"The most persuasive argument is\" by llama.cpp:\n\n" + "\n".join(
        f"- {model}: {text!r}" for model, text in gen.items())


def learned_table(ctx, names=("quality_learned_smollm2", "quality_learned_minilm")) -> str:
    """Learned hard-concrete gates against the default under the same removal and layouts:
    per model, evaluation text and ratio, both values, the difference, and what training cost."""
    out = []
    for name in names:
        for res in ctx["R"][name]["results"]:
            (learned,) = [k for k in res["recipes"] if k.startswith("learned")]
            runs = res["learned"][learned]
            lower = res["lower_is_better"]
            for i, r in enumerate(res["ratios"]):
                d, g = res["recipes"]["default"][i], res["recipes"][learned][i]
                better = (g < d) if lower else (g > d)
                run = runs[i]
                rnd = _mean(res["random"][i], lower) if res["random"][i] else None
                out.append([f"{res['model']}, {res['evaluated_on']}", pct(r), num(res["baseline"], 4), num(d, 4),
                            num(g, 4), f"{(g - d) / d:+.1%}" + (" (better)" if better else ""),
                            num(rnd, 4) + (f" ({len(res['random'][i])} draw{'s' * (len(res['random'][i]) > 1)})"
                                           if rnd is not None else ""),
                            f"{run['steps']} steps, {num(run['seconds'] / 60, 2)} min"])
    return table(["model, evaluated on", "ratio", "unpruned", "default", "learned gates",
                  "learned vs default (relative)", "random heads", "training"], out)


def learned_standing(ctx, names=("quality_learned_smollm2", "quality_learned_minilm")) -> str:
    """One sentence per model: where learned gates stand against the default, and what they cost."""
    out = []
    for name in names:
        results = ctx["R"][name]["results"]
        (learned,) = [k for k in results[0]["recipes"] if k.startswith("learned")]
        lower = results[0]["lower_is_better"]
        rel = [((g - d) / d) * (1 if lower else -1) for res in results
               for d, g in zip(res["recipes"]["default"], res["recipes"][learned])]
        minutes = sum(r["seconds"] for r in results[0]["learned"][learned]) / 60
        worse, better = [v for v in rel if v > 0], [-v for v in rel if v < 0]
        what = f"of the default's {'perplexity' if lower else 'fidelity'}"
        verdict = ("better than or equal to the default at every point" if not worse else
                   f"worse than the default at {len(worse)} of {len(rel)} points, by up to {pct(max(worse), 1)} {what}"
                   + (f", better at {len(better)}, by up to {pct(max(better), 1)}" if better else ""))
        pairs = [(g, draws) for res in results if res["random"]
                 for g, draws in zip(res["recipes"][learned], res["random"])]
        losing = [1 for g, draws in pairs if (g > _mean(draws, lower) if lower else g < _mean(draws, lower))]
        if losing:  # a method that loses to random heads is said to
            draws = len(pairs[0][1])
            verdict += (f", and worse than random heads ({'one draw' if draws == 1 else f'the mean of {draws} draws'} "
                        f"per point, the same removal) at {len(losing)} of {len(pairs)} points")
        alloc = results[0].get("measured_allocation", {}).get("default", {}).get("seconds")
        out.append(f"{results[0]['model']}: learned gates are {verdict}; training took "
                   f"{num(minutes, 2)} min for the {len(results[0]['ratios'])} ratios, against seconds for the "
                   "default's one-shot scores" + ("." if alloc is None else
                                                  f" and {num(alloc / 60, 2)} min for its measured allocation."))
    return "\n\n".join(out)


def gguf_speed_table(ctx, name: str = "gguf_group", targets: bool = True) -> str:
    """llama.cpp decode speed, prefill speed and KV state of the pruned GGUF against the
    unpruned one, with the targets of whole-group pruning (or without: ``targets=False``)."""
    res = ctx["R"][name]["results"][0]
    s = res["llama_cpp_speed_summary"]
    agree = res["llama_cpp_vs_headprune"]
    worst = max(abs(v) for v in agree.values())
    rows_ = [
        [f"decode tokens/s after {s['context']:,} tokens (median of {s['rounds']} rounds of {s['steps']})",
         num(s["decode_tokens_per_s_unpruned"]), num(s["decode_tokens_per_s_pruned"]), s["verdict"],
         f">= 1.20x: {'met' if s['decode_speedup_low'] >= 1.2 else ('met at the median' if s['decode_speedup'] >= 1.2 else '**not met**')}"],
        [f"prefill of the {s['context']:,}-token prompt", "", "", x(s["prefill_speedup"]), ""],
        ["KV state after the prompt (llama_state_seq_get_size)", "", "", x(s["kv_state_ratio"]),
         f"<= 0.67x: {'met' if s['kv_state_ratio'] <= 0.67 + 1e-9 else '**not met**'}"],
        ["perplexity in llama.cpp against headprune's evaluation of the same GGUF",
         "", "", ", ".join(f"{t} {v:+.2%}" for t, v in agree.items()),
         f"within 2%: {'met' if worst <= 0.02 else '**not met**'}"],
    ]
    head = ["llama.cpp (llama-cpp-python), pruned vs unpruned GGUF", "unpruned", "pruned", "pruned / unpruned"]
    return table(head + ["target"] * targets, [r if targets else r[:-1] for r in rows_])



def generated_table(ctx, name: str = "generated_calibration") -> str:
    """Per ratio, the default calibrated on the text alone and joined by sampled sequences (one
    row per seed): perplexity on each held-out text and its ratio to the unpruned model's."""
    res = ctx["R"][name]
    texts = list(res["unpruned"])
    out = [["unpruned", "", *(num(res["unpruned"][t], 4) for t in texts)]]
    for ratio in sorted({r["ratio"] for r in res["rows"]}):
        for r in (r for r in res["rows"] if r["ratio"] == ratio):
            label = (f"`{res['data']}` alone" if r["seed"] is None else
                     f"`{res['data']}` + {res['generated']} sampled (seed {r['seed']})")
            out.append([label, pct(ratio), *(f"{num(r[t], 4)} ({x(r[t + '_x_unpruned'])})" for t in texts)])
    return table(["calibration", "pruned", *(f"`{t}`" for t in texts)], out)


def generated_value(ctx, ratio: float, text: str, sampled: bool, name: str = "generated_calibration") -> float:
    """Perplexity on ``text`` at ``ratio``: calibrated on the text alone, or with sampled
    sequences (the geometric mean over the seeds)."""
    import math

    vals = [r[text] for r in ctx["R"][name]["rows"] if r["ratio"] == ratio and (r["seed"] is not None) == sampled]
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def generated_seconds(ctx, name: str = "generated_calibration") -> str:
    """The sampling time of each seed's sequences, as a range."""
    s = sorted({r["sample_seconds"] for r in ctx["R"][name]["rows"] if r["seed"] is not None})
    return f"{num(s[0], 3)} s" if len(s) == 1 else f"{num(s[0], 3)}-{num(s[-1], 3)} s"


TABLES.update({f.__name__: f for f in (
    targets_table, standing, recipe_value, calibration_table,
    cli_rows_text, layout_value, layouts_table, kv_table, kv_value, kv_change, gguf_table, gguf_generation, gguf_speed_table, learned_table,
    learned_standing, generated_table, generated_seconds, generated_value)})
TABLES.update(_ALLOCATION)
TABLES.update(_PRUNED)
TABLES.update(_RANDOM)
TABLES.update(_RECOVER)
TABLES.update(_REFERENCE)
TABLES.update(_SEQUENTIAL)
TABLES.update(_VALUES)
TABLES.update(_UNIFORM_BIAS)
