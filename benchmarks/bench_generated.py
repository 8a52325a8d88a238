"""Calibration text sampled from the model itself (``--generated N``): what it buys on text of
another kind than the calibration text, and what it costs on the calibration text's own kind.

    python benchmarks/bench_generated.py [--generated 32] [--seeds 0,1] [--ratios 0.3,0.5]
        [--data persuasion] [--eval persuasion,python_tutorial] [--windows 16]

SmolLM2-135M, the default recipe (second moments, reconstruction score, even layouts, refit),
calibrated on ``--data`` (64 windows of 256 tokens of its calibration part, the CLI's default
size), alone and joined by ``--generated`` sequences of 256 tokens sampled from the model
(:func:`headprune.hf.generated_batches`, one row per seed); perplexity over ``--windows``
windows of 256 tokens of each evaluation text's held-out part (the tables of docs/quality.md
use the same windows). Writes ``results/generated_calibration.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, table, write_results  # noqa: E402

import headprune  # noqa: E402
from headprune.app import evaluate as E  # noqa: E402
from headprune.app import texts  # noqa: E402
from headprune.app.load import load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generated", type=int, default=32, help="sampled sequences joined to the calibration text")
    ap.add_argument("--seeds", default="0", help="sampling seeds, comma-separated (one row each)")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--data", default="persuasion", help="calibration text")
    ap.add_argument("--eval", default="persuasion,python_tutorial", help="held-out texts, comma-separated")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    calib, _ = texts.split(texts.load_paragraphs(args.data))
    held = {e: texts.split(texts.load_paragraphs(e))[1] for e in args.eval.split(",")}
    base = texts.calibration_batches(tok, calib, causal=True, samples=64, seq_len=256, batch_size=8)

    def quality(m) -> dict:
        return {e: E.perplexity(m, tok, p, max_windows=args.windows)["perplexity"] for e, p in held.items()}

    unpruned = quality(model)
    print(f"unpruned: {unpruned}", flush=True)
    runs = [("none", None, base, 0.0)]
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        gen = headprune.generated_batches(model, samples=args.generated, seq_len=256, seed=seed)
        runs.append((f"{args.generated} generated", seed, base + gen, time.perf_counter() - t0))
        print(f"sampled {args.generated} x 256 tokens (seed {seed}) in {runs[-1][3]:.0f} s", flush=True)
    rows = []
    for name, seed, batches, sample_s in runs:
        scores = headprune.collect(model, batches, progress=False, moments=True)
        for ratio in (float(r) for r in args.ratios.split(",")):
            pruned = copy.deepcopy(model)
            headprune.prune_heads(pruned, headprune.select_heads(scores, ratio=ratio), reconstruct=scores)
            q = quality(pruned)
            rows.append({"calibration": name, "seed": seed, "ratio": ratio, "sample_seconds": round(sample_s, 1),
                         **{e: v for e, v in q.items()}, **{f"{e}_x_unpruned": v / unpruned[e] for e, v in q.items()}})
            print(rows[-1], flush=True)
            del pruned
    cols = ["calibration", "seed", "ratio", *held, *(f"{e}_x_unpruned" for e in held)]
    print(table([{c: (f"{r[c]:.3f}" if isinstance(r[c], float) else r[c]) for c in cols} for r in rows], cols))
    path = write_results("generated_calibration.json", {
        "machine": machine(), "model": "smollm2", "data": args.data, "calibration": {"samples": 64, "seq_len": 256},
        "generated": args.generated, "windows": args.windows, "unpruned": unpruned, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
