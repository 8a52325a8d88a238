"""Model-level benchmark: what pruning buys at inference. Prefill latency and throughput of the
unpruned, the masked and the physically pruned model; the FLOP model's predicted speed-up
beside the measured one; decode tokens/s and KV-cache size under GQA group pruning.

    python benchmarks/bench_pruned.py [--quick] [--repeat N] [--configs 1x128 16x512 ...]
                                      [--variants base masked50 q30 q50 g30 g50] [--threads 1]

Model: a Llama model with SmolLM2-135M's config (30 layers, 9 query / 3 KV heads of 64,
hidden 576; see bench_collect.py for where the config comes from), random weights. Which
heads go is chosen by ``headprune.select_heads`` (global, most diffuse first, at least one
unit per layer) on entropies that ``headprune.collect`` measured on a random 128-token input;
speed does not depend on which heads, only on how many per layer (under ``gqa="query"`` an
unevenly pruned KV group is evened out by repeating KV heads, which the parameter counts show).

Variants: ``base`` (unpruned), ``masked50`` (``mask_heads`` of the ``q50`` heads: zeroed o
columns, same shapes), ``q30`` / ``q50`` (``prune_heads`` of 30 % / 50 % of the query heads,
``gqa="query"``), ``g30`` / ``g50`` (30 % / 50 % of the KV groups, ``gqa="group"``: whole
groups with their KV head go, so the KV cache shrinks too).

Prefill = one forward with ``use_cache=False`` and ``logits_to_keep=1`` (what ``generate``
runs on a prompt: logits of the last position only), under ``torch.no_grad()``. Variants are
timed interleaved (one call of each per round, median over rounds), so load changes on the
shared machine hit all of them alike; wall and process CPU time are both reported. On an
oversubscribed machine use ``--threads 1`` (two OpenMP threads on two busy cores stall at
every barrier; see bench_collect.py).

FLOP model, per prompt token (2 FLOPs per multiply-add), from ``headprune.measure``:
    F = 2 * (P - P_emb) + 2 * V * d / S + A * (S + 1) / 2
P: distinct parameters; P_emb: the embedding table(s) (the input lookup costs no FLOPs; the
tied lm_head matmul runs for the one kept position only, hence 2 V d / S); A: attention-score
FLOPs per token per key, ``attention_flops_per_token(model, 1) - attention_flops_per_token(model, 0)``
(= sum over layers of 4 Hq d_head: QK^T and PV); (S + 1) / 2: the mean causal context of a
prompt of S tokens. The q/k/v/o projections and the MLP are in 2 (P - P_emb). Predicted
speed-up = F_base / F_pruned; it ignores element-wise work (norms, RoPE, softmax) and memory
traffic, so it is an upper bound where those dominate (batch 1, short prompts).
Target: at batch 16, length 512, physical pruning of 50 % of the heads realises at least 80 %
of the predicted speed-up, i.e. (measured - 1) / (predicted - 1) >= 0.8.

Decode: greedy steps with a ``DynamicCache`` after a prompt; tokens/s counts the new tokens
of the whole batch over the decode steps only. KV-cache MB = sum over layers of
2 * kv_heads * head_dim * (prompt + new) * batch * 4 bytes, checked against the cache tensors.
Writes benchmarks/results/pruned_cpu.json (pruned_cpu_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results  # noqa: E402
from bench_collect import smollm2_config_dir  # noqa: E402

import headprune  # noqa: E402

VARIANTS = ["base", "masked50", "q30", "q50", "g30", "g50"]
CONFIGS = ["1x128", "1x2048", "16x128", "16x512"]
QUICK_CONFIGS = ["1x128", "4x128"]
DECODE = ["1x128", "16x128"]  # batch x prompt
TARGET_CONFIG, TARGET_VARIANT, TARGET_FRACTION = "16x512", "q50", 0.8


def parse_config(spec: str) -> tuple:
    b, s = spec.lower().split("x")
    return int(b), int(s)


def inputs(vocab: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(batch * 100003 + seq)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_variants(names: list, config_dir: str) -> tuple:
    """``{name: model}`` and ``{name: heads removed}``; all copies of one random model."""
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(AutoConfig.from_pretrained(config_dir, attn_implementation="sdpa")).eval()
    scores = headprune.collect(base, [inputs(base.config.vocab_size, 1, 128)], progress=False)
    heads = {
        "masked50": headprune.select_heads(scores, ratio=0.5, gqa="query"),
        "q30": headprune.select_heads(scores, ratio=0.3, gqa="query"),
        "q50": headprune.select_heads(scores, ratio=0.5, gqa="query"),
        "g30": headprune.select_heads(scores, ratio=0.3, gqa="group"),
        "g50": headprune.select_heads(scores, ratio=0.5, gqa="group"),
    }
    models = {}
    for name in names:
        if name == "base":
            models[name] = base
            continue
        m = copy.deepcopy(base)
        if name.startswith("masked"):
            headprune.mask_heads(m, heads[name])
        else:
            headprune.prune_heads(m, heads[name])
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


def bench_prefill(models: dict, configs: list, repeat: int) -> list:
    rows = []
    vocab = next(iter(models.values())).config.vocab_size
    for spec in configs:
        b, s = parse_config(spec)
        batch = inputs(vocab, b, s)
        calls = {n: (lambda m=m, x=batch: m(**x, use_cache=False, logits_to_keep=1)) for n, m in models.items()}
        warm = inputs(vocab, 1, 32) if b * s >= 4096 else batch  # big shapes: a short warm-up saves minutes
        times = {n: [] for n in models}
        cpu = {n: [] for n in models}
        with torch.no_grad():
            for fn in calls.values():  # warm-up
                fn(x=warm)
            for _ in range(repeat):
                for n, fn in calls.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn()
                    times[n].append(time.perf_counter() - t0)
                    cpu[n].append(time.process_time() - c0)
        f_base = flops_per_token(models["base"], s)
        t_base, c_base = statistics.median(times["base"]), statistics.median(cpu["base"])
        for n, m in models.items():
            t, c = statistics.median(times[n]), statistics.median(cpu[n])
            meas, pred = t_base / t, f_base / flops_per_token(m, s)
            info = headprune.measure(m)
            rows.append({
                "config": spec, "batch": b, "seq": s, "variant": n, "q_heads": info["query_heads"],
                "kv_heads": info["kv_heads"], "params_M": round(info["parameters"] / 1e6, 1),
                "ms": round(t * 1e3, 1), "cpu_ms": round(c * 1e3, 1), "tokens_per_s": round(b * s / t, 1),
                "speedup": round(meas, 3), "speedup_cpu": round(c_base / c, 3), "flop_speedup": round(pred, 3),
                "gain_realised": gain(meas, pred), "gain_realised_cpu": gain(c_base / c, pred),
                "spread_pct": round(100 * (max(times[n]) - min(times[n])) / t, 1),
            })
        print(f"  prefill {spec}: " + ", ".join(f"{r['variant']} {r['ms']:.0f} ms" for r in rows[-len(models):]), flush=True)
    return rows


def cache_bytes(cache) -> int:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.numel() * t.element_size() for lay in layers for t in (lay.keys, lay.values) if t is not None)
    return sum(t.numel() * t.element_size() for t in (*cache.key_cache, *cache.value_cache))


def kv_formula_bytes(model, tokens: int, batch: int) -> int:
    """sum over layers of 2 * kv_heads * head_dim * tokens * batch * 4 bytes (fp32)."""
    from headprune.hf.adapters import get_adapter, head_counts, head_dim, resolve_sites

    adapter = get_adapter(model)
    return sum(2 * head_counts(s, adapter)[1] * head_dim(s, adapter) * tokens * batch * 4 for s in resolve_sites(model, adapter))


def cache_arg(model) -> str:
    """transformers >= 5.2x names the forward's KV cache ``cache`` (``past_key_values`` is deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def bench_decode(models: dict, configs: list, new_tokens: int) -> list:
    from transformers import DynamicCache

    rows = []
    vocab = next(iter(models.values())).config.vocab_size
    for spec in configs:
        b, s = parse_config(spec)
        batch = inputs(vocab, b, s)
        base_tps = None
        for n, m in models.items():
            with torch.no_grad():
                cache = DynamicCache(config=m.config)
                ckw = {cache_arg(m): cache, "use_cache": True}
                out = m(**batch, **ckw, logits_to_keep=1)
                mask = batch["attention_mask"]
                t0 = time.perf_counter()
                for _ in range(new_tokens):
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                    out = m(input_ids=nxt, attention_mask=mask, **ckw)
                dt = time.perf_counter() - t0
            tokens = s + new_tokens
            tps = b * new_tokens / dt
            base_tps = base_tps or tps
            rows.append({
                "config": spec, "batch": b, "prompt": s, "new": new_tokens, "variant": n,
                "kv_heads": headprune.measure(m)["kv_heads"], "tokens_per_s": round(tps, 1),
                "speedup": round(tps / base_tps, 3),
                "kv_cache_MB": round(kv_formula_bytes(m, tokens, b) / 2**20, 2),
                "kv_cache_MB_measured": round(cache_bytes(cache) / 2**20, 2),
                "kv_MB_at_8192_b1": round(kv_formula_bytes(m, 8192, 1) / 2**20, 1),
            })
        print(f"  decode {spec}: " + ", ".join(f"{r['variant']} {r['tokens_per_s']} tok/s" for r in rows[-len(models):]),
              flush=True)
    return rows


