"""The tables of docs/ (see make_docs.py), each a function of the loaded results."""

from __future__ import annotations

from make_docs import num, pct, table, x


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
                    f"**{x(r['headprune_mem_x'])}** memory",
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


def prefill_table(ctx) -> str:
    names = {"base": "unpruned", "masked50": "masked 50%", "q50": "physically pruned 50%, `--gqa query`",
             "g50": "physically pruned 50%, `--gqa group`"}
    out = [[names.get(r["variant"], r["variant"]), f"{r['q_heads']} / {r['kv_heads']}", f"{num(r['params_M'])} M",
            x(r["speedup_cpu"]), x(r["flop_speedup"]), f"{num(r['spread_pct'], 2)}%"]
           for r in ctx["R"]["pruned_cpu"]["prefill"]]
    cfg = ctx["R"]["pruned_cpu"]["prefill"][0]
    return table([f"prefill, batch {cfg['batch']} x {cfg['seq']}", "query / KV heads", "parameters",
                  "measured speed-up (CPU time)", "FLOP-model speed-up", "spread"], out)


def decode_table(ctx) -> str:
    names = {"base": "unpruned", "q50": "50%, `--gqa query`", "g50": "50%, `--gqa group`"}
    out = [[f"{r['batch']} x {r['prompt']} + {r['new']}", names.get(r["variant"], r["variant"]), r["kv_heads"],
            x(r["speedup"]), f"{num(r['kv_MB_at_8192_b1'])} MB"] for r in ctx["R"]["pruned_cpu"]["decode"]]
    return table(["decode, batch x prompt + new tokens", "model", "KV heads", "tokens/s vs unpruned",
                  "KV cache at 8,192 tokens, batch 1"], out)


TABLES = {f.__name__: f for f in (probs_table, qk_table, collection_table, memory_probe_table, prefill_table,
                                  decode_table)}


def _mean(values: list, lower: bool) -> float:
    import math

    if lower:
        return math.exp(sum(math.log(v) for v in values) / len(values))
    return sum(values) / len(values)


def sweep_table(ctx, result: dict, recipes=None, digits: int = 4) -> str:
    """One row per ratio: each recipe's metric (bold when better than the random mean), the
    random mean (geometric for perplexities) and range."""
    lower = result["lower_is_better"]
    names = list(result["recipes"]) if recipes is None else recipes
    seeds = len(result["random"][0]) if result["random"] else 0
    out = []
    for i, r in enumerate(result["ratios"]):
        rnd = result["random"][i] if result["random"] else []
        mean = _mean(rnd, lower) if rnd else None
        cells = []
        for n in names:
            v = result["recipes"][n][i]
            better = mean is not None and (v < mean if lower else v > mean)
            cells.append(f"**{num(v, digits)}**" if better else num(v, digits))
        rand = [f"{num(mean, digits)} ({num(min(rnd), digits)}-{num(max(rnd), digits)})"] if rnd else []
        out.append([pct(r)] + cells + rand)
    head = ["pruned"] + names + ([f"random, mean of {seeds} (range)"] if seeds else [])
    return table(head, out)


def sweep_caption(ctx, result: dict) -> str:
    better = "lower" if result["lower_is_better"] else "higher"
    return (f"**{result['model']}**, {result['metric']} on held-out `{result['data']}` ({better} is better; "
            f"unpruned {num(result['baseline'], 4)})")


TABLES.update({f.__name__: f for f in (sweep_table, sweep_caption)})
