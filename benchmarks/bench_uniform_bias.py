"""What leaving the output bias out of the least-squares refit costs: a uniform layout
(``--uniform``) removed with the refit as it is (kept columns and bias) and with the kept
columns alone (``refit_bias=False``, what ``headprune prune --uniform`` does where the family's
config declares no attention bias: mistral, qwen2, phi3, so the directory stays plain; T5's in
Python, ``prune_heads(..., refit_bias=False)``).

    python benchmarks/bench_uniform_bias.py [--models smollm2] [--ratios 0.3,0.5]
        [--calib persuasion] [--eval persuasion,python_tutorial] [--out uniform_bias.json]

One calibration as ``headprune prune`` takes it by default (``--calib`` with the reference
share, second moments); for each ratio the default ranking's uniform layout (``select_heads(...,
uniform=True)``; the first layer's heads are not re-chosen by measurement, so both removals
take the same heads), masked with each refit and with the heads zeroed, and the perplexity on
the held-out part of each evaluation text (16 windows of 256 tokens). SmolLM2's own config
declares the bias (llama's ``attention_bias``); it stands in for the families that cannot.
Writes benchmarks/results/<out>.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402
from bench_layouts import evaluator  # noqa: E402
from bench_quality import calibration, point_args  # noqa: E402

from headprune.app import sweep as S  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.hf import collect  # noqa: E402
from headprune.ranking import select_heads  # noqa: E402

#: name -> (removal, refit_bias) as the sweep's evaluator takes them
REMOVALS = {"refit": ("refit", True), "refit without the bias": ("refit", False), "zeroed": ("zero", True)}


def run(args) -> dict:
    loaded = load_model(args.model)
    batches, settings = calibration(loaded, args.calib, None)
    scores = collect(loaded.model, batches, progress=False, moments=True)
    chosen = {r: select_heads(scores, ratio=r, uniform=True, damping=args.damping) for r in args.ratios}
    rows = []
    for text in args.eval.split(","):
        point = evaluator(loaded, args.model, text, args, batches, None)
        rows.append({"evaluated_on": text, "ratio": 0.0, "removal": "unpruned", "heads_pruned": 0,
                     "quality": point.baseline_value})
        for ratio, heads in chosen.items():
            for name, (removal, refit_bias) in REMOVALS.items():
                t0 = time.perf_counter()
                row = {"evaluated_on": text, "ratio": ratio, "removal": name,
                       "heads_pruned": sum(map(len, heads.values())),
                       "quality": point(heads, scores, removal, False, refit_bias),
                       "seconds": round(time.perf_counter() - t0, 1)}
                print(row, flush=True)
                rows.append(row)
    return {"model": args.model, "metric": "perplexity", "calibration": settings, "heads_total": sum(scores.num_heads),
            "eval_windows": args.eval_windows, "rows": rows}


def main(argv=None):
    ap = point_args(__doc__, evals="persuasion,python_tutorial", out="uniform_bias.json")
    ap.set_defaults(models="smollm2", ratios=[0.3, 0.5])  # SmolLM2's nearest uniform layout to 10% is none
    ap.add_argument("--damping", type=float, default=S.DEFAULT_DAMPING)
    args = ap.parse_args(argv)
    if "," in args.models:
        raise SystemExit(f"--models: one causal LM, got {args.models!r}")
    args.model = args.models
    print(f"wrote {write_results(args.out, run(args))}")


if __name__ == "__main__":
    main()
