"""``headprune`` command line: scan, prune, recover, eval, sweep.

Every argument error, and every write error (a full disk, a file-size limit, a read-only
folder), exits with status 2 and one line naming the problem. An output directory holds its
old contents or the complete new ones at every instant, even if the process is killed:
outputs are written to a temporary sibling directory that takes its place in one step, and
what a killed run leaves behind is removed by the next run into the same folder.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import textwrap
import warnings
from contextlib import contextmanager

from . import arguments as A
from .recipe_text import describe_recipe
from .texts import DEFAULT_REFERENCE


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (no usage block), exit status 2."""

    _argv: list = []  # what parse_args was given, for error()

    def error(self, message):
        if message.startswith(("the following arguments are required", "one of the arguments")):
            unknown = self._unknown_options()  # a mistyped --ratio reads as none given: the typo is the news
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)} ({message})"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _unknown_options(self) -> list:
        """The ``--options`` after this (sub)command's name that none of its options begins with."""
        name = self.prog.split()[-1]
        words = _Parser._argv[_Parser._argv.index(name) + 1:] if name in _Parser._argv else _Parser._argv
        known = list(self._option_string_actions)
        return [w for w in words if w.startswith("--") and not any(k.startswith(w.split("=")[0]) for k in known)]

    def parse_args(self, args=None, namespace=None):
        """Unrecognized arguments are reported by the command they were given to
        (``headprune prune: error: ...``), not by the top level."""
        _Parser._argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        args, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            commands.get(getattr(args, "command", None), self).error(f"unrecognized arguments: {' '.join(extra)}")
        return args


DESCRIPTION = """Attention-head pruning for transformers models. One forward pass over calibration text
measures, per attention head, the Shannon entropy of its attention rows (nats) and the
statistics of its output, without materialising attention maps; headprune then chooses heads,
removes them (physically, or by an exact reversible mask), refits what remains, evaluates on
held-out text and saves the smaller model with a report."""


def _default_recipe() -> str:
    return textwrap.fill(
        "The default recipe: " + describe_recipe(select={}, removal="refit", sequential=False)
        + " (encoders: heads removed one at a time, each the one whose removal costs the whole model least on "
        "calibration sequences, each layer's share measured the same way (--scope measured), and the kept heads' "
        "value rows refit with the output projection: --refit-values)"
        + f"; {DEFAULT_REFERENCE:.0%} of the calibration sequences from the bundled texts of the kinds --data is "
        "not (--reference)"
        + ". --score entropy --scope global --no-reconstruct --no-compensate is the entropy formula as written, "
        "which measured far worse than random on a modern LLM (docs/quality.md).", width=94)


