"""``headprune`` command line: scan, prune, eval, sweep.

Every argument error, and every write error (a full disk, a file-size limit, a read-only
folder), exits with status 2 and one line naming the problem. An output directory holds its
old contents or the complete new ones at every instant, even if the process is killed:
outputs are written to a temporary sibling directory that takes its place in one step, and
what a killed run leaves behind is removed by the next run into the same folder.
"""

from __future__ import annotations

import argparse
import sys

from ..ranking import DEFAULT_STEPS, GQA_MODES, ORDERS, SCOPES, SCORES
from ..stats.moments import DEFAULT_DAMPING
from .load import DTYPES
from .sweep import RANDOM_SCOPES
from .texts import BUNDLED_TEXTS, DEFAULT_TEXT


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _device(text: str) -> str:
    import torch

    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda:0, got {text!r}") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return text


def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < r < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return r


def _ratios(text: str) -> list:
    return [_ratio(t) for t in text.split(",") if t.strip()]


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _nonnegative(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text}")
    return x


def _steps(text: str):
    if text == "auto":
        return text
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def _layers(text: str) -> list:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _common(p: argparse.ArgumentParser, *, out: bool) -> None:
    p.add_argument("model", metavar="MODEL", help="bundled name (minilm, smollm2), a .gguf file or a local directory")
    p.add_argument("--data", default=None, metavar="TEXT",
                   help=f"text file, JSONL with a 'text' field, local datasets dir, or a bundled text "
                        f"({', '.join(BUNDLED_TEXTS)}; default {DEFAULT_TEXT})")
    p.add_argument("--samples", type=_positive, default=None, help="calibration sequences (default 64 causal, 256 encoder)")
    p.add_argument("--seq-len", type=_positive, default=None, help="calibration length in tokens (default 256 causal, 128 encoder)")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--eval-windows", type=_positive, default=48, help="held-out perplexity windows (causal LMs)")
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if out:
        p.add_argument("--out", default=None, help="output directory (must be empty or new unless --force)")
        p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
        p.add_argument("--distributed", action="store_true",
                       help="data-parallel calibration under torchrun (gloo on CPU, NCCL on GPU); rank 0 writes")


def _fused(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, serve sdpa attention calls during collection by the fused attention-with-statistics "
                        "op (default; outputs equal SDPA's to float rounding); --no-fused runs the model's own "
                        "attention and computes the statistics in a second pass over query and key")


def _removal(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True,
                   help="refit the kept heads' output-projection columns and bias by least squares to what the full "
                        "projection computed on the calibration data (default; needs second moments, gathered in "
                        "the same pass); --no-reconstruct keeps the kept columns as they are")
    p.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=True,
                   help="with --no-reconstruct: replace each removed head by its mean output on the calibration data, "
                        "folded into the output projection's bias (default); --no-compensate removes heads outright")
    p.add_argument("--damping", type=_nonnegative, default=DEFAULT_DAMPING,
                   help=f"ridge damping of the refit, relative to the mean squared input (default {DEFAULT_DAMPING:g})")


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scope", choices=SCOPES, default=None)
    p.add_argument("--min-heads-per-layer", type=int, default=None)
    p.add_argument("--protect-layers", type=_layers, default=None, metavar="I,J,...")
    p.add_argument("--gqa", choices=GQA_MODES, default="query")
    p.add_argument("--score", default=None, choices=SCORES,
                   help="statistic that ranks heads (default: the measured default recipe)")
    p.add_argument("--order", choices=ORDERS, default=None)
    p.add_argument("--seed", type=int, default=0)
    _removal(p)
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=False,
                   help="calibrate the refit layer by layer, each layer's statistics taken with the earlier layers "
                        "already pruned and refit (about one more forward pass over the calibration data)")
    p.add_argument("--steps", type=_steps, default=DEFAULT_STEPS,
                   help="iterative pruning: reach the budget in this many rounds, re-collecting the statistics "
                        "with the heads chosen so far removed before each round; 'auto': at most 10%% of the "
                        f"heads per round (default {DEFAULT_STEPS})")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="headprune", description="Entropy-based attention-head pruning.")
    sub = ap.add_subparsers(dest="command", required=True)
    scan = sub.add_parser("scan", help="collect per-head attention entropies")
    _common(scan, out=True)
    _fused(scan)
    scan.add_argument("--resume", action="store_true",
                      help="continue an interrupted scan from its checkpoint (.<out>.checkpoint.json beside --out)")
    prune = sub.add_parser("prune", help="collect, rank, prune, evaluate, save, report")
    _common(prune, out=True)
    _fused(prune)
    how = prune.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=_ratio)
    how.add_argument("--count", type=_positive)
    _selection(prune)
    mode = prune.add_mutually_exclusive_group()
    mode.add_argument("--mask", dest="mode", action="store_const", const="mask", help="mask the heads in the weights, same shapes (reversible with the Python API)")
    mode.add_argument("--physical", dest="mode", action="store_const", const="physical", help="remove the heads (default)")
    ev = sub.add_parser("eval", help="quality and speed of a model or a pruned directory")
    _common(ev, out=False)
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    sweep = sub.add_parser("sweep", help="quality vs fraction pruned: recipes against random")
    _common(sweep, out=True)
    _fused(sweep)
    sweep.add_argument("--ratios", type=_ratios, default=[0.1, 0.2, 0.3, 0.4, 0.5])
    sweep.add_argument("--seeds", type=_positive, default=3, help="random-baseline seeds")
    sweep.add_argument("--random-scope", choices=list(RANDOM_SCOPES), default="per_layer",
                       help="random baseline: " + "; ".join(f"{k}: heads {v}" for k, v in RANDOM_SCOPES.items()))
    sweep.add_argument("--gqa", choices=GQA_MODES, default="query")
    _removal(sweep)
    sweep.add_argument("--eval-paragraphs", type=_positive, default=None,
                       help="held-out paragraphs for the fidelity of encoders (default: all)")
    return ap


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from . import commands
    except KeyboardInterrupt:  # before anything was done (importing the commands takes seconds)
        print("headprune: interrupted", file=sys.stderr)
        return 130
    try:
        return {"scan": commands.scan, "prune": commands.prune, "eval": commands.evaluate,
                "sweep": commands.sweep}[args.command](args)
    except (OSError, ValueError, TypeError) as e:
        print(f"headprune {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"headprune {args.command}: {commands.interrupted(args)}", file=sys.stderr)
        return 130


def _message(e: Exception) -> str:
    """One line: headprune's own ``OSError`` messages name the path and the cause in
    ``strerror``; Python's name the file in ``filename``."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