def check_masked_equals_pruned(models: dict) -> float | None:
    """Masking and physically removing the same heads must give the same logits."""
    if not {"masked50", "q50"} <= set(models):
        return None
    batch = inputs(models["q50"].config.vocab_size, 1, 64)
    with torch.no_grad():
        a = models["masked50"](**batch, use_cache=False).logits
        b = models["q50"](**batch, use_cache=False).logits
    return float(f"{(a - b).abs().max().item():.2e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"configs {QUICK_CONFIGS}, 2 rounds, 8 decode steps")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds per config (default 3, quick 2)")
    ap.add_argument("--configs", nargs="+", default=None, help="BATCHxSEQ prefill shapes")
    ap.add_argument("--decode", nargs="+", default=None, help="BATCHxPROMPT decode shapes")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode steps (default 32, quick 8)")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--tag", default="", help="suffix of the results file (partial runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeat = args.repeat or (2 if args.quick else 3)
    configs = args.configs or (QUICK_CONFIGS if args.quick else CONFIGS)
    decode = args.decode or (["1x128"] if args.quick else DECODE)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    names = ["base"] + [v for v in args.variants if v != "base"]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = smollm2_config_dir(Path(tmp))
        models, heads = build_variants(names, tmp)
    weights = f"random, {source}"
    print(f"model: Llama, SmolLM2-135M config, weights: {weights}; {repeat} rounds", flush=True)
    same = check_masked_equals_pruned(models)
    prefill = bench_prefill(models, configs, repeat)
    print("\nprefill (logits_to_keep=1): speedup = t_base / t, flop_speedup = the FLOP model's prediction, "
          "gain_realised = (speedup - 1) / (flop_speedup - 1)")
    print(table(prefill, ["config", "variant", "q_heads", "kv_heads", "params_M", "ms", "cpu_ms", "tokens_per_s",
                          "speedup", "speedup_cpu", "flop_speedup", "gain_realised", "gain_realised_cpu", "spread_pct"]))
    dec_models = {n: m for n, m in models.items() if n in ("base", "q50", "g30", "g50")}
    dec = bench_decode(dec_models, decode, new_tokens)
    print(f"\ndecode ({new_tokens} greedy steps after the prompt; KV cache fp32 at prompt + new tokens)")
    print(table(dec, ["config", "variant", "kv_heads", "tokens_per_s", "speedup", "kv_cache_MB", "kv_cache_MB_measured",
                      "kv_MB_at_8192_b1"]))
    target = next((r for r in prefill if r["config"] == TARGET_CONFIG and r["variant"] == TARGET_VARIANT), None)
    masked = next((r for r in prefill if r["config"] == TARGET_CONFIG and r["variant"] == "masked50"), None)
    verdict = {
        "config": TARGET_CONFIG, "variant": TARGET_VARIANT, "required_gain_realised": TARGET_FRACTION,
        "gain_realised": target and target["gain_realised"], "gain_realised_cpu": target and target["gain_realised_cpu"],
        "met": None if not target or target["gain_realised"] is None else target["gain_realised"] >= TARGET_FRACTION,
        "met_cpu": None if not target or target["gain_realised_cpu"] is None else target["gain_realised_cpu"] >= TARGET_FRACTION,
        "masked50_speedup": masked and masked["speedup"],
    }
    print(f"\nmasked50 vs q50 logits, max abs diff: {same}")
    print(f"target ({TARGET_VARIANT} at {TARGET_CONFIG} realises >= {TARGET_FRACTION:.0%} of the FLOP model's speed-up): "
          f"{verdict}; masking keeps every shape, so it cannot speed anything up")
    payload = {
        "quick": args.quick, "repeat": repeat, "configs": configs, "decode_configs": decode, "threads": torch.get_num_threads(), "weights": weights, "new_tokens": new_tokens,
        "masked_vs_pruned_logits_max_abs_diff": same, "target": verdict, "total_s": round(time.perf_counter() - t_start, 1),
        "heads_removed": {k: {str(layer): hs for layer, hs in v.items()} for k, v in heads.items()},
        "prefill": prefill, "decode": dec,
    }
    name = "pruned_cpu" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    path = write_results(name + ".json", payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
