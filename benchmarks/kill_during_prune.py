"""Kill ``headprune prune --force`` at random points: the output is never lost or half-written.

    python benchmarks/kill_during_prune.py [--trials 30] [--seed 0]

A tiny random BERT (tests/hf_tiny.py, 2 layers, a word-level tokenizer built in code) is saved
with ``save_pretrained`` into a temporary folder. A first run writes the output ``X``; then,
for each signal (SIGKILL, then SIGINT), ``--trials`` times:

1. ``headprune prune MODEL --out X --force`` starts and gets the signal after a random delay:
   for half of the trials uniform over 1.2 times a whole run, for the other half uniform over
   1.2 times the writing step (counted from the moment the staging directory ``.X.tmp-*``
   appears), where a kill can do harm; some signals land after the run has finished;
2. ``X`` must then be *old-complete* (byte for byte what it held before) or *new-complete*
   (the five entries of a finished run, every JSON file parsing, every safetensors file as
   long as its header says); anything else counts as ``neither``;
3. leftovers (entries beside ``X``) are counted, then the next run (the same command, not
   interrupted) runs, and leftovers are counted again: it must remove those of the killed run.

Each run is the CLI's ``main`` in a process forked from this one after the imports (so a run
takes about a second instead of the interpreter's start-up), which a signal ends exactly as
it would a ``headprune`` process. Writes benchmarks/results/reliability_kill.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

NEW_ENTRIES = {"model", "report.json", "report.md", "scores.json", "heatmap.png"}
SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "--eval-windows", "1", "--quiet"]


STDERR = os.devnull  # the children's stderr: a file in the run's temporary folder (see main)


def _fork(fn) -> int:
    """Run ``fn()`` (returning an exit status) in a child process, its stderr to ``STDERR``;
    returns its PID."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(os.open(STDERR, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            code = fn()
        except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    return pid


def _stderr_tail() -> str:
    try:
        with open(STDERR) as f:
            return " | ".join(f.read().strip().splitlines()[-3:])
    except OSError:
        return ""


