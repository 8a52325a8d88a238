"""GGUF in, GGUF out: SmolLM2-135M (Q4_1 GGUF) pruned with the default ranking and the
least-squares refit, to a uniform layout (``--layout uniform``: llama.cpp's ``llama``
architecture) or to the default's per-layer layouts (``--layout default``: its ``deci``
architecture, per-layer head counts), written back as GGUF by ``export_gguf``, and read by
transformers and by llama.cpp (llama-cpp-python).

    python benchmarks/bench_gguf.py [--ratio 0.3] [--layout uniform|default] [--gqa even|group]
        [--eval persuasion,python_tutorial] [--llama-python /path/to/python-with-llama_cpp]
        [--speed-context 4096] [--out gguf.json]

Perplexity on the held-out windows headprune's evaluation uses (256 tokens, 16 windows) of:
the unpruned model and the pruned model in float32 (transformers); the written GGUF through
transformers: a ``llama`` file read back by headprune's loader (transformers' GGUF loader: the
attention re-quantised to Q4_1), a ``deci`` file, which that loader does not read, by loading
its dequantised attention tensors into the pruned model (every other tensor is the source's,
byte for byte); and, when a Python with ``llama_cpp`` is given (it builds from PyPI in many minutes, so it is
kept out of the test suite), the original and the pruned GGUF in llama.cpp, fed the same
token ids. Also the file sizes and a short greedy generation by llama.cpp from the pruned GGUF.

Speed in llama.cpp (with ``--llama-python``): both GGUFs loaded side by side, each fed the
same ``--speed-context`` prompt tokens (held-out prose, repeated), then ``--speed-steps``
single-token decode steps per round, the two models in rotation, the first round dropped;
the position is reset to the prompt's end before each round (llama.cpp drops the decoded
cells). Decode tokens/s medians, the median per-round speed-up with its quartiles ("no
measurable difference" when they include 1.0), the prompt's prefill speed, and the KV state
each context holds after the prompt (``llama_state_seq_get_size``). ``--gqa group --ratio
0.3333``: one whole KV group of three per layer goes, the layout that shrinks the KV cache.
Writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402
from bench_quality import calibration  # noqa: E402

import torch  # noqa: E402

from headprune.app import evaluate as E  # noqa: E402
from headprune.app import texts  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.app.locate import bundled_path  # noqa: E402
from headprune.hf import collect, prune_heads  # noqa: E402
from headprune.hf.adapters import get_adapter, head_dim, resolve_sites  # noqa: E402
from headprune.hf.gguf_export import export_gguf, gguf_architecture, unpermute  # noqa: E402
from headprune.ranking import select_heads  # noqa: E402

LLAMA_SCRIPT = textwrap.dedent("""
    import json, math, sys
    import numpy as np
    from llama_cpp import Llama
    job = json.load(open(sys.argv[1]))
    out = {}
    for name, path in job["models"].items():
        llm = Llama(model_path=path, n_ctx=job["window"], logits_all=True, n_threads=2, verbose=False)
        res = {}
        for text, windows in job["windows"].items():
            nll, count = 0.0, 0
            for w in windows:
                llm.reset()
                llm.eval(w)
                logits = np.array(llm.scores[: len(w)], dtype=np.float64)
                logits -= logits.max(-1, keepdims=True)
                lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
                nll -= float(sum(lp[i, w[i + 1]] for i in range(len(w) - 1)))
                count += len(w) - 1
            res[text] = math.exp(nll / count)
        llm.reset()
        gen = []
        for tok in llm.generate(job["prompt"], temp=0.0):
            gen.append(int(tok))
            if len(gen) == 24:
                break
        res["generated"] = gen
        out[name] = res
        del llm
    speed = job.get("speed")
    if speed:
        import time
        import llama_cpp
        ctx, steps = speed["context"], speed["steps"]
        llms = {name: Llama(model_path=path, n_ctx=ctx + steps + 16, n_batch=512, n_threads=speed["threads"],
                            verbose=False) for name, path in job["models"].items()}
        prompt = (speed["tokens"] * (ctx // len(speed["tokens"]) + 1))[:ctx]
        for name, llm in llms.items():
            t0 = time.perf_counter()
            llm.eval(prompt)
            out[name]["prefill_tokens_per_s"] = ctx / (time.perf_counter() - t0)
            out[name]["kv_state_bytes"] = int(llama_cpp.llama_state_seq_get_size(llm._ctx.ctx, 0))
            out[name]["decode_s"] = []
        names = list(llms)
        for r in range(speed["rounds"] + 1):  # round 0 warms up and is dropped
            for name in names[r % len(names):] + names[: r % len(names)]:
                llm = llms[name]
                llm.n_tokens = ctx  # back to the prompt's end: the next eval drops the decoded cells
                t0 = time.perf_counter()
                for i in range(steps):
                    llm.eval([speed["tokens"][i % len(speed["tokens"])]])
                if r:
                    out[name]["decode_s"].append(time.perf_counter() - t0)
    json.dump(out, open(sys.argv[2], "w"))
""")


def load_gguf_attention(model, path) -> None:
    """The attention tensors of the GGUF ``path`` (dequantised, llama.cpp's rotary row order
    undone) copied into ``model``, whose layout they were written from."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    adapter = get_adapter(model)
    for s in resolve_sites(model, adapter):
        b = s.block
        for part, key in ((b.q, "attn_q"), (b.k, "attn_k"), (b.v, "attn_v"), (b.o, "attn_output")):
            lin = s.sub(part)
            for kind in ("weight", "bias"):
                t = tensors.get(f"blk.{s.index}.{key}.{kind}")
                if t is None:
                    continue
                value = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
                if getattr(lin, kind, None) is None:  # the zero q/k/v biases written beside a refit's
                    assert not value.any(), f"{t.name}: a bias the model does not have"
                    continue
                value = value.reshape(getattr(lin, kind).shape)
                if key in ("attn_q", "attn_k"):
                    value = unpermute(value, value.shape[0] // head_dim(s, adapter))
                with torch.no_grad():
                    getattr(lin, kind).copy_(value)


def read_back(loaded, path, arch: str, ppl) -> tuple:
    """``(row name, perplexities)`` of the written GGUF through transformers: a ``llama`` file
    read by headprune's loader, a ``deci`` file (which that loader does not read) as its
    attention tensors loaded into the pruned model (every other tensor is the source's)."""
    if arch == "llama":
        return "pruned GGUF (transformers' GGUF loader)", ppl(load_model(str(path)).model)
    load_gguf_attention(loaded.model, path)
    return "pruned GGUF (its tensors in transformers)", ppl(loaded.model)


def windows(tokenizer, paragraphs, window: int, count: int) -> list:
    """The token windows headprune.app.evaluate.perplexity scores (stride = window)."""
    ids = texts.token_windows(tokenizer, paragraphs, 1).view(-1)
    starts = list(range(0, max(1, len(ids) - window + 1), window))[:count]
    return [ids[s : s + window].tolist() for s in starts]


def run_llama_cpp(args, loaded, held: dict, models: dict, tmp: Path, result: dict, rows: dict) -> None:
    """Perplexity, generation and (``--speed-rounds``) speed of ``models`` in llama.cpp, run by
    ``--llama-python`` on the held-out windows headprune evaluated; into ``result`` and ``rows``."""
    job = {"models": models, "window": E.WINDOW,
           "prompt": loaded.tokenizer("The most persuasive argument is")["input_ids"],
           "windows": {t: windows(loaded.tokenizer, p, E.WINDOW, args.eval_windows) for t, p in held.items()}}
    if args.speed_rounds:
        prose = next(iter(held.values()))
        job["speed"] = {"context": args.speed_context, "steps": args.speed_steps, "rounds": args.speed_rounds,
                        "threads": args.speed_threads,
                        "tokens": [t for w in windows(loaded.tokenizer, prose, E.WINDOW, 64) for t in w]}
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "run.py").write_text(LLAMA_SCRIPT)
    subprocess.run([args.llama_python, str(tmp / "run.py"), str(tmp / "job.json"), str(tmp / "res.json")], check=True)
    for model, res in json.loads((tmp / "res.json").read_text()).items():
        gen = res.pop("generated")
        for key in ("prefill_tokens_per_s", "kv_state_bytes", "decode_s"):
            if key in res:
                result.setdefault("llama_cpp_speed", {}).setdefault(model, {})[key] = res.pop(key)
        rows[model] = res
        result.setdefault("generated", {})[model] = loaded.tokenizer.decode(gen)
    if "llama_cpp_speed" in result:
        result["llama_cpp_speed_summary"] = speed_summary(result["llama_cpp_speed"], args)


def speed_summary(speed: dict, args) -> dict:
    """Decode tokens/s of the pruned and the unpruned GGUF in llama.cpp: medians, the median
    per-round speed-up with its quartiles, and the KV state each holds after the prompt."""
    import statistics

    from headprune.hf.speed import quartiles, verdict

    base, pruned = speed["unpruned GGUF (llama.cpp)"], speed["pruned GGUF (llama.cpp)"]
    ups = sorted(a / b for a, b in zip(base["decode_s"], pruned["decode_s"]))
    low, high = quartiles(ups)
    out = {"context": args.speed_context, "steps": args.speed_steps, "rounds": len(ups), "threads": args.speed_threads,
           "decode_tokens_per_s_unpruned": args.speed_steps / statistics.median(base["decode_s"]),
           "decode_tokens_per_s_pruned": args.speed_steps / statistics.median(pruned["decode_s"]),
           "decode_speedup": statistics.median(ups), "decode_speedup_low": low, "decode_speedup_high": high,
           "prefill_speedup": pruned["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
           "kv_state_ratio": pruned["kv_state_bytes"] / base["kv_state_bytes"]}
    out["verdict"] = verdict({"speedup": out["decode_speedup"], "speedup_low": low, "speedup_high": high})
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--calib", default="persuasion")
    ap.add_argument("--eval", default="persuasion,python_tutorial")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--layout", default="uniform", choices=["uniform", "default"],
                    help="one layout in every layer (llama.cpp's llama architecture), or the default selection's "
                         "per-layer layouts (its deci architecture)")
    ap.add_argument("--gqa", default="even", choices=["even", "group"],
                    help="uniform layout of query heads in even KV groups, or of whole KV groups (--ratio 0.3333: "
                         "one group of three per layer)")
    ap.add_argument("--llama-python", default=None)
    ap.add_argument("--speed-context", type=int, default=4096, help="llama.cpp decode speed after this many tokens")
    ap.add_argument("--speed-steps", type=int, default=32, help="decoded tokens per timed round")
    ap.add_argument("--speed-rounds", type=int, default=7, help="timed rounds (pruned and unpruned in rotation)")
    ap.add_argument("--speed-threads", type=int, default=2)
    ap.add_argument("--out", default="gguf.json")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model("smollm2")
    folder, name = bundled_path("smollm2")
    source = folder / name
    batches, settings = calibration(loaded, args.calib, None)
    scores = collect(loaded.model, batches, progress=False, moments=True)
    held = {t: texts.split(texts.load_paragraphs(t))[1] for t in args.eval.split(",")}

    def ppl(model) -> dict:
        return {t: E.perplexity(model, loaded.tokenizer, p, max_windows=args.eval_windows)["perplexity"]
                for t, p in held.items()}

    rows = {"unpruned (transformers, float32)": ppl(loaded.model)}
    heads = select_heads(scores, ratio=args.ratio, uniform=args.layout == "uniform", gqa=args.gqa)
    prune_heads(loaded.model, heads, reconstruct=scores)
    rows["pruned (transformers, float32)"] = ppl(loaded.model)
    result = {"ratio": args.ratio, "layout": args.layout, "gqa": args.gqa, "heads_pruned": sum(map(len, heads.values())),
              "heads_total": sum(scores.num_heads), "calibration": settings, "eval_windows": args.eval_windows, "source_bytes": source.stat().st_size}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.gguf"
        t0 = time.perf_counter()
        written = export_gguf(loaded.model, out, source=source)
        result.update(export_seconds=round(time.perf_counter() - t0, 2), gguf_bytes=out.stat().st_size,
                      attention_types=sorted({v for k, v in written.items() if ".attn_" in k}),
                      architecture=gguf_architecture(out))
        name, ours = read_back(loaded, out, result["architecture"], ppl)
        rows[name] = ours
        if args.llama_python:
            run_llama_cpp(args, loaded, held, {"unpruned GGUF (llama.cpp)": str(source), "pruned GGUF (llama.cpp)":
                                               str(out)}, Path(tmp), result, rows)
    result["rows"] = rows
    for model, res in rows.items():
        print(f"{model:45s} " + "  ".join(f"{t}: {v:.3f}" for t, v in res.items()), flush=True)
    assert all(math.isfinite(v) for res in rows.values() for v in res.values())
    theirs = rows.get("pruned GGUF (llama.cpp)")
    if theirs:  # the same file, the same windows: llama.cpp's perplexity against headprune's evaluation
        result["llama_cpp_vs_headprune"] = {t: theirs[t] / ours[t] - 1 for t in ours}
        print("llama.cpp vs headprune's evaluation of the pruned GGUF: "
              + ", ".join(f"{t} {v:+.2%}" for t, v in result["llama_cpp_vs_headprune"].items()))
    if "llama_cpp_speed_summary" in result:
        print(f"llama.cpp: {result['llama_cpp_speed_summary']}")
    write_results(args.out, {"results": [result]})


if __name__ == "__main__":
    main()