def build_parser() -> argparse.ArgumentParser:
    try:
        from importlib.metadata import version
        __version__ = version("headprune")
    except Exception:  # not installed (source tree on sys.path)
        __version__ = "unknown"

    ap = _Parser(prog="headprune", description=DESCRIPTION, epilog=_default_recipe(),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"headprune {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub_kw = {"formatter_class": argparse.RawDescriptionHelpFormatter}
    scan = sub.add_parser("scan", help="collect per-head attention entropies (scores.json, summary.md, heatmap.png)",
                          description="Collect per-head attention entropies and output statistics.", **sub_kw)
    A.model_args(scan)
    A.data_args(scan, calibrates=True, evaluates=False)
    A.output_args(scan, "scan")
    scan.add_argument("--resume", action="store_true",
                      help="continue an interrupted scan from its checkpoint (.<out>.checkpoint.json beside --out)")
    prune = sub.add_parser("prune", help="collect, choose, prune, evaluate, save, report",
                           description="Prune heads and save the smaller model with a report.\n\n" + _default_recipe(),
                           **sub_kw)
    A.model_args(prune, saves=True)
    A.data_args(prune, calibrates=True, refits=True)
    A.selection_args(prune)
    A.removal_args(prune)
    A.prune_output_args(prune)
    A.eval_args(prune)
    A.prune_recover_args(prune)
    A.output_args(prune, "prune")
    rec = sub.add_parser("recover", help="distil a pruned directory toward its unpruned model (recovery)",
                         description="Train the attention projections (q, k, v, o) of a model pruned by headprune prune "
                                     "to match the unpruned model's outputs on calibration text (KL divergence of "
                                     "next-token distributions; encoders: cosine of pooled embeddings), and "
                                     "save it with its quality before and after, on held-out and calibration text.",
                         **sub_kw)
    A.recover_args(rec)
    A.eval_args(rec)
    A.output_args(rec, "recover", distributed=False)
    _export_parser(sub, sub_kw)
    _eval_parser(sub, sub_kw)
    sweep = sub.add_parser("sweep", help="quality against the fraction pruned: every recipe against random",
                           description="Quality against the fraction of heads pruned, for the named recipes and a "
                                       "seeded random baseline under the same removal.", **sub_kw)
    A.model_args(sweep)
    A.data_args(sweep, calibrates=True, refits=True)
    A.sweep_args(sweep)
    A.removal_args(sweep, sequential=False)
    A.eval_args(sweep)
    A.output_args(sweep, "sweep")
    sweep.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep from the points it measured (.<out>.sweep-journal.json "
                            "beside --out)")
    return ap


def _eval_parser(sub, sub_kw: dict) -> None:
    """``headprune eval MODEL``."""
    p = sub.add_parser("eval", help="quality and speed of a model or a pruned directory",
                       description="Quality (perplexity or embedding statistics) on held-out text, and speed.", **sub_kw)
    A.model_args(p)
    A.data_args(p, calibrates=False)
    A.eval_args(p)
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="the unpruned model: an encoder's fidelity is measured against it, a causal LM's perplexity "
                        "beside it (default for an encoder: the model named in the report.json of a directory "
                        "written by prune or recover)")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                   help="time forward passes (default on; a figure from a shared machine varies between runs)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _export_parser(sub, sub_kw: dict) -> None:
    """``headprune export MODEL --gguf FILE``."""
    p = sub.add_parser("export", help="write a (pruned) Llama-family model as a GGUF for llama.cpp",
                       description="Write MODEL (a directory written by headprune prune or recover, a pruned or "
                                   "Hugging Face directory, or a .gguf) as a GGUF for llama.cpp: its attention in the "
                                   "source's quantisation, every other field, tokenizer and tensor copied from "
                                   "--source, a GGUF of the unpruned model (found by itself where MODEL or its prune "
                                   "was read from one). Per-layer head counts are written as llama.cpp's deci "
                                   "architecture.", **sub_kw)
    p.add_argument("model", metavar="MODEL",
                   help="a directory written by headprune prune or recover, a pruned or Hugging Face model directory, "
                        f"a .gguf file or a bundled name ({', '.join(A.BUNDLED_MODELS)})")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--source", default=None, metavar="GGUF",
                   help="a GGUF of the unpruned model: fields, tokenizer and the tensors pruning does not touch are "
                        "copied from it (default: the GGUF MODEL, or the unpruned model its report names, was read from)")
    p.add_argument("--gguf-dtype", default="auto", choices=("auto", "float16", "float32"),
                   help="the attention tensors' type: auto (the source's quantisation where the gguf package writes "
                        "it, else float16), float16 or float32 (default auto)")
    p.add_argument("--architecture", default="auto", choices=("auto", "llama", "deci"),
                   help="llama.cpp's llama (one head count for every layer) or deci (per-layer head counts); auto: "
                        "llama where every layer keeps the same heads (default auto)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--quiet", action="store_true", help="no stage messages (errors still print)")


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from . import commands, eval_command, export_command, prune_command, recover_command, scan_command, sweep_command
        from ..distributed import RanksFailed, refuse_unasked_ranks
        from .plots import MissingExtra
    except KeyboardInterrupt:  # before anything was done (importing the commands takes seconds)
        print("headprune: interrupted", file=sys.stderr)
        return 130
    handler = {"scan": scan_command.scan, "prune": prune_command.prune, "eval": eval_command.evaluate,
               "sweep": sweep_command.sweep, "recover": recover_command.recover,
               "export": export_command.export}[args.command]
    with _quiet_transformers(getattr(args, "quiet", False)), _own_warnings(), _Interrupts() as signals:
        try:
            refuse_unasked_ranks(args.command, getattr(args, "distributed", None))
            return handler(args)
        except KeyboardInterrupt:
            print(f"headprune {args.command}: {commands.interrupted(args)}", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - an interrupt that native code turned into another error
            if signals.seen:
                print(f"headprune {args.command}: {commands.interrupted(args)}", file=sys.stderr)
                return 130
            if not isinstance(e, (OSError, ValueError, TypeError, RanksFailed, MissingExtra)):
                raise
            # RanksFailed: another rank's; a sweep's journal keeps the points measured before any error
            kept = commands.resumable(args) if isinstance(e, RanksFailed) or args.command == "sweep" else ""
            print(f"headprune {args.command}: error: {_message(e, args.command)}{'; ' * bool(kept)}{kept}",
                  file=sys.stderr)
            return 2


class _Interrupts:
    """Records a SIGINT (Ctrl-C) during the command, which is then raised as ``KeyboardInterrupt``
    as Python does; native code it lands in (matplotlib's) may turn it into another error, which
    the command line then reports as the interrupt it was. Only in the main thread, and only where
    Python's own handler is installed; the handler before is put back on exit."""

    def __init__(self):
        self.seen, self.before = False, None

    def _handle(self, signum, frame):
        self.seen = True
        signal.default_int_handler(signum, frame)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.before = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.before is not None:
            signal.signal(signal.SIGINT, self.before)
        return False


@contextmanager
def _own_warnings():
    """headprune's warnings about the user's input (:class:`texts.TextWarning`) printed as its
    other warnings are, every time; the rest as Python prints them."""
    from .texts import TextWarning

    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, TextWarning):
            from .commands import _warn

            _warn(str(message))  # by one rank of a --distributed run
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", TextWarning)
        warnings.showwarning = show
        yield


@contextmanager
def _quiet_transformers(quiet: bool):
    """Under ``--quiet``, transformers' loading bars and notices off for the command, as they were after it."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def _message(e: Exception, command: str = "") -> str:
    """One line: headprune's own ``OSError`` messages name the path and the cause in
    ``strerror``; Python's name the file in ``filename``."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    if command == "prune" and re.match(_SELECTION, text):  # the selection's own message: its flags' names
        for pattern, flag in _FLAGS:
            text = re.sub(pattern, flag, text)
    return text


#: a message of the selection API (``select_heads``' arguments), which names its parameters
_SELECTION = r"(ratio/count|kv_ratio|uniform|protect_layers|min_heads_per_layer|damping):"
#: those parameters as ``prune``'s flags
_FLAGS = ((r"^ratio/count:", "--ratio/--count:"), (r"^uniform:", "--uniform:"),
          (r"(^|[\s(])protect_layers=\[\]", r"\1--protect-layers ''"),
          (r"(^|[\s(])min_heads_per_layer=(\d+)", r"\1--min-heads-per-layer \2"),
          (r"(^|[\s(])(protect_layers|min_heads_per_layer|kv_ratio|damping)\b",
           lambda m: m[1] + "--" + m[2].replace("_", "-")))


if __name__ == "__main__":
    sys.exit(main())
