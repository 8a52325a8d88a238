"""Pruning quality: the entropy recipes and the gradient baseline against random pruning, on
both real models and two unrelated held-out texts, through headprune's own pipeline.

    python benchmarks/bench_quality.py [--models minilm,smollm2] [--texts persuasion,python_tutorial]
                                       [--ratios 0.1,0.2,0.3,0.4,0.5] [--seeds 3] [--quick]

For each (model, text): calibrate on the text's first 70% of paragraphs, then for every ratio
mask the selected heads (exact, so one loaded model serves all points) and measure quality on
the held-out 30%: perplexity for SmolLM2 (lower is better), embedding fidelity to the
unpruned model for MiniLM (higher is better). Removed heads are replaced by their mean output
(``compensate``) unless a recipe says otherwise; random pruning uses the same constraints
with --seeds seeds, compensated and (``random_zeroed``) zeroed. Writes
benchmarks/results/quality.json and prints one table per (model, text).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402

from headprune.app import sweep as S  # noqa: E402
from headprune.app import texts  # noqa: E402
from headprune.hf import collect  # noqa: E402
from headprune.hf.importance import gradient_importance  # noqa: E402
from headprune.app.load import load_model  # noqa: E402


def run(model_name: str, text: str, ratios, seeds: int, eval_windows: int, samples: int | None,
        eval_paragraphs: int | None = None, only: list | None = None, zeroed: bool = True,
        random_scope: str = "per_layer") -> dict:
    loaded = load_model(model_name)
    causal = loaded.kind == "causal"
    calib, held = texts.split(texts.load_paragraphs(text))
    n = samples or (64 if causal else 256)
    seq = 256 if causal else 128
    batches = texts.calibration_batches(loaded.tokenizer, calib, causal=causal, samples=n, seq_len=seq, batch_size=8)
    t0 = time.perf_counter()
    scores = collect(loaded.model, batches, progress=False)
    t_collect = time.perf_counter() - t0
    wants = lambda name: only is None or name in only  # noqa: E731
    grad_name = "gradient importance (Michel et al.)"
    grad = gradient_importance(loaded.model, batches[: max(1, len(batches) // 2)], causal=causal) if wants(grad_name) else None
    settings = {"data": text, "samples": n, "seq_len": seq}
    args = SimpleNamespace(model=model_name, ratios=ratios, seeds=seeds, gqa="query", quiet=False, random_scope=random_scope,
                           eval_windows=eval_windows, eval_paragraphs=eval_paragraphs, compensate=True)
    recipes = {**S.RECIPES, grad_name: {"score": grad, "order": "low"}}
    recipes = {k: v for k, v in recipes.items() if wants(k)}
    result = S.run_sweep(args, loaded, scores, held, settings, recipes, batches=batches)
    if seeds and zeroed:  # the same random seeds with the heads zeroed: what compensation buys
        zero = S.run_sweep(SimpleNamespace(**{**vars(args), "compensate": False}), loaded, scores, held, settings, {})
        result["random_zeroed"] = zero["random"]
    result["collect_seconds"] = t_collect
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--texts", default="persuasion,python_tutorial")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-windows", type=int, default=32, help="held-out perplexity windows (causal LMs)")
    ap.add_argument("--eval-paragraphs", type=int, default=None, help="held-out paragraphs for fidelity (encoders)")
    ap.add_argument("--quick", action="store_true", help="2 ratios, 2 seeds, small calibration (smoke run)")
    ap.add_argument("--only", default=None,
                    help="semicolon-separated recipe names to run (with --seeds 0: added to the existing quality.json, "
                         "whose random baseline is reused: same seeds, same statistics)")
    ap.add_argument("--no-zeroed", action="store_true", help="skip the zeroed random baseline")
    ap.add_argument("--random-scope", choices=list(S.RANDOM_SCOPES), default="per_layer",
                    help="random baseline: " + "; ".join(f"{k}: heads {v}" for k, v in S.RANDOM_SCOPES.items()))
    ap.add_argument("--out", default="quality.json",
                    help="results file under benchmarks/results (a run on other texts, e.g. a validation text)")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds, samples, windows = args.seeds, None, args.eval_windows
    if args.quick:
        ratios, seeds, samples, windows = ratios[:2], 2, 16, 8
    only = None if args.only is None else [n.strip() for n in args.only.split(";")]
    results = []
    for m in args.models.split(","):
        for t in args.texts.split(","):
            res = run(m, t, ratios, seeds, windows, samples, args.eval_paragraphs, only, not args.no_zeroed,
                      args.random_scope)
            results.append(res)
            if seeds:
                print(S.sweep_markdown(res), flush=True)
    if only is not None and not seeds:  # add the recipes to the committed results
        path = Path(__file__).parent / "results" / args.out
        old = json.loads(path.read_text())
        for res in results:
            for prev in old["results"]:
                if (prev["model"], prev["data"]) == (res["model"], res["data"]):
                    if prev["ratios"] != res["ratios"]:
                        raise SystemExit(f"--only: ratios differ from {path} for {res['model']}/{res['data']}")
                    prev["recipes"].update(res["recipes"])
                    prev.setdefault("heads", {}).update(res.get("heads", {}))
                    prev.setdefault("recipe_settings", {}).update(res.get("recipe_settings", {}))
        path.write_text(json.dumps(old, indent=1) + "\n")
        print(f"added {only} to {path}")
        return
    path = write_results(args.out, {"quick": args.quick, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
