"""Cost of the second moments: calibration and the whole pruning step, with and without them.

    python benchmarks/bench_calibration.py [--tokens 2048] [--seq-len 256] [--repeat 5] [--quick]
                                           [--cli-rounds 2]

On SmolLM2-135M (real weights) and calibration batches of ``--tokens`` tokens from the bundled
prose, timed alternately in one process (pairs, so a burst of load on the shared machine lands
on both halves):

* ``collect``: ``collect(model, batches)`` (entropy and output statistics only) against
  ``collect(..., moments=True)`` (plus the float64 second moments of every output
  projection's input), against one-shot collection followed by the sequential calibration at
  30% of heads as ``prune --sequential`` runs it (the default selection's count per layer;
  ``calibrate_sequentially``: one forward per layer over cached hidden states), and against
  the sequential calibration in one pass (``calibrate_sequentially(..., ratio=0.3)``: each
  layer's statistics taken with the layers before it pruned and refit, its count decided as
  the pass reaches it, in place of the collection);
* ``prune``: the whole pruning step at 30% of heads as the library ran it before second
  moments existed (collect, rank by output variance, remove with mean compensation) against
  the default now (collect with moments, rank by reconstruction error, remove with the
  least-squares refit), each on a fresh copy of the model;
* ``prune_cli``: the whole command ``headprune prune smollm2 --ratio 0.3`` with its defaults
  (load, calibrate, choose, remove, evaluate both models, time both, save, report), each run a
  fresh process, against the same command with the recipe before second moments
  (``--score variance --order low --no-reconstruct --compensate --gqa query``); ``--cli-rounds
  0`` skips it.

Prints medians, spreads and the per-pair ratios against the targets (1.3x and 1.5x) and
writes benchmarks/results/calibration_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write_results  # noqa: E402

import headprune  # noqa: E402
from headprune.app import texts  # noqa: E402
from headprune.app.load import load_model  # noqa: E402
from headprune.hf.sequential import calibrate_sequentially  # noqa: E402
from headprune.ranking import DEFAULT_GQA, unit_counts  # noqa: E402

TARGETS = {"collect_moments": 1.3, "collect_sequential": 1.3, "sequential_one_pass": 1.3, "prune": 1.5,
           "prune_cli": 1.5}
#: the recipe of ``headprune prune`` before second moments existed
BEFORE_FLAGS = ["--score", "variance", "--order", "low", "--no-reconstruct", "--compensate", "--gqa", "query"]


def cli_run(extra: list, out: Path) -> None:
    """``headprune prune smollm2 --ratio 0.3`` in a fresh process (its defaults otherwise)."""
    import subprocess

    cmd = [sys.executable, "-m", "headprune", "prune", "smollm2", "--ratio", "0.3", "--quiet", "--force",
           "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def pairs(fns: dict, repeat: int, warm: bool = True) -> dict:
    """Each function timed once per round, in rotating order; per-round ratios to the first."""
    names = list(fns)
    times = {n: [] for n in names}
    for n in names if warm else ():  # warm-up
        fns[n]()
    for r in range(repeat):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    base = names[0]
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[base])]
        out[n] = {"median_s": round(statistics.median(times[n]), 3), "min_s": round(min(times[n]), 3),
                  "max_s": round(max(times[n]), 3), "ratio_median": round(statistics.median(ratios), 3),
                  "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)}
    return out


def cli_rows(rounds: int) -> dict:
    """The whole command before and now, in rotation, each run a fresh process."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return pairs({"prune_cli_before": lambda: cli_run(BEFORE_FLAGS, Path(tmp) / "before"),
                      "prune_cli": lambda: cli_run([], Path(tmp) / "now")}, rounds, warm=False)


def calibration_rows(model, batches, repeat: int) -> dict:
    """The collection, with second moments, and the sequential calibrations, in rotation."""

    def plain():
        return headprune.collect(model, batches, progress=False)

    def moments():
        return headprune.collect(model, batches, progress=False, moments=True)

    def sequential():  # as prune --sequential --ratio 0.3 calibrates: the one-shot selection's counts
        s = headprune.collect(model, batches, progress=False, moments=True)
        heads = headprune.select_heads(s, ratio=0.3)
        return calibrate_sequentially(model, batches, s, unit_counts(heads, s, DEFAULT_GQA), gqa=DEFAULT_GQA)

    def one_pass():  # calibrate_sequentially(..., ratio=0.3): in place of the collection
        return calibrate_sequentially(model, batches, ratio=0.3, gqa=DEFAULT_GQA)

    return pairs({"collect": plain, "collect_moments": moments, "collect_sequential": sequential,
                  "sequential_one_pass": one_pass}, repeat)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cli-rounds", type=int, default=2,
                    help="rounds of the whole prune command, before and now (minutes each; 0 skips)")
    ap.add_argument("--quick", action="store_true", help="512 tokens, 2 rounds, no command rounds (smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeat, args.cli_rounds = 512, 2, 0
    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    calib, _ = texts.split(texts.load_paragraphs("persuasion"))
    batches = texts.calibration_batches(tok, calib, causal=True, samples=args.tokens // args.seq_len,
                                        seq_len=args.seq_len, batch_size=8)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    collect_rows = calibration_rows(model, batches, args.repeat)

    def prune_before():
        m = copy.deepcopy(model)
        s = headprune.collect(m, batches, progress=False)
        heads = headprune.select_heads(s, ratio=0.3, score="variance", order="low", scope="per_layer")
        headprune.prune_heads(m, heads, compensate=s)

    def prune_now():
        m = copy.deepcopy(model)
        s = headprune.collect(m, batches, progress=False, moments=True)
        heads = headprune.select_heads(s, ratio=0.3)
        headprune.prune_heads(m, heads, reconstruct=s)

    prune_rows = pairs({"prune_before": prune_before, "prune": prune_now}, args.repeat)
    rows = {**collect_rows, **prune_rows}
    if args.cli_rounds:
        rows.update(cli_rows(args.cli_rounds))
    for name, target in TARGETS.items():
        if name in rows:
            rows[name].update(target_x=target, target_met=rows[name]["ratio_median"] <= target)
    for name, r in rows.items():
        print(f"{name:20s} median {r['median_s']:7.2f} s  (min {r['min_s']:.2f}, max {r['max_s']:.2f})"
              f"  x{r['ratio_median']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]"
              + (f"  target <= {r['target_x']}: {'met' if r['target_met'] else 'NOT met'}" if "target_x" in r else ""))
    path = write_results("calibration_cpu.json", {
        "machine": machine(), "quick": args.quick, "tokens": tokens, "seq_len": args.seq_len, "repeat": args.repeat,
        "model": "smollm2", "cli_rounds": args.cli_rounds, "cli_before_flags": BEFORE_FLAGS, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
