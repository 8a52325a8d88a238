"""Hostile model directories: is every damaged or hostile one refused cleanly, or loaded right?

    python benchmarks/hostile_dirs.py [--only SUBSTRING] [--timeout 60] [--memory-gb 3]

Builds directories of tiny random models (tests/hf_tiny.py), each with a word-level tokenizer:
``gpt2`` (pruned unevenly: only ``load_pruned`` can rebuild it), ``llama`` (pruned uniformly:
plain-loadable), ``bert`` (saved unpruned by ``save_pruned``), ``t5`` (pruned unevenly; loaded
only, the CLI does not evaluate seq2seq models) and ``hf-bert`` (a plain Hugging Face directory
written by ``save_pretrained``). From them it derives variants: missing, empty, truncated and
corrupt files, wrong types and values in every headprune.json field, huge declared shapes in
the configs and in the safetensors headers, symlinks and FIFOs in place of files, pickles that
run code, code referenced from config.json's and tokenizer_config.json's ``auto_map``.

Each variant runs twice, each time in a forked child process under a memory limit (RLIMIT_AS,
``--memory-gb`` above what the child holds at the start) and a timeout, with name lookups and
socket connects blocked and recorded: ``headprune.load_pruned`` (``headprune.app.load.load_model``
for the ``hf-bert`` directories) and ``headprune eval`` (in-process ``headprune.app.cli.main``).
Outcomes: ``refused`` (an error type the CLI reports, with a one-line message; for eval exit
status 2 and a single line ``headprune eval: error: ...``), ``loaded`` (bit-exact: the outputs of
the saved model; for eval exit status 0 where the CLI's loader gives those outputs), ``loaded wrong``,
``crashed`` (another exception, a multi-line message, a signal), ``timed out``, ``exceeded
memory`` (MemoryError or an allocator failure), ``executed code`` (a payload's marker file
appeared) and ``reached network``. Every variant must end ``refused`` or ``loaded``.
Writes benchmarks/results/reliability_load.json (a full run only) with each variant's outcomes,
messages, seconds and the memory the child added (peak RSS above its start), and the totals.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "python")]

import torch  # noqa: E402  (imported before forking: each child starts warm)
import transformers  # noqa: E402

import headprune.app.cli  # noqa: E402
import headprune.app.load  # noqa: E402
import headprune.hf  # noqa: E402
from _common import table, write_results  # noqa: E402
from _hostile_variants import variants  # noqa: E402

REFUSALS = (FileNotFoundError, ValueError, TypeError, FileExistsError, PermissionError)  # what the CLI reports
GOOD = ("refused", "loaded")
IDS = [[2, 3, 4, 5, 6, 7]]


# ---- base directories (built in a child: the parent runs no torch kernels before forking) -----------


def _tokenizer():
    import tokenizers

    words = "the a of and to in was her she it he had not be is that with for as on at by this".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                                eos_token="</s>")


#: base directory -> (family, heads pruned: {site: [heads]})
BASE_MODELS = {"gpt2": ("gpt2", {0: [0, 1]}), "llama": ("llama", {0: [2, 3], 1: [2, 3]}), "bert": ("bert", {}),
               "t5": ("t5", {0: [1], 3: [0, 2]}), "hf-bert": ("bert", {})}


def build_bases(root: Path) -> None:
    """The base directories and their models' outputs. Causal models carry their LM head, as
    ``headprune prune`` saves them; ``hf-*`` ones are written by ``save_pretrained``."""
    from hf_tiny import tiny_config

    from headprune.hf import prune_heads, save_pruned

    torch.set_num_threads(1)  # as in the children: outputs are compared bit for bit
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tok, refs = _tokenizer(), {}
    for name, (family, heads) in BASE_MODELS.items():
        torch.manual_seed(0)
        auto = transformers.AutoModelForCausalLM if family in ("gpt2", "llama") else transformers.AutoModel
        model = auto.from_config(tiny_config(family), attn_implementation="sdpa").eval()
        prune_heads(model, heads) if heads else None
        if name.startswith("hf-"):
            model.save_pretrained(root / name)
            tok.save_pretrained(root / name)
        else:
            save_pruned(model, root / name, tokenizer=tok)
        refs[name] = _output(model)
    torch.save(refs, root / "refs.pt")


def _output(model) -> torch.Tensor:
    ids = torch.tensor(IDS)
    kw = {"decoder_input_ids": ids} if model.config.model_type == "t5" else {}
    with torch.no_grad():
        out = model(input_ids=ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---- running one variant in a child -------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def _limit_memory(extra_gb: float) -> None:
    limit = _status_bytes("VmSize") + int(extra_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _block_network(flag: Path) -> None:
    """Name lookups and connects fail and leave ``flag`` behind."""
    def refuse(*args, **kwargs):
        flag.touch()
        raise OSError("network blocked by hostile_dirs.py")

    socket.getaddrinfo = socket.gethostbyname = refuse
    socket.socket.connect = socket.socket.connect_ex = refuse


def _child(task, path, root, extra_gb, conn):
    """Runs ``task`` on ``path``; sends (outcome, message, seconds, MB of peak memory added)."""
    start = _status_bytes("VmRSS")
    _limit_memory(extra_gb)
    _block_network(root / "markers" / "network")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        result = _load(path, root) if task == "load" else _eval(path, root)
    except MemoryError:
        result = ("exceeded memory", "MemoryError")
    except BaseException as e:  # noqa: BLE001 - classifying every way a load can end is the point
        message = f"{type(e).__name__}: {e}"
        memory = "can't allocate memory" in message or "bad_alloc" in message
        result = ("exceeded memory" if memory else "refused" if isinstance(e, REFUSALS) and "\n" not in str(e)
                  else "crashed", message[:300])
    conn.send((*result, time.perf_counter() - t0, (_status_bytes("VmHWM") - start) / (1 << 20)))


def _same(model, path: Path, root: Path) -> bool:
    """Whether ``model`` computes what the model saved in the base directory computed."""
    ref, out = torch.load(root / "refs.pt")[_base_of(path)], _output(model)
    return out.shape == ref.shape and torch.equal(out, ref)


def _load(path: Path, root: Path) -> tuple:
    """``load_pruned`` (the CLI's loader for plain Hugging Face directories)."""
    if _base_of(path).startswith("hf-"):
        model = headprune.app.load.load_model(str(path)).model
    else:
        model = headprune.hf.load_pruned(path)
    return ("loaded", "") if _same(model, path, root) else ("loaded wrong", "outputs differ from the saved model's")


def _eval(path: Path, root: Path) -> tuple:
    """``headprune eval``; a run that ends well counts as loaded if the CLI's loader gives the
    saved model's outputs."""
    try:
        same = _same(headprune.app.load.load_model(str(path)).model, path, root)
    except Exception:  # then the CLI must refuse it
        same = None
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = headprune.app.cli.main(["eval", str(path), "--quiet", "--data", str(root / "text.txt"),
                                       "--eval-windows", "1"])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        return ("loaded", "") if same else ("loaded wrong", "eval ran on a model unlike the saved one")
    if code == 2 and len(lines) == 1 and lines[0].startswith("headprune eval: error: "):
        return "refused", lines[0].removeprefix("headprune eval: error: ")[:300]
    return "crashed", f"exit {code}: " + " | ".join(lines)[:300]


def _base_of(path: Path) -> str:
    return path.name.split("__")[0]


def run(task: str, path: Path, root: Path, timeout: float, extra_gb: float) -> dict:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(task, path, root, extra_gb, child))
    p.start()
    child.close()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return {"outcome": "timed out", "message": f"killed after {timeout:.0f} s"}
    if not parent.poll():
        return {"outcome": "crashed", "message": f"died with exit code {p.exitcode}"}
    outcome, message, seconds, peak = parent.recv()
    message = message.replace(str(root), "$DIR")  # the temporary directory, the same in every run
    return {"outcome": outcome, "message": message, "seconds": round(seconds, 2), "peak_extra_mb": round(peak)}


