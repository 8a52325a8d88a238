"""Recovery after pruning: how much of the quality one-shot pruning lost a short distillation
(:func:`headprune.hf.recover`) wins back, within a CPU time budget.

    python benchmarks/bench_recover.py [--models smollm2,minilm] [--minutes 10]
        [--configs attention:default,o_proj:1e-4] [--validation 0.1] [--ratio 0.5] [--out recover.json]

For each model: the CLI's default calibration batches (the bundled prose and tutorial in equal
shares, and ``--reference`` of them from the bundled code, as many sequences as ``headprune prune``
takes by default: ``headprune.app.commands.DEFAULTS``), the default one-shot pruning of
``--ratio`` of the heads (statistics with second moments, the default recipe and allocation,
measured for encoders, least-squares refit, of the value rows too where that is the default), then
for each ``train:lr`` configuration (``default``: the library's learning rate for the kind of
model) a fresh copy of the pruned model distilled toward the unpruned one (on every calibration
sequence of the text, or ``--recover-samples`` of them) for ``--minutes`` of
wall time on this machine's threads (or ``--steps``; ``--trace-every`` then records the held-out
quality of the weights being trained along the way), in steps of the CLI's default size, with ``--validation``
of the batches kept out of training to choose the best step, as ``headprune recover`` does. Quality, measured in the
same run for the unpruned, pruned and each recovered model: perplexity (lower is better) on the
held-out text and on the calibration text (overfitting shows as a gap between the two), or, for
MiniLM, embedding fidelity to the unpruned model (higher is better) on the held-out and
calibration paragraphs, and on ``--other-text`` when given.
``gap_closed``: the fraction of the pruning's loss won back (1 = the unpruned quality).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write_results  # noqa: E402
from bench_quality import calibration  # noqa: E402

from headprune import select_heads, select_measured  # noqa: E402
from headprune.app import evaluate as E  # noqa: E402
from headprune.app import texts  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.app.recover_command import STEP_SEQUENCES, gap_closed, recovery_batches, split_validation  # noqa: E402
from headprune.hf import collect, collect_values, prune_heads, recover  # noqa: E402
from headprune.hf.values import refits_values_by_default  # noqa: E402
from headprune.ranking.recipes import default_allocation  # noqa: E402

def quality(model, loaded, paragraphs, reference, windows) -> float:
    if loaded.kind == "causal":
        return E.perplexity(model, loaded.tokenizer, paragraphs, max_windows=windows)["perplexity"]
    emb = E.embed(model, loaded.tokenizer, paragraphs)
    return torch.nn.functional.cosine_similarity(emb, reference, dim=-1).mean().item()


def prune_default(teacher, batches, ratio: float) -> tuple:
    """``(pruned copy, heads, scores, values refit)``: what ``headprune prune`` does by default
    (the measured allocation on encoders, the least-squares refit, with the kept heads' value
    rows where that is the model's default)."""
    scores = collect(teacher, batches, moments=True, progress=False)
    pruned = copy.deepcopy(teacher)
    if default_allocation(scores) == "measured":
        heads, _ = select_measured(teacher, batches, scores, ratio=ratio)
    else:
        heads = select_heads(scores, ratio=ratio)
    values = collect_values(teacher, batches, heads, progress=False) if refits_values_by_default(teacher) else None
    prune_heads(pruned, heads, reconstruct=scores, values=values)
    return pruned, heads, scores, values is not None


def run(name: str, args) -> dict:
    loaded = load_model(name)
    teacher, kind = loaded.model, loaded.kind
    parts, held = texts.load_split(texts.DEFAULT_TEXT)
    calib = texts.interleave(parts)  # like held
    # the selection's calibration as headprune prune takes it, the reference share included
    batches, settings = calibration(loaded, texts.DEFAULT_TEXT, None, args.reference)
    # smaller steps, more of them per CPU-minute
    step_size = args.batch_size or STEP_SEQUENCES[kind]
    # what headprune recover trains on: every calibration sequence, unless --recover-samples
    train_on = recovery_batches(loaded, parts, args.recover_samples, settings["seq_len"], step_size, "cpu")
    steps_on, validation = split_validation(train_on, args.validation)
    paragraphs = {"held_out": held[: args.paragraphs], "calibration": calib[: args.paragraphs]}
    if args.other_text:  # a text of another kind, none of it trained on
        paragraphs["other"] = texts.load_paragraphs(args.other_text)[: args.paragraphs]
    refs = {k: None if kind == "causal" else E.embed(teacher, loaded.tokenizer, p) for k, p in paragraphs.items()}

    def measure(model) -> dict:
        return {k: quality(model, loaded, p, refs[k], args.windows) for k, p in paragraphs.items()}

    t0 = time.perf_counter()
    pruned, heads, scores, refit_values = prune_default(teacher, batches, args.ratio)
    prune_s = time.perf_counter() - t0
    rows = [{"model": "unpruned", **measure(teacher)}, {"model": "pruned", **measure(pruned)}]
    for config in args.configs.split(","):
        train, lr = config.split(":")
        student = copy.deepcopy(pruned)
        trace = []

        def watch(step, steps, loss, student=student):
            if args.trace_every and step % args.trace_every == 0:  # the trained weights, not the best kept
                trace.append({"step": step, "held_out": measure(student)["held_out"]})

        report = recover(student, teacher, steps_on, steps=args.steps or 10**6, train=train,
                         lr=None if lr == "default" else float(lr), validation=validation, progress=watch,
                         time_budget_s=None if args.steps else args.minutes * 60)
        rows.append({"model": f"recovered {train} lr={lr}", **measure(student), **report.to_dict(),
                     **({"trace": trace} if trace else {})})
        print(f"{name} {config}: {report}", flush=True)
        del student
    for row in rows:
        for k in paragraphs:
            closed = gap_closed({"unpruned": rows[0][k], "pruned": rows[1][k], "recovered": row[k]},
                                "perplexity" if kind == "causal" else "fidelity")  # the report's measure
            row[f"{k}_gap_closed"] = float("nan") if closed is None else closed
    metric = "perplexity" if kind == "causal" else "fidelity"
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    print(f"\n{name}: {metric}, {args.ratio:.0%} of heads pruned, {budget} of recovery, "
          f"{torch.get_num_threads()} threads")
    cols = ["model", *(c for k in paragraphs for c in (k, f"{k}_gap_closed")), "steps", "best_step", "seconds"]
    print(table([{c: (f"{r[c]:.4f}" if isinstance(r.get(c), float) else r.get(c, "")) for c in cols} for r in rows],
                cols) + "\n", flush=True)
    return {"model": name, "kind": kind, "metric": metric, "ratio": args.ratio, "heads_pruned": sum(map(len, heads.values())),
            "heads_total": sum(scores.num_heads), "refit_values": refit_values, "prune_seconds": prune_s, "minutes": args.minutes,
            "steps": args.steps, "trace_every": args.trace_every,
            "trained_on": texts.sequences(train_on), "recover_samples": args.recover_samples,
            "calibration": settings, "batch_size": step_size, "validation": args.validation,
            "validation_batches": 0 if validation is None else len(validation),
            "eval_windows": args.windows if kind == "causal" else None,
            "eval_paragraphs": args.paragraphs, "other_text": args.other_text_name or args.other_text, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--minutes", type=float, default=10.0, help="recovery wall time per configuration")
    ap.add_argument("--configs", default="attention:default",
                    help="train:lr pairs, comma-separated (lr 'default': the library's for the kind of model)")
    ap.add_argument("--validation", type=float, default=0.1,
                    help="fraction of the calibration batches kept out of training to choose the best step (0: none)")
    ap.add_argument("--steps", type=int, default=None,
                    help="train for this many steps instead of --minutes (for --trace-every)")
    ap.add_argument("--trace-every", type=int, default=0,
                    help="also measure the held-out quality of the weights being trained every this many steps")
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows of 256 tokens per text")
    ap.add_argument("--paragraphs", type=int, default=None, help="paragraphs per text (default all)")
    ap.add_argument("--other-text", default=None, metavar="TEXT",
                    help="also measure quality on this text (any --data form), a kind of text not trained on")
    ap.add_argument("--other-text-name", default=None, help="what the results file calls --other-text")
    ap.add_argument("--recover-samples", type=int, default=None,
                    help="calibration sequences recovery trains on (default: every one, as headprune recover)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", type=float, default=texts.DEFAULT_REFERENCE,
                    help="share of the selection's calibration sequences from the bundled texts the default text does "
                         "not name (prune's --reference)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per recovery step (default: headprune recover's, 1 for causal LMs, 2 for encoders)")
    ap.add_argument("--out", default="recover.json", help="results file under benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run(m, args) for m in args.models.split(",")]
    print(f"wrote {write_results(args.out, {'results': results})}")


if __name__ == "__main__":
    main()
