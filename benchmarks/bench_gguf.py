"""GGUF in, GGUF out: SmolLM2-135M (Q4_1 GGUF) pruned to a uniform layout with the default
ranking and the least-squares refit, written back as GGUF by ``export_gguf``, and read by
transformers' GGUF loader and by llama.cpp (llama-cpp-python).

    python benchmarks/bench_gguf.py [--ratio 0.3] [--eval persuasion,python_tutorial]
        [--llama-python /path/to/python-with-llama_cpp] [--out gguf.json]

Perplexity on the held-out windows headprune's evaluation uses (256 tokens, 16 windows) of:
the unpruned model and the pruned model in float32 (transformers); the written GGUF read back
through headprune's loader (transformers' GGUF loader: the attention re-quantised to Q4_1);
and, when a Python with ``llama_cpp`` is given (it builds from PyPI in many minutes, so it is
kept out of the test suite), the original and the pruned GGUF in llama.cpp, fed the same
token ids. Also the file sizes and a short greedy generation by llama.cpp from the pruned GGUF.
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
from headprune.app.load import bundled_path, load_model  # noqa: E402
from headprune.hf import collect, prune_heads  # noqa: E402
from headprune.hf.gguf_export import export_gguf  # noqa: E402
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
    json.dump(out, open(sys.argv[2], "w"))
""")


def windows(tokenizer, paragraphs, window: int, count: int) -> list:
    """The token windows headprune.app.evaluate.perplexity scores (stride = window)."""
    ids = texts.token_windows(tokenizer, paragraphs, 1).view(-1)
    starts = list(range(0, max(1, len(ids) - window + 1), window))[:count]
    return [ids[s : s + window].tolist() for s in starts]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--calib", default="persuasion")
    ap.add_argument("--eval", default="persuasion,python_tutorial")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--llama-python", default=None)
    ap.add_argument("--out", default="gguf.json")
    args = ap.parse_args(argv)
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
    heads = select_heads(scores, ratio=args.ratio, uniform=True)
    prune_heads(loaded.model, heads, reconstruct=scores)
    rows["pruned (transformers, float32)"] = ppl(loaded.model)
    result = {"ratio": args.ratio, "heads_pruned": sum(map(len, heads.values())), "heads_total": sum(scores.num_heads),
              "calibration": settings, "eval_windows": args.eval_windows, "source_bytes": source.stat().st_size}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.gguf"
        t0 = time.perf_counter()
        written = export_gguf(loaded.model, out, source=source)
        result.update(export_seconds=round(time.perf_counter() - t0, 2), gguf_bytes=out.stat().st_size,
                      attention_types=sorted({v for k, v in written.items() if ".attn_" in k}))
        back = load_model(str(out))
        rows["pruned GGUF (transformers' GGUF loader)"] = ppl(back.model)
        del back
        if args.llama_python:
            job = {"models": {"unpruned GGUF (llama.cpp)": str(source), "pruned GGUF (llama.cpp)": str(out)},
                   "window": E.WINDOW, "prompt": loaded.tokenizer("The most persuasive argument is")["input_ids"],
                   "windows": {t: windows(loaded.tokenizer, p, E.WINDOW, args.eval_windows) for t, p in held.items()}}
            (Path(tmp) / "job.json").write_text(json.dumps(job))
            (Path(tmp) / "run.py").write_text(LLAMA_SCRIPT)
            subprocess.run([args.llama_python, str(Path(tmp) / "run.py"), str(Path(tmp) / "job.json"),
                            str(Path(tmp) / "res.json")], check=True)
            for model, res in json.loads((Path(tmp) / "res.json").read_text()).items():
                gen = res.pop("generated")
                rows[model] = res
                result.setdefault("generated", {})[model] = loaded.tokenizer.decode(gen)
    result["rows"] = rows
    for model, res in rows.items():
        print(f"{model:45s} " + "  ".join(f"{t}: {v:.3f}" for t, v in res.items()), flush=True)
    assert all(math.isfinite(v) for res in rows.values() for v in res.values())
    write_results(args.out, {"results": [result]})


if __name__ == "__main__":
    main()
