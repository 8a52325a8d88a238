"""The points a sweep has measured, kept so that an interrupted sweep goes on from where it stopped
(``headprune sweep --resume``).

``headprune sweep`` rewrites its journal, ``.<out>.sweep-journal.json`` beside ``--out``, after
every point (a recipe at a fraction, or a fraction's random draws; atomically, so a kill leaves the
last complete version), and removes it once the output is written. ``--resume`` takes every point
the journal holds and measures the rest, so the finished sweep is the one an uninterrupted run
gives. The journal is refused, naming what differs, unless it was written with the same model
(its weights and config), calibration batches and settings, held-out text, sweep settings and
recipes; a run without ``--resume`` starts anew and writes over it (never over a file that is no
journal).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Optional

from .. import atomic
from ..hf.checkpoint import canonical, differences, format_kind, refuse_foreign, weights_digest

__all__ = ["FORMAT", "SweepJournal", "journal_path", "sweep_fingerprint"]

FORMAT = "headprune.sweep-journal/1"


def journal_path(out) -> Path:
    """``.<out's name>.sweep-journal.json`` beside ``out``, named as collection checkpoints are."""
    from .commands import beside

    return beside(out, ".sweep-journal.json")


def sweep_fingerprint(collection: dict, loaded, held: list, config, recipes: dict) -> dict:
    """What a sweep's points depend on: ``collection`` (the calibration's fingerprint: model name,
    batches, settings), the model's weights and config, the held-out paragraphs evaluated as the
    tokenizer reads them, the sweep's settings as they apply (not its fractions: points are kept by
    fraction; not its output), and the recipes."""
    from ..hf.values import refits_values_by_default

    evaluated = held[: config.eval_paragraphs or len(held)]
    text = _text_digest(loaded.tokenizer, evaluated)
    sweep = {f.name: getattr(config, f.name) for f in fields(config)
             if f.name not in ("ratios", "quiet", "eval_paragraphs")}  # the paragraphs are in "held_out"
    if config.values is None:  # as the sweep resolves it
        sweep["values"] = refits_values_by_default(loaded.model) and config.removal == "refit"
    if loaded.kind != "causal":  # perplexity windows only
        sweep.pop("eval_windows")
    return {"collection": collection, "weights and config": weights_digest(loaded.model), "held_out": text,
            "sweep": sweep, "recipes": {name: {k: repr(v) for k, v in sorted(kw.items())}
                                        for name, kw in recipes.items()}}


def _text_digest(tokenizer, paragraphs: list, chunk: int = 1024) -> str:
    """The digest of ``json.dumps([paragraphs, their token ids])``, tokenised ``chunk`` paragraphs
    at a time (a long text's ids, all at once, would take many times its size)."""
    h = hashlib.sha256(("[" + json.dumps(paragraphs, default=str) + ", [").encode())
    for i in range(0, len(paragraphs), chunk):
        ids = tokenizer([str(p) for p in paragraphs[i : i + chunk]], verbose=False)["input_ids"]
        h.update(((", " if i else "") + ", ".join(json.dumps(list(x)) for x in ids)).encode())
    h.update(b"]]")
    return h.hexdigest()[:16]


