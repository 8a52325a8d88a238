"""Model-level benchmark: what head pruning buys at inference, measured where it pays. Prefill
at 512 and 4,096 tokens, decode at a 2,048- and 8,192-token context, batch 1 and 16, the
unpruned and the pruned models timed interleaved in one process (wall and CPU time, with the
spread), and the KV cache each one holds.

    python benchmarks/bench_pruned.py [--quick] [--rounds N] [--steps N]
        [--prefill 1x512 16x512 1x4096] [--decode 1x2048 16x2048 1x8192 16x8192]
        [--variants base even30 even50 group33 query30] [--threads N]

Model: a Llama model with SmolLM2-135M's config (30 layers, 9 query / 3 KV heads of 64,
hidden 576; see bench_collect.py for where the config comes from), random weights. Which
heads go is chosen by ``headprune.select_heads`` with the default recipe on statistics that
``headprune.collect`` measured on a random 128-token input; speed depends on how many heads
per layer and on the KV layout, not on which heads.

Variants: ``base`` (unpruned); ``even30`` / ``even50`` (the default, ``gqa="even"``, 30 % /
50 % of the query heads: every KV group a layer keeps keeps the same number of query heads,
so the KV cache never grows, and shrinks only where whole groups go); ``group33`` (one whole
KV group of three in every layer, ``gqa="group", uniform=True``: a third of the query heads
and of the KV cache; the layout llama.cpp can hold, see bench_gguf.py); ``query30`` (30 % of
query heads freely, ``gqa="query"``: a partly pruned group repeats its KV head, so the KV
cache grows). ``masked30`` (``mask_heads`` of the even30 heads, every shape kept) is
available; its logits are checked against even30's in every run.

Timing: ``headprune.hf.speed.compare`` (prefill = one forward without a cache keeping the
last position's logits; decode = ``--steps`` greedy steps after a ``DynamicCache`` filled
with zeros to the context in each layer's own KV shape; rounds in rotation; the speed-up is
the median over rounds of t_base / t with its quartiles (of fewer than 5 rounds: the range),
and a row whose spread reaches 1.0 or the spread of ``masked30``, which keeps every shape and
so times the unpruned computation again (the control), reads "no measurable difference"). FLOP model for prefill rows, per prompt token (2
FLOPs per multiply-add), from ``headprune.measure``:
    F = 2 * (P - P_emb) + 2 * V * d / S + A * (S + 1) / 2
P: distinct parameters; P_emb: the embedding table(s) (the lookup costs no FLOPs; the tied
lm_head runs for the kept position only, hence 2 V d / S); A: attention-score FLOPs per token
per key (sum over layers of 4 Hq d_head: QK^T and PV); (S + 1) / 2: the mean causal
context. ``gain_realised`` = (measured - 1) / (predicted - 1); target: at batch 16 x 512
the default at 50 % realises at least 80 % of the predicted speed-up (CPU time).
KV cache: bytes per token from ``headprune.measure`` (float32 here), checked against the
cache tensors of each decode shape.
Writes benchmarks/results/pruned_cpu.json (pruned_cpu_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results  # noqa: E402
from bench_collect import smollm2_config_dir  # noqa: E402

import headprune  # noqa: E402
from headprune.hf.speed import compare, filled_cache, parse_shape, verdict  # noqa: E402

#: variant -> (how the heads are removed, select_heads arguments)
VARIANTS = {
    "even30": ("prune", {"ratio": 0.3}),
    "even50": ("prune", {"ratio": 0.5}),
    "group33": ("prune", {"ratio": 1 / 3, "gqa": "group", "uniform": True}),
    "query30": ("prune", {"ratio": 0.3, "gqa": "query"}),
    "masked30": ("mask", {"ratio": 0.3}),
}
DEFAULT_VARIANTS = ["base", "masked30", "even30", "even50", "group33", "query30"]  # masked30: the control
PREFILL = ["1x512", "16x512", "1x4096"]
DECODE = ["1x2048", "16x2048", "1x8192", "16x8192"]
QUICK_PREFILL, QUICK_DECODE = ["1x128"], ["1x512"]
TARGET_SHAPE, TARGET_VARIANT, TARGET_FRACTION = (16, 512), "even50", 0.8
#: how the rows' spreads were taken (headprune.hf.speed.quartiles), recorded so the docs can tell
#: files written when 3 rounds were spread by the midpoints of neighbouring rounds
SPREAD = "least and greatest below 5 rounds, else inclusive quartiles"


def build_variants(names: list, config_dir: str) -> tuple:
    """``{name: model}`` and ``{name: heads removed}``: copies of one random model."""
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(AutoConfig.from_pretrained(config_dir, attn_implementation="sdpa")).eval()
    ids = torch.randint(3, base.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    scores = headprune.collect(base, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], progress=False,
                               moments=True)
    models, heads = {"base": base}, {}
    for name in names:
        if name == "base":
            continue
        how, kw = VARIANTS[name]
        heads[name] = headprune.select_heads(scores, **kw)
        m = copy.deepcopy(base)
        (headprune.mask_heads if how == "mask" else headprune.prune_heads)(m, heads[name], reconstruct=scores)
        models[name] = m.eval()
    return models, heads


def _embedding_params(model) -> int:
    tables = [model.get_input_embeddings(), model.get_output_embeddings()]
    return sum(p.numel() for p in {id(t.weight): t.weight for t in tables if t is not None}.values())


def flops_per_token(model, seq: int, logit_positions: int = 1) -> float:
    """Forward FLOPs per prompt token of a causal prefill of ``seq`` tokens (docstring above)."""
    m = headprune.measure(model, context=0)
    per_key = headprune.attention_flops_per_token(model, 1) - m["attention_flops_per_token"]
    lm = model.get_output_embeddings().weight.numel()
    return 2 * (m["parameters"] - _embedding_params(model)) + 2 * lm * logit_positions / seq + per_key * (seq + 1) / 2


def gain(measured: float, predicted: float):
    """Fraction of the predicted speed-up realised: (measured - 1) / (predicted - 1)."""
    return round((measured - 1) / (predicted - 1), 2) if predicted > 1.001 else None


def describe(models: dict, rows: list) -> list:
    """Each timed row with the model's head counts, parameters, KV cache and (prefill) the
    FLOP model's prediction."""
    info = {n: headprune.measure(m) for n, m in models.items()}
    out = []
    for r in rows:
        m, i = models[r["model"]], info[r["model"]]
        row = {"shape": f"{r['batch']}x{r['tokens']}", **r, "q_heads": i["query_heads"], "kv_heads": i["kv_heads"],
               "params_M": round(i["parameters"] / 1e6, 1), "kv_bytes_per_token": i["kv_cache_bytes_per_token"]}
        if r["kind"] == "prefill":
            pred = flops_per_token(models["base"], r["tokens"]) / flops_per_token(m, r["tokens"])
            row.update(flop_speedup=round(pred, 3), gain_realised=gain(r["speedup"], pred),
                       gain_realised_cpu=gain(r["speedup_cpu"], pred))
        else:
            row["kv_cache_MB"] = round(i["kv_cache_bytes_per_token"] * r["batch"] * r["tokens"] / 2**20, 1)
        for k in ("wall_s", "cpu_s"):
            row[k] = round(row[k], 4)
        for k in [k for k in row if k.startswith("speedup")] + ["tokens_per_s"]:
            row[k] = round(row[k], 3)
        out.append(row)
    return out


