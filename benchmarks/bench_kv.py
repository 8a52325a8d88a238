"""What a smaller KV cache costs under the default recipe: even layouts (``--gqa even``)
removing at least a share of the KV heads (``--kv-ratio``), from none (the default) to every
pruned head in whole groups, at several ratios of query heads, on text of the calibration's kind
and on texts no bundled text is.

    python benchmarks/bench_kv.py [--models smollm2] [--ratios 0.1,0.3,0.5]
        [--kv-shares 0,0.1,0.2,0.25,0.3,0.4,0.5] [--calib persuasion]
        [--eval persuasion,python_tutorial,licences,cpp] [--out kv_shares.json]

One calibration as ``headprune prune`` takes it by default (``--calib`` with the reference
share, second moments), then for each ratio every KV share up to the ratio (a share above it
cannot be met: a KV head goes only with its whole group) selected with the default ranking and
removed with the least-squares refit; the KV heads left and the perplexity on the held-out part
of each evaluation text (16 windows of 256 tokens), masked as bench_quality measures it.
``licences`` and ``cpp`` are built from files on this machine as bench_reference.py builds them.
Writes benchmarks/results/<out>.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402
from bench_layouts import evaluator, kv_heads  # noqa: E402
from bench_quality import calibration, floats, point_args  # noqa: E402
from bench_reference import build_texts  # noqa: E402

from headprune.app import sweep as S  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.hf import collect  # noqa: E402
from headprune.ranking import select_heads  # noqa: E402
from headprune.ranking.layouts import has_grouped_queries  # noqa: E402


def run(args, specs: dict) -> dict:
    loaded = load_model(args.model)
    batches, settings = calibration(loaded, args.calib, None)
    scores = collect(loaded.model, batches, progress=False, moments=True)
    if not has_grouped_queries(scores):
        raise SystemExit(f"--models: {args.model} has no grouped queries; every KV head goes with its query head")
    points = [(r, kv) for r in args.ratios for kv in args.kv_shares if kv <= r + 1e-9]
    chosen = {p: select_heads(scores, ratio=p[0], gqa="even", kv_ratio=p[1] or None, damping=args.damping)
              for p in points}
    rows, cache = [], {}  # value moments by selection (where the value refit is the default), shared by the texts
    for text, spec in specs.items():
        point = evaluator(loaded, args.model, spec, args, batches, cache)
        rows.append({"evaluated_on": text, "ratio": 0.0, "kv_share": 0.0, "heads_pruned": 0,
                     "kv_heads": sum(scores.num_kv_heads), "quality": point.baseline_value})
        for (ratio, kv), heads in chosen.items():
            t0 = time.perf_counter()
            row = {"evaluated_on": text, "ratio": ratio, "kv_share": kv, "heads_pruned": sum(map(len, heads.values())),
                   "kv_heads": kv_heads(scores, heads), "quality": point(heads, scores, "refit"),
                   "seconds": round(time.perf_counter() - t0, 1)}
            print(row, flush=True)
            rows.append(row)
    return {"model": args.model, "metric": "perplexity", "calibration": settings, "heads_total": sum(scores.num_heads),
            "kv_heads_total": sum(scores.num_kv_heads), "eval_windows": args.eval_windows, "rows": rows}


def main(argv=None):
    ap = point_args(__doc__, evals="persuasion,python_tutorial,licences,cpp", out="kv_shares.json")
    ap.set_defaults(models="smollm2", ratios=[0.1, 0.3, 0.5])
    ap.add_argument("--kv-shares", type=floats, default=[0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5])
    ap.add_argument("--damping", type=float, default=S.DEFAULT_DAMPING)
    args = ap.parse_args(argv)
    if "," in args.models:
        raise SystemExit(f"--models: one grouped-query model, got {args.models!r}")
    args.model = args.models
    with tempfile.TemporaryDirectory() as tmp:
        specs, described, missing = build_texts(args.eval.split(","), Path(tmp))
        result = run(args, specs)
    path = write_results(args.out, {"texts": described, "missing": missing, **result})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