def _wait(pid: int) -> int:
    """Exit status, or minus the signal that ended the process."""
    status = os.waitpid(pid, 0)[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def make_model(folder: Path) -> None:
    """The tiny BERT and its tokenizer, written by a child process (the parent stays free of
    torch's thread pools, so forking it stays safe)."""
    def build():
        from hf_tiny import save_tiny_bert

        save_tiny_bert(folder)
        return 0

    if _wait(_fork(build)) != 0:
        raise SystemExit("could not write the tiny model")


def start_prune(model: Path, out: Path) -> int:
    def run():
        from headprune.app.cli import main

        return main(["prune", str(model), "--count", "2", *SMALL, "--out", str(out), "--force"])

    return _fork(run)


def snapshot(d: Path):
    """``{relative path: sha256}`` of the files under ``d`` (``None`` if it is absent)."""
    if not d.is_dir():
        return None
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def new_complete(d: Path) -> bool:
    """The entries of a finished run, each JSON file parsing, each safetensors file whole."""
    if not d.is_dir() or {p.name for p in d.iterdir()} != NEW_ENTRIES or not (d / "model").is_dir():
        return False
    try:
        for p in d.rglob("*.json"):
            json.loads(p.read_text())
        weights = list((d / "model").glob("*.safetensors"))
        return bool(weights) and all(_whole_safetensors(p) for p in weights)
    except (OSError, ValueError):
        return False


def _whole_safetensors(path: Path) -> bool:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return len(data) == 8 + n + end


def leftovers(folder: Path, out: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p != out)


def timed_run(model: Path, out: Path, folder: Path) -> tuple:
    """A whole run: ``(seconds, seconds until the staging directory appeared)``."""
    t0 = time.perf_counter()
    pid, staged = start_prune(model, out), None
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if staged is None and any(n.startswith(f".{out.name}.tmp-") for n in os.listdir(folder)):
            staged = time.perf_counter() - t0
        time.sleep(0.001)
    return time.perf_counter() - t0, staged


def trial(model, out, folder, sig, delay, while_writing) -> dict:
    before = snapshot(out)
    pid, t0 = start_prune(model, out), time.perf_counter()
    if while_writing:  # wait for the writing step, then the random delay within it
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and not any(
                n.startswith(f".{out.name}.tmp-") for n in os.listdir(folder)):
            time.sleep(0.0005)
    time.sleep(max(0.0, delay - (0 if while_writing else time.perf_counter() - t0)))
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    code = _wait(pid)
    stderr = _stderr_tail()
    after = snapshot(out)
    state = "old" if after == before else "new" if new_complete(out) else "neither"
    left = leftovers(folder, out)
    next_code = _wait(start_prune(model, out))  # the next run, not interrupted
    return {"exit": code, "stderr": stderr[-300:], "state": state, "leftovers_after_kill": len(left), "leftover_names": left,
            "next_exit": next_code, "next_new_complete": new_complete(out),
            "leftovers_after_next_run": len(leftovers(folder, out))}


def summarise(rows: list) -> dict:
    return {
        "trials": len(rows),
        "old_complete": sum(r["state"] == "old" for r in rows),
        "new_complete": sum(r["state"] == "new" for r in rows),
        "neither": sum(r["state"] == "neither" for r in rows),
        "aimed_at_writing": sum(r["while_writing"] for r in rows),
        # a delay drawn within 1.2x the writing step can land after the run ended (exit 0)
        "killed_while_writing": sum(r["while_writing"] and r["exit"] != 0 for r in rows),
        "exit_codes": {str(c): sum(r["exit"] == c for r in rows) for c in sorted({r["exit"] for r in rows})},
        "trials_with_leftovers_after_kill": sum(r["leftovers_after_kill"] > 0 for r in rows),
        "leftovers_after_kill": sum(r["leftovers_after_kill"] for r in rows),
        "leftovers_after_next_run": sum(r["leftovers_after_next_run"] for r in rows),
        "next_run_failures": sum(r["next_exit"] != 0 or not r["next_new_complete"] for r in rows),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30, help="kills per signal")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    import headprune.app.cli  # noqa: F401 - imported once here, inherited by every forked run
    import headprune.app.commands  # noqa: F401
    import headprune.hf.io  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    global STDERR
    rng, t_start = random.Random(args.seed), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        STDERR = os.path.join(tmp, "child.stderr")
        model, folder = Path(tmp) / "tiny-bert", Path(tmp) / "outputs"
        folder.mkdir()
        make_model(model)
        out = folder / "X"
        runs = [timed_run(model, out, folder) for _ in range(3)]
        whole = max(r[0] for r in runs)
        writing = max(r[0] - r[1] for r in runs if r[1] is not None)
        assert new_complete(out), "the calibration runs did not write a complete output"
        results = {}
        for sig in (signal.SIGKILL, signal.SIGINT):
            rows = []
            for i in range(args.trials):
                while_writing = i % 2 == 1
                delay = rng.uniform(0, 1.2 * (writing if while_writing else whole))  # some land after the end
                rows.append({"signal": sig.name, "delay_s": round(delay, 4), "while_writing": while_writing,
                             **trial(model, out, folder, sig, delay, while_writing)})
            results[sig.name] = {"summary": summarise(rows), "runs": rows}
            print(sig.name, json.dumps(results[sig.name]["summary"]))
    from _common import write_results

    path = write_results("reliability_kill.json", {
        "what": "headprune prune --force into an existing output, killed at a random point; the output checked "
                "after each kill, leftovers counted after the kill and after the next (uninterrupted) run",
        "run_seconds": round(whole, 3), "writing_step_seconds": round(writing, 3), "seed": args.seed,
        "seconds": round(time.perf_counter() - t_start, 1),
        **{name: r["summary"] for name, r in results.items()},
        "runs": [row for r in results.values() for row in r["runs"]],
    })
    print(f"wrote {path}")
    bad = sum(r["summary"]["neither"] + r["summary"]["leftovers_after_next_run"] for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
