"""Pruning quality: every recipe against random pruning under the same removal, on both real
models, calibrated on one text and evaluated on the held-out part of the same text and of
texts of other kinds, through headprune's own pipeline.

    python benchmarks/bench_quality.py [--models minilm,smollm2] [--calib persuasion]
        [--eval persuasion,python_tutorial] [--ratios 0.1,0.2,0.3,0.4,0.5] [--seeds 3] [--random-protect]
        [--recipes "default;reconstruction (OBS), per layer"] [--out quality.json] [--quick]

For each model and calibration text (its first 70% of paragraphs; several comma-separated
texts with ``+`` between them are mixed: ``persuasion+python_tutorial``), the statistics and
second moments are collected once; then for every evaluation text (its held-out last 30%) and
ratio, each recipe's heads are masked (exact, so one loaded model serves every point) with its
removal (a least-squares refit unless the recipe says otherwise) and the quality measured:
perplexity for SmolLM2 (lower is better), embedding fidelity to the unpruned model for MiniLM
(higher is better). The random baseline draws --seeds selections per ratio, spread over the
layers like the default, with the same removal (with --random-protect, keeping the layers the
default keeps whole: a causal LM's first). Writes benchmarks/results/<out>.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_results  # noqa: E402

from headprune.app import sweep as S  # noqa: E402
from headprune.app.sweep_table import sweep_markdown  # noqa: E402
from headprune.ranking import DEFAULT_GQA  # noqa: E402
from headprune.app import texts  # noqa: E402
from headprune.app.commands import DEFAULTS  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.hf import collect  # noqa: E402


def calibration(loaded, spec: str, samples: int | None, reference: float = texts.DEFAULT_REFERENCE):
    """Batches from the calibration part of one text, or of several joined by ``+`` (an equal
    share of the samples each), with ``prune``'s reference share from the bundled texts the
    spec does not name (``--reference``)."""
    causal = loaded.kind == "causal"
    n, seq = samples or DEFAULTS[loaded.kind]["samples"], DEFAULTS[loaded.kind]["seq_len"]
    parts, _ = texts.load_split(spec)
    batches, ref = texts.calibration_set(loaded.tokenizer, parts, spec, causal=causal, samples=n, seq_len=seq,
                                         reference=reference)
    return batches, {"data": spec, "samples": n, "seq_len": seq, **ref}


def default_row(loaded, scores, batches, paragraphs, settings: dict, *, ratios: list, eval_windows: int,
                measured: dict, **fields) -> dict:
    """The default recipe on one held-out text, no random draws, as a results row: ``fields``
    (``model`` and ``evaluated_on`` among them; ``damping``, if there, the refit's; ``refit_values``,
    if there, whether the refit includes value rows, else the default's), the metric, the
    unpruned baseline, the values and heads by ratio; printed as measured. ``measured``: an
    encoder's allocation (and value moments), shared by the calls of one calibration."""
    config = S.SweepConfig(model=fields["model"], ratios=ratios, seeds=0, gqa=DEFAULT_GQA,
                           damping=fields.get("damping", S.DEFAULT_DAMPING), values=fields.get("refit_values"),
                           eval_windows=eval_windows, quiet=True)
    result = S.run_sweep(config, loaded, scores, paragraphs, {**settings, "evaluated_on": fields["evaluated_on"]},
                         {"default": {}}, batches=batches, measured=measured,
                         values_cache=measured.setdefault(("values", id(batches)), {}))
    row = {**fields, "metric": result["metric"], "lower_is_better": result["lower_is_better"],
           "baseline": result["baseline"], "ratios": ratios, "values": result["recipes"]["default"],
           "heads": result["heads"]["default"], "eval_windows": eval_windows}
    print(" ".join(f"{k}={v}" for k, v in fields.items()) + f": baseline {row['baseline']:.4g}; "
          + ", ".join(f"{r:.0%} {v:.4g}" for r, v in zip(ratios, row["values"])), flush=True)
    return row


def floats(text: str) -> list:
    """``"0.3,0.5"`` -> ``[0.3, 0.5]`` (a comma-separated option)."""
    return [float(v) for v in text.split(",")]


def point_args(doc: str, *, evals: str, out: str) -> argparse.ArgumentParser:
    """The options of the benchmarks built on :func:`default_row`: models, ratios, one
    calibration text, evaluation texts, windows and the results file."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--ratios", default="0.3,0.5", type=floats)
    ap.add_argument("--calib", default="persuasion")
    ap.add_argument("--eval", default=evals)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out perplexity windows (causal LMs)")
    ap.add_argument("--out", default=out)
    return ap


def run(loaded, model_name: str, calib: str, evals: list, args, recipes: dict) -> list:
    batches, settings = calibration(loaded, calib, args.samples, args.reference)
    t0 = time.perf_counter()
    scores = collect(loaded.model, batches, progress=False, moments=True)
    seconds = time.perf_counter() - t0
    out, measured, values = [], {}, {}  # measured allocations' layer costs and value moments, shared by the texts
    for text in evals:
        _, held = texts.split(texts.load_paragraphs(text))
        config = S.SweepConfig(model=model_name, ratios=args.ratios, seeds=args.seeds, gqa=args.gqa,
                               random_protect=args.random_protect,
                               eval_windows=args.eval_windows, eval_paragraphs=args.eval_paragraphs,
                               damping=args.damping)
        result = S.run_sweep(config, loaded, scores, held, {**settings, "evaluated_on": text}, recipes,
                             batches=batches, measured=measured, values_cache=values)
        result.update(calibrated_on=calib, evaluated_on=text, collect_seconds=seconds,
                      **({"eval_windows": args.eval_windows} if loaded.kind == "causal" else {}))
        print(f"calibrated on {calib}:\n" + sweep_markdown(result), flush=True)
        out.append(result)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--calib", default="persuasion", help="calibration texts, comma-separated (a+b mixes a and b)")
    ap.add_argument("--eval", default="persuasion,python_tutorial", help="evaluation texts (their held-out part)")
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--random-protect", action="store_true",
                    help="the random draws keep the default's protected layers whole (a causal LM's first layer)")
    ap.add_argument("--gqa", default=DEFAULT_GQA)
    ap.add_argument("--damping", type=float, default=S.DEFAULT_DAMPING)
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default: headprune.app.commands.DEFAULTS, prune's)")
    ap.add_argument("--reference", type=float, default=texts.DEFAULT_REFERENCE,
                    help="share of the calibration sequences from the bundled texts --calib does not name (prune's "
                         "--reference)")
    ap.add_argument("--eval-windows", type=int, default=32, help="held-out perplexity windows (causal LMs)")
    ap.add_argument("--eval-paragraphs", type=int, default=None, help="held-out paragraphs for fidelity (encoders)")
    ap.add_argument("--recipes", default=None, help="semicolon-separated names of headprune.app.sweep.RECIPES (or ONE_PASS_RECIPE)")
    ap.add_argument("--learn-steps", type=int, default=0,
                    help="add learned hard-concrete gates (headprune.app.sweep.LEARNED_RECIPE), this many steps per "
                         "ratio, trained once per model, calibration and ratio and shared by the evaluation texts")
    ap.add_argument("--learn-batch", type=int, default=None,
                    help="sequences per learned-gate step (default: the calibration batches as they are, 8)")
    ap.add_argument("--learn-lr", type=float, default=0.05, help="Adam learning rate of the gates' log alpha")
    ap.add_argument("--learn-seconds", type=float, default=None, help="time budget of each gate training")
    ap.add_argument("--quick", action="store_true", help="2 ratios, 1 seed, small calibration (smoke run)")
    ap.add_argument("--out", default="quality.json", help="results file under benchmarks/results")
    args = ap.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if args.quick:
        args.ratios, args.seeds, args.samples, args.eval_windows = args.ratios[:2], 1, 16, 8
    named = {**S.RECIPES, **S.ONE_PASS_RECIPE}
    recipes = S.RECIPES if args.recipes is None else {n.strip(): named[n.strip()] for n in args.recipes.split(";")}
    results = []
    for m in args.models.split(","):
        loaded = load_model(m)
        for calib in args.calib.split(","):
            if args.learn_steps:
                learned = {"steps": args.learn_steps, "lr": args.learn_lr, "cache": {},
                           **({"batch_size": args.learn_batch} if args.learn_batch else {}),
                           **({"time_budget_s": args.learn_seconds} if args.learn_seconds else {})}
                recipes = {**recipes, **{k: {**kw, "learned": learned} for k, kw in S.LEARNED_RECIPE.items()}}
            results += run(loaded, m, calib, args.eval.split(","), args, recipes)
    path = write_results(args.out, {"quick": args.quick, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
