"""The refit's ridge damping: the default recipe's quality at several values of ``--damping``.

    python benchmarks/bench_damping.py [--models smollm2,minilm] [--dampings 1e-4,1e-3,1e-2,1e-1,1]
        [--ratios 0.3,0.5] [--calib persuasion] [--eval persuasion,python_tutorial]

For each model the statistics and second moments are collected once on the calibration part
of ``--calib`` (the sizes of ``bench_quality.py``); then, for every damping, the default recipe
selects and removes heads with that damping (the reconstruction score ranks by the same
refit; on an encoder the measured allocation measures with it) and the quality is taken on
the held-out part of each evaluation text, as ``bench_quality.py`` takes it. Writes
benchmarks/results/quality_damping.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402
from bench_quality import calibration, default_row, point_args  # noqa: E402

from headprune.app import sweep as S  # noqa: E402
from headprune.app import texts  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.hf import collect  # noqa: E402


def run(name: str, args) -> list:
    loaded = load_model(name)
    batches, settings = calibration(loaded, args.calib, None)
    scores = collect(loaded.model, batches, progress=False, moments=True)
    held = {text: texts.split(texts.load_paragraphs(text))[1] for text in args.eval.split(",")}
    rows = []
    for damping in args.dampings:
        t0, measured = time.perf_counter(), {}  # an encoder's allocation is measured once per damping
        for text, paragraphs in held.items():
            rows.append(default_row(loaded, scores, batches, paragraphs, settings, ratios=args.ratios,
                                    eval_windows=args.eval_windows, measured=measured, model=name, damping=damping,
                                    calibrated_on=args.calib, evaluated_on=text))
        rows[-1]["seconds"] = time.perf_counter() - t0
    return rows


def main(argv=None):
    ap = point_args(__doc__, evals="persuasion,python_tutorial", out="quality_damping.json")
    ap.add_argument("--dampings", default="1e-4,1e-3,1e-2,1e-1,1")
    args = ap.parse_args(argv)
    args.dampings = [float(d) for d in args.dampings.split(",")]
    rows = [row for name in args.models.split(",") for row in run(name, args)]
    path = write_results(args.out, {"default_damping": S.DEFAULT_DAMPING, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
