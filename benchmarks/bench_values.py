"""The joint refit of the kept heads' value rows and output columns (``--refit-values``,
the encoders' default) against the output-projection refit alone, under the same selection.

    python benchmarks/bench_values.py [--models minilm] [--ratios 0.1,0.3,0.5]
        [--calib persuasion:persuasion,python_tutorial,licences,cpp,perl;python_tutorial:python_tutorial]

Each ``--calib`` entry is ``calibration text:evaluation texts`` (the texts of
``bench_reference.py``, built from files of this machine where no bundled text is). For each
model and calibration the statistics and second moments are collected once (``headprune
prune``'s calibration, reference share included) and the heads chosen once per ratio (an
encoder's measured allocation is shared); then the default's heads are removed with each refit
and evaluated on every text's held-out part. Also times one value-moment collection (the
heads at the middle ratio). Writes benchmarks/results/quality_values.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402
from bench_quality import calibration, default_row, floats  # noqa: E402
from bench_reference import build_texts  # noqa: E402

import argparse  # noqa: E402

from headprune.app import texts  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.hf import collect, collect_values  # noqa: E402

DEFAULT_CALIB = ("persuasion:persuasion,python_tutorial,licences,cpp,perl;python_tutorial:python_tutorial;"
                 "licences:licences")


def run(name: str, args, plan: list, specs: dict) -> tuple:
    """``(rows, timings)``: one row per calibration, text and refit; one timing per calibration."""
    loaded = load_model(name)
    rows, timings = [], []
    for calib, evals in plan:
        batches, settings = calibration(loaded, specs[calib], None)
        settings["data"] = calib
        scores = collect(loaded.model, batches, progress=False, moments=True)
        measured = {}  # the encoder's allocation, measured once per calibration
        timed = None
        for text in evals:
            held = texts.split(texts.load_paragraphs(specs[text]))[1]
            for values in (False, True):
                rows.append(default_row(loaded, scores, batches, held, settings, ratios=args.ratios, eval_windows=16,
                                        measured=measured, model=name, calibrated_on=calib, evaluated_on=text,
                                        refit_values=values, samples=settings["samples"],
                                        reference=settings.get("reference")))
            if timed is None:
                heads = {int(k): v for k, v in rows[-1]["heads"][len(args.ratios) // 2].items()}
                t0 = time.perf_counter()
                vm = collect_values(loaded.model, batches, heads)
                timed = {"ratio": args.ratios[len(args.ratios) // 2], "seconds": time.perf_counter() - t0,
                         "bytes": sum(8 * (g.numel() + c.numel()) for g, c in zip(vm.gram.values(),
                                                                                vm.cross.values())),
                         "tokens": int(sum(g[-1, -1] for g in vm.gram.values()) / len(vm.gram))}
                t0 = time.perf_counter()
                collect(loaded.model, batches, progress=False, moments=True)
                timed["collect_seconds"] = time.perf_counter() - t0
                print(f"value moments at {timed['ratio']:.0%}: {timed['seconds']:.1f} s, "
                      f"{timed['bytes'] / 2**20:.0f} MiB (collect with moments {timed['collect_seconds']:.1f} s)",
                      flush=True)
        timings.append({"model": name, "calibrated_on": calib, **timed})
    return rows, timings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm")
    ap.add_argument("--ratios", default="0.1,0.3,0.5", type=floats)
    ap.add_argument("--calib", default=DEFAULT_CALIB, help="calibration:evaluations;... (see the module doc)")
    ap.add_argument("--out", default="quality_values.json")
    args = ap.parse_args(argv)
    plan = [(c.split(":")[0], c.split(":")[1].split(",")) for c in args.calib.split(";")]
    names = sorted({c for c, _ in plan} | {t for _, ev in plan for t in ev})
    with tempfile.TemporaryDirectory() as tmp:
        specs, described, missing = build_texts(names, Path(tmp))
        plan = [(c, [t for t in ev if t in specs]) for c, ev in plan if c in specs]
        runs = [run(name, args, plan, specs) for name in args.models.split(",")]
    path = write_results(args.out, {"texts": described, "missing": missing, "rows": [r for rs, _ in runs for r in rs],
                                    "timings": [t for _, ts in runs for t in ts]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