class SweepJournal:
    """Points by fraction: each recipe's heads and metric, the random draws' metrics and head
    counts, a learned recipe's training record and a measured allocation's cost record.
    ``path=None``: kept in memory only (a library sweep without a journal)."""

    def __init__(self, path=None, fingerprint: Optional[dict] = None, resume: bool = False, warn=None):
        self.path = None if path is None else os.fspath(path)
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=4))  # the command line's: its own
        self.fingerprint = canonical(fingerprint or {})
        self.points, self.random, self.measured = {}, {}, {}
        self.resumed = 0  # points taken from the file
        self.written, self.unwritable = False, False
        if self.path is not None:
            refuse_foreign(self.path, self._ours, "headprune sweep", "a sweep", arg="--out")
            if resume:
                self._load()

    def _ours(self) -> bool:
        with open(self.path, encoding="utf-8") as f:
            return format_kind(json.load(f).get("format")) == format_kind(FORMAT)

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"--resume: the sweep journal {self.path} {why}; run without --resume to start anew "
                          "(it is written over)")

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._refuse(f"cannot be read ({type(e).__name__}: {e})") from e
        if d.get("format") != FORMAT:
            raise self._refuse(f"was written by another headprune (format {d.get('format')!r}; this one reads "
                               f"{FORMAT!r})")
        if d.get("fingerprint") != self.fingerprint:
            why = differences(d.get("fingerprint"), self.fingerprint, "the journal")
            raise self._refuse(f"was written with other settings ({why})")
        try:
            self.points, self.random, self.measured = _checked(d)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise self._refuse(f"is corrupt ({type(e).__name__}: {e})") from e
        self.resumed = sum(map(len, self.points.values())) + len(self.random)

    def replay(self, ratio: float, name: str, state: dict) -> Optional[tuple]:
        """``(heads, metric)`` of the recipe ``name`` at ``ratio`` where the journal file holds it
        (its learned-gate record is put back in ``state``, where :func:`run_sweep` keeps them),
        else ``None`` (always, without a file: a library sweep measures every point it is asked)."""
        p = self.points.get(_key(ratio), {}).get(name) if self.path is not None else None
        if p is None:
            return None
        if p.get("learned") is not None:
            state.setdefault("_learned_runs", {}).setdefault(name, []).append(p["learned"])
        return {int(k): list(v) for k, v in p["heads"].items()}, float(p["value"])

    def record(self, ratio: float, name: str, heads: dict, value: float, state: dict) -> None:
        """Keeps a recipe's point (and its learned-gate and measured-allocation records, where
        ``state`` has them for it) and rewrites the file."""
        runs = state.get("_learned_runs", {}).get(name) or [None]
        learned = runs[-1] if runs[-1] is not None and runs[-1].get("ratio") == ratio else None
        self.points.setdefault(_key(ratio), {})[name] = {
            "heads": {str(k): sorted(int(h) for h in v) for k, v in heads.items()}, "value": _plain(value),
            "learned": learned}
        cost = state.get("_costs", {}).get(name)
        if cost is not None:
            self.measured[name] = {"seconds": cost.seconds, "sequences": cost.sequences, "tokens": cost.tokens}
        self._write()

    def replay_random(self, ratio: float) -> Optional[tuple]:
        """``(metrics, head counts)`` of the random draws at ``ratio``, else ``None``."""
        d = self.random.get(_key(ratio)) if self.path is not None else None
        return None if d is None else ([float(v) for v in d["values"]], list(d["heads"]))

    def record_random(self, ratio: float, values: list, heads: list) -> None:
        self.random[_key(ratio)] = {"values": [_plain(v) for v in values], "heads": list(heads)}
        self._write()

    def _write(self) -> None:
        """The file rewritten; where it cannot be (a full disk), said once, and the sweep goes on."""
        if self.path is None or self.unwritable:
            return
        try:
            atomic.write_file(self.path, json.dumps({"format": FORMAT, "fingerprint": self.fingerprint,
                                                     "points": self.points, "random": self.random,
                                                     "measured": self.measured}))
            self.written = True
        except OSError as e:
            self.unwritable = True
            self.warn(f"the sweep journal {self.path} cannot be written ({e.strerror or e}); the sweep goes on, and an "
                      "interruption would lose its points")

    def hint(self) -> str:
        """What an interrupted or failed run leaves to resume from: the points this run's journal
        holds, where it was read or written ("": nothing)."""
        held = self.path is not None and (self.points or self.random) and (self.written or self.resumed)
        if not held or not os.path.exists(self.path):
            return ""
        kept = "the points measured before it could no longer be written" if self.unwritable else "the points measured"
        return f"the sweep journal {self.path} keeps {kept}: run again with --resume to continue"

    def remove(self) -> None:
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)


def _key(ratio: float) -> str:
    return repr(float(ratio))


def _plain(value):
    """A metric as JSON holds it exactly (a float's repr round-trips; inf and NaN as strings)."""
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _checked(d: dict) -> tuple:
    """``(points, random, measured)`` of a journal, each entry of the shape :class:`SweepJournal`
    writes (``TypeError``/``ValueError``/``KeyError`` otherwise)."""
    points, random, measured = d["points"], d["random"], d["measured"]
    for p in (p for by_name in points.values() for p in by_name.values()):
        _ = [(int(k), [int(h) for h in v]) for k, v in p["heads"].items()], float(p["value"])
        if not isinstance(p.get("learned"), (dict, type(None))):
            raise TypeError("a learned-gate record: expected an object")
    for r in random.values():
        _ = [float(v) for v in r["values"]], [int(h) for h in r["heads"]]
    if not all(isinstance(v, dict) for v in measured.values()):
        raise TypeError("a measured allocation's record: expected an object")
    return points, random, measured