def _flags(root: Path) -> list:
    found = [f for f in (root / "markers").iterdir()]
    for f in found:
        f.unlink()
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the variants whose name contains this (writes no results)")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--memory-gb", type=float, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        return _run_all(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _prepare(root: Path, todo: list) -> None:
    """Bases and variants, written in a child (torch kernels run there, not in the parent)."""
    def work():
        build_bases(root)
        for name, base, edit in todo:
            d = root / "variants" / name.replace("/", "__")
            if edit == "symlink":
                d.symlink_to(root / base)
                continue
            shutil.copytree(root / base, d, symlinks=True)
            if edit is not None:
                edit(d)

    (root / "markers").mkdir()
    (root / "variants").mkdir()
    (root / "text.txt").write_text("\n\n".join(f"the {w} of her and it was not {i} a" for i, w in enumerate(
        ["she", "he", "that", "this", "with", "for", "as", "on", "at", "by"] * 3)))
    p = multiprocessing.get_context("fork").Process(target=work)
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"building the directories failed (exit {p.exitcode})")


def _run_all(root: Path, args) -> int:
    todo = [v for v in variants(BASE_MODELS, root / "markers") if args.only in v[0]]
    t0 = time.perf_counter()
    _prepare(root, todo)
    rows = []
    for name, base, _ in todo:
        path = root / "variants" / name.replace("/", "__")
        row = {"variant": name, "base": base}
        tasks = ["load"] + ([] if base == "t5" else ["eval"])
        for task in tasks:
            r = run(task, path, root, args.timeout, args.memory_gb)
            flags = _flags(root)
            if any(f.name == "network" for f in flags):
                r = {**r, "outcome": "reached network"}
            elif flags:
                r = {**r, "outcome": "executed code", "message": f"created {[f.name for f in flags]}"}
            row[task] = r
        rows.append(row)
        print(f"{name:55s} " + "  ".join(f"{t}: {row[t]['outcome']:10s}" for t in tasks), flush=True)
    return _report(rows, time.perf_counter() - t0, args)


def _report(rows: list, seconds: float, args) -> int:
    totals = {}
    for task in ("load", "eval"):
        counts: dict = {}
        for r in rows:
            if task in r:
                counts[r[task]["outcome"]] = counts.get(r[task]["outcome"], 0) + 1
        totals[task] = counts
    bad = [f"{r['variant']} ({t}: {r[t]['outcome']}: {r[t].get('message', '')})" for r in rows for t in ("load", "eval")
           if t in r and r[t]["outcome"] not in GOOD]
    print()
    print(table([{"task": t, **c} for t, c in totals.items()], ["task", *sorted({k for c in totals.values() for k in c})]))
    peak = max(r[t].get("peak_extra_mb", 0) for r in rows for t in ("load", "eval") if t in r)
    print(f"\n{len(rows)} variants in {seconds:.0f} s; largest memory a child added {peak} MB; "
          f"{'all refused or loaded' if not bad else f'{len(bad)} NOT refused or loaded:'}")
    for line in bad:
        print("  " + line)
    if not args.only:
        write_results("reliability_load.json", {
            "variants": len(rows), "seconds": round(seconds), "timeout_s": args.timeout,
            "memory_limit_gb": args.memory_gb, "totals": totals, "not_refused_or_loaded": bad,
            "max_peak_extra_mb": peak, "results": rows})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
