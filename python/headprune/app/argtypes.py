"""The command line's value types: each parses one flag's text, and its error names what was
expected (argparse adds the flag)."""

from __future__ import annotations

import argparse


def device(text: str) -> str:
    import torch

    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda:0, got {text!r}") from None
    if d.type == "meta":  # holds no weights: the model would be read for nothing, and fail in its first forward
        raise argparse.ArgumentTypeError(f"expected a torch device that holds weights, such as cpu or cuda:0, got {text!r}")
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return text


def _in_range(text: str, inside, expected: str, shown=repr) -> float:
    """``text`` as a float for which ``inside`` holds, else the error saying ``expected``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not inside(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {shown(text)}")
    return value


def ratio(text: str) -> float:
    return _in_range(text, lambda r: 0 < r < 1, "a number in (0, 1)", str)


def fraction(text: str) -> float:
    """A fraction in [0, 1) (--kv-ratio, --validation)."""
    return _in_range(text, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def kv_fraction(text: str):
    """--kv-ratio: a fraction in [0, 1); 0 asks for no KV share, as leaving the option out does."""
    return fraction(text) or None


def ratios(text: str) -> list:
    """Comma-separated ratios in (0, 1), each once (a repeat would be measured twice)."""
    out = [ratio(t) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one ratio, got {text!r}")
    repeated = sorted({r for r in out if out.count(r) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"expected each ratio once, got {', '.join(map(str, repeated))} more than once "
                                         f"in {text!r}")
    return out


def shapes(text: str) -> list:
    """``"1x512,16x512"`` -> ``[(1, 512), (16, 512)]``; ``""`` or ``none`` -> ``[]``."""
    out = []
    for part in [t.strip() for t in text.split(",") if t.strip() and t.strip().lower() != "none"]:
        try:
            b, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected BATCHxTOKENS shapes such as 1x512,16x512, got {part!r}") from None
        if b < 1 or n < 1:
            raise argparse.ArgumentTypeError(f"expected a positive batch and token count, got {part!r}")
        out.append((b, n))
    return out


def _int_at_least(low: int, what: str, below=None):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if n < low or below is not None and n >= below:
            raise argparse.ArgumentTypeError(f"expected a {what} integer{'' if below is None else f' below {below:,}'}, "
                                             f"got {n}")
        return n
    return parse

positive, nonnegative_int = _int_at_least(1, "positive"), _int_at_least(0, "non-negative")
seed = _int_at_least(0, "non-negative", 2**40)  # learn_gates' bound, the strictest of the seed's readers


def nonnegative(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text}")
    return x


def positive_float(text: str) -> float:
    x = nonnegative(text)
    if x == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return x


def steps(text: str):
    if text == "auto":
        return text
    try:
        return positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None


def layers(text: str) -> list:
    """Comma-separated layer indices, each once and none negative (no model has such a layer)."""
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None
    if any(i < 0 for i in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected non-negative layer indices, each once, got {text!r}")
    return out


class Given(argparse.Action):
    """Stores the value, and records in ``namespace.given`` that the flag was given (a default
    cannot tell a flag left out from one given its default value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}