def judge(rows: list, control: str = "masked30") -> list:
    """Each row's verdicts, wall and CPU time, against the spread of ``control`` at its shape
    (``headprune.hf.speed.verdict``; rows without a control at their shape: against 1.0)."""
    spread = {(r["kind"], r["shape"]): r for r in rows if r["model"] == control}
    for r in rows:
        c = spread.get((r["kind"], r["shape"]))
        if r["model"] in ("base", control) or c is None:
            continue
        for clock in ("", "_cpu"):
            r[f"control{clock}_low"], r[f"control{clock}_high"] = c[f"speedup{clock}_low"], c[f"speedup{clock}_high"]
        r["verdict"], r["verdict_cpu"] = (verdict(r, clock, control=f"the {control} control") for clock in ("", "_cpu"))
    return rows


def check_cache_bytes(models: dict) -> dict:
    """The KV bytes per token ``measure`` reports against a filled cache's tensors."""
    out = {}
    for n, m in models.items():
        cache = filled_cache(m, 1, 64)
        held = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
        out[n] = held == 64 * headprune.measure(m)["kv_cache_bytes_per_token"]
    return out


def check_masked_equals_pruned(models: dict):
    """Masking and physically removing the same heads must give the same logits."""
    if not {"masked30", "even30"} <= set(models):
        return None
    ids = torch.randint(3, models["even30"].config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = models["masked30"](input_ids=ids, use_cache=False).logits
        b = models["even30"](input_ids=ids, use_cache=False).logits
    return float(f"{(a - b).abs().max().item():.2e}")


def print_tables(rows: list, steps: int) -> None:
    cols = ["shape", "model", "q_heads", "kv_heads", "wall_s", "cpu_s", "tokens_per_s", "speedup", "speedup_low",
            "speedup_high", "speedup_cpu", "verdict"]
    print("\nprefill (logits of the last position): speedup = t_base / t per round, median and quartiles")
    print(table([r for r in rows if r["kind"] == "prefill"], cols + ["flop_speedup", "gain_realised_cpu"]))
    print(f"\ndecode ({steps} greedy steps after a cache of the context; KV cache float32 at the context)")
    print(table([r for r in rows if r["kind"] == "decode"], cols + ["kv_cache_MB"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"prefill {QUICK_PREFILL}, decode {QUICK_DECODE}")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per shape (at least 3, default 5)")
    ap.add_argument("--steps", type=int, default=4, help="decode steps per timed call")
    ap.add_argument("--prefill", nargs="*", default=None, help="BATCHxTOKENS prefill shapes")
    ap.add_argument("--decode", nargs="*", default=None, help="BATCHxCONTEXT decode shapes")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=["base", *VARIANTS])
    ap.add_argument("--tag", default="", help="suffix of the results file (partial runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds
    prefill = [parse_shape(s, "--prefill") for s in (args.prefill if args.prefill is not None
                                                      else QUICK_PREFILL if args.quick else PREFILL)]
    decode = [parse_shape(s, "--decode") for s in (args.decode if args.decode is not None
                                                    else QUICK_DECODE if args.quick else DECODE)]
    names = ["base"] + [v for v in args.variants if v != "base"]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = smollm2_config_dir(Path(tmp))
        models, heads = build_variants(names, tmp)
    weights = f"random, {source}"
    print(f"model: Llama, SmolLM2-135M config, weights: {weights}; {rounds} rounds, {torch.get_num_threads()} threads",
          flush=True)
    same = check_masked_equals_pruned(models)
    cache_ok = check_cache_bytes(models)

    def progress(rows):
        r0 = rows[0]
        print(f"  {r0['kind']} {r0['batch']}x{r0['tokens']}: "
              + ", ".join(f"{r['model']} {r['wall_s']:.2f} s {r['verdict']}" for r in rows), flush=True)

    rows = judge(describe(models, compare(models, prefill=prefill, decode=decode, steps=args.steps, rounds=rounds,
                                          progress=progress)))
    print_tables(rows, args.steps)
    target = next((r for r in rows if r["kind"] == "prefill" and (r["batch"], r["tokens"]) == TARGET_SHAPE
                   and r["model"] == TARGET_VARIANT), None)
    verdict = {
        "shape": "x".join(map(str, TARGET_SHAPE)), "variant": TARGET_VARIANT, "required_gain_realised": TARGET_FRACTION,
        "gain_realised": target and target["gain_realised"], "gain_realised_cpu": target and target["gain_realised_cpu"],
        # met only where the speed-up itself is measurable (its verdict is a figure, not "no measurable difference")
        "met_cpu": None if not target or target["gain_realised_cpu"] is None
        else target["gain_realised_cpu"] >= TARGET_FRACTION and not target["verdict_cpu"].startswith("no "),
    }
    print(f"\nmasked30 vs even30 logits, max abs diff: {same}; KV bytes per token match the cache tensors: {cache_ok}")
    print(f"target ({TARGET_VARIANT} at {verdict['shape']} realises >= {TARGET_FRACTION:.0%} of the FLOP model's "
          f"speed-up, CPU time): {verdict}")
    payload = {
        "quick": args.quick, "rounds": rounds, "steps": args.steps, "threads": torch.get_num_threads(),
        "spread": SPREAD,
        "weights": weights, "masked_vs_pruned_logits_max_abs_diff": same, "kv_bytes_match_cache": cache_ok,
        "target": verdict, "total_s": round(time.perf_counter() - t_start, 1),
        "heads_removed": {k: {str(layer): hs for layer, hs in v.items()} for k, v in heads.items()},
        "rows": rows,
    }
    name = "pruned_cpu" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    path = write_results(name + ".json", payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

