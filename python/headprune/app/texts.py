"""Calibration and evaluation text: loading, a disjoint split, tokenised batches.

The package ships three freely licensed texts of three kinds (see ``data/SOURCES.md``):
``persuasion`` (prose: Jane Austen, public domain), ``python_tutorial`` (technical
documentation: the Python 3.11 tutorial, PSF licence) and ``python_code`` (code: modules of the
Python 3.11 standard library, PSF licence). Their first 70% of paragraphs is the calibration
part, the rest is held out for evaluation, so quality is never measured on calibration text.
The default is the prose and the tutorial in equal shares: a least-squares refit fits what it
sees, and a model calibrated on one kind of text measured best on that kind (docs/quality.md).

For the same reason a refit's calibration takes a share of its sequences (``--reference``,
:data:`DEFAULT_REFERENCE`) from the bundled texts the user's text does not name
(:func:`reference_batches`): calibrated on one kind of text alone, the refit lost much more on
text of other kinds.
"""

from __future__ import annotations

import functools
import numbers
import os
import warnings
from pathlib import Path
from typing import Iterable, Optional

import torch
from ..ranking.units import as_real, count_arg
from .text_files import file_paragraphs, split_paragraphs

DATA = Path(__file__).parent / "data"
BUNDLED_TEXTS = ("persuasion", "python_tutorial", "python_code")
DEFAULT_TEXT = "persuasion+python_tutorial"
HELD_OUT_FRACTION = 0.3
#: share of a refit's calibration sequences taken from the bundled texts the data does not name
DEFAULT_REFERENCE = 0.25


def load_paragraphs(spec: Optional[str] = None) -> list:
    """Paragraphs of a bundled text name, a ``.txt`` file (blank-line separated, each keeping its
    lines), a ``.jsonl`` (``.ndjson``)
    or ``.json`` file of records with a ``text`` field (JSON Lines, or one array of records in a
    ``.json``), or a local ``datasets`` dataset directory (``text`` column).
    One text; :func:`load_split` takes several joined by ``+``."""
    spec = BUNDLED_TEXTS[0] if spec is None else given(spec)
    if spec in BUNDLED_TEXTS:
        return split_paragraphs((DATA / f"{spec}.txt").read_text(encoding="utf-8"))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data: {spec!r} is neither a bundled text ({', '.join(BUNDLED_TEXTS)}) nor an existing path")
    paragraphs = file_paragraphs(path)
    if len(paragraphs) < 2:
        lines = len(paragraphs) == 1 and "\n" in paragraphs[0]  # a paragraph per line: no blank line between
        raise ValueError(f"--data: {spec!r} holds {len(paragraphs)} paragraph(s); need at least 2 (calibration and "
                         "held-out)" + ("; a text file's paragraphs are separated by blank lines" if lines else ""))
    return paragraphs


def flattened(text: str) -> str:
    """``text`` with each paragraph's whitespace made single spaces, one paragraph per line
    (how the bundled texts are stored: their lines were joined so when the figures in docs/
    were measured)."""
    return "\n\n".join(" ".join(b.split()) for b in split_paragraphs(text)) + "\n"


def given(spec: Optional[str]) -> str:
    """``--data`` as given, :data:`DEFAULT_TEXT` when not given; an empty name is refused (it
    read as not given)."""
    if spec is None:
        return DEFAULT_TEXT
    if not str(spec).strip():
        raise ValueError("--data: expected a bundled text name or a file, got an empty name")
    return spec


def spec_names(spec: Optional[str] = None) -> list:
    """The texts a ``--data`` value names, as :func:`load_split` reads them: the whole value where
    it is an existing path (a file name may hold ``+``), else its ``+``-separated names,
    stripped."""
    spec = given(spec)
    if spec not in BUNDLED_TEXTS and "+" in spec and Path(spec).exists():
        return [spec]
    return [name.strip() for name in spec.split("+")]


def data_paths(spec: Optional[str] = None, real: bool = False) -> str:
    """``spec`` with each of its files or directories made absolute (bundled names stay names,
    as :func:`load_paragraphs` reads a bundled name first): the same texts from another
    working directory (``real``: their real paths, links followed, as one file has one)."""
    def where(n):
        return os.path.realpath(n) if real else str(Path(n).absolute())  # (not abspath: "link/.." is the link's parent)

    return "+".join(n if n in BUNDLED_TEXTS or not n or not Path(n).exists() else where(n) for n in spec_names(spec))


def load_split(spec: Optional[str] = None) -> tuple:
    """``(calibration parts, held-out paragraphs)`` of ``spec``: one text, or several joined by
    ``+`` (each split on its own; the calibration keeps one part per text, so each gets an
    equal share of the samples, and the held-out paragraphs alternate between the texts). Where
    paragraphs repeated on both sides make much of the held-out text, a :class:`TextWarning`
    says so."""
    spec = given(spec)
    parts, held, seen = [], [], {}
    for name in spec_names(spec):
        if not name:
            raise ValueError(f"--data: {spec!r} has an empty name between its + signs")
        paragraphs = load_paragraphs(name)
        same = tuple(paragraphs)  # a copy, a link or a bundled text's file is the same text
        if same in seen:  # its share would take the same windows twice, its held-out paragraphs count twice
            raise ValueError(f"--data: {spec!r} names {seen[same]!r} twice" + (
                f" (as {name!r}, which holds the same paragraphs)" * (name != seen[same])))
        seen[same] = name
        calib, h = split(paragraphs)
        parts.append(calib)
        held.append(h)
    _warn_repeated(spec, parts, held)
    mixed = interleave(held)
    return parts, mixed


#: the share of the held-out text's characters in paragraphs the calibration holds too from which
#: :func:`load_split` warns
REPEATED_SHARE = 0.05


def _warn_repeated(spec: str, parts: list, held: list) -> None:
    """A :class:`TextWarning` where much of the held-out text repeats calibration paragraphs (a
    licence header, boilerplate): quality measured on it is partly measured on calibration text.
    They stay (a short line such as a closing brace recurs in any code, and is what the text is)."""
    seen = {p for part in parts for p in part}
    repeated = [p for h in held for p in h if p in seen]
    share = sum(map(len, repeated)) / max(1, sum(len(p) for h in held for p in h))
    if share >= REPEATED_SHARE:
        warnings.warn(TextWarning(f"--data: {spec}: {len(repeated)} held-out paragraph(s), {share:.0%} of the held-out "
                                  "text, are also calibration paragraphs: quality on the held-out part is partly "
                                  "measured on calibration text"), stacklevel=3)


class TextWarning(UserWarning):
    """What a text's reading changed that the user should know (the command line prints it as
    its own warning)."""


def interleave(lists: list) -> list:
    """The lists' items taken in turn (the first of each, the second of each, ...), each list
    dropping out when it runs out."""
    return [x[i] for i in range(max(map(len, lists), default=0)) for x in lists if i < len(x)]


def equal_shares(samples: int, parts: int) -> list:
    """``samples`` split over ``parts`` as evenly as whole numbers allow, the first parts one more."""
    return [samples // parts + (1 if i < samples % parts else 0) for i in range(parts)]


def shared_reference(n: int, got: int, asked: int, reference: float) -> int:
    """The reference sequences beside a text that gave ``got`` of the ``asked`` sequences: ``n``
    (``reference`` of the samples), or where it gave fewer, that share of those it gave."""
    return min(n, round(got * reference / (1 - reference))) if n and got < asked else n


def mixed_calibration_batches(tokenizer, parts: list, *, causal: bool, samples: int, seq_len: int,
                              batch_size: int = 8, names: Optional[list] = None, reference: bool = False) -> list:
    """:func:`calibration_batches` of each part with an equal share of ``samples``, joined.
    ``names``: the parts' texts, named by a refusal of one too short for a window (as
    ``--reference``'s bundled texts where ``reference``)."""
    out = []
    for i, (part, n) in enumerate(zip(parts, equal_shares(samples, len(parts)))):
        if n:
            out += named_text(names, i, lambda: calibration_batches(tokenizer, part, causal=causal, samples=n,
                                                                    seq_len=seq_len, batch_size=batch_size),
                              reference)
    return out


def named_text(names: Optional[list], i: int, make, reference: bool = False):
    """``make()``, its refusal of a text too short for a window naming ``names[i]`` (a bundled
    text of the ``reference`` share: named as ``--reference``'s, with how to leave it out)."""
    try:
        return make()
    except ValueError as e:
        if not names or not str(e).startswith(SHORT):
            raise
        if reference:
            raise ValueError(str(e).replace(SHORT, f"--reference: the bundled text {names[i]!r}", 1)
                             + " (--reference 0 leaves the bundled texts out)") from None
        raise ValueError(str(e).replace(SHORT, f"{SHORT} {names[i]!r}", 1)) from None


def rebatch(batches: list, size: int) -> list:
    """The same sequences in batches of at most ``size`` (a batch's tensors sliced along
    their first dimension): more, smaller optimizer steps from one calibration set (``size``: a
    learned recipe's ``batch_size``, named so where it is refused)."""
    size = count_arg("batch_size", size, "a positive int (sequences per training step)")
    return [{k: v[i : i + size] for k, v in b.items()} for b in batches for i in range(0, len(b["input_ids"]), size)]


def split(paragraphs: list, held_out: float = HELD_OUT_FRACTION) -> tuple:
    """``(calibration, held_out)``: a contiguous, disjoint split (first part calibrates)."""
    cut = max(1, min(len(paragraphs) - 1, round(len(paragraphs) * (1 - held_out))))
    return paragraphs[:cut], paragraphs[cut:]


#: how a refusal of a text too short for one window begins
SHORT = "--data: the text"


def bos_token(tokenizer) -> Optional[int]:
    """The one token a tokenizer puts before every text by default (Llama's and Gemma's
    ``<bos>``, OPT's ``</s>``), or ``None`` (GPT-2's, SmolLM2's, which add none; one that adds
    anything after the text too, as BERT's does, is read as adding none): a causal LM trained
    with it expects it first."""
    try:
        plain = list(tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"])
        ids = list(tokenizer("a", verbose=False)["input_ids"])
    except (TypeError, ValueError, KeyError):
        return None
    return int(ids[0]) if len(ids) == len(plain) + 1 and ids[1:] == plain else None


#: characters of text tokenised in one call: a text up to this size is tokenised whole (every bundled
#: text is); a longer one a block of whole paragraphs at a time, until the tokens asked for are there
BLOCK_CHARS = 1 << 20


def stream_ids(tokenizer, paragraphs: Iterable, need: Optional[int] = None) -> list:
    """The token ids of the paragraphs joined by blank lines, or at least their first ``need``
    (all where the text has fewer): tokenised in blocks of whole paragraphs of about
    :data:`BLOCK_CHARS` characters, each block after the first with the blank line before it,
    and none after the block that gives ``need``. A text of one block is one call; a longer one
    is never tokenised whole (a tokenizer holds tens of times the text's size while it works).
    The ids are the whole text's for tokenizers that split at a blank line (GPT-2's
    pre-tokenizer, BERT's); others can differ by a token where two blocks meet."""
    ids, block, size, first = [], [], 0, True
    for p in paragraphs:
        block.append(p)
        size += len(p) + 2
        if size >= BLOCK_CHARS:
            ids += _block_ids(tokenizer, block, first)
            block, size, first = [], 0, False
            if need is not None and len(ids) >= need:
                return ids
    return ids + _block_ids(tokenizer, block, first) if block or first else ids


def _block_ids(tokenizer, block: list, first: bool) -> list:
    text = "\n\n".join(block)
    return list(tokenizer(text if first else "\n\n" + text, add_special_tokens=False, verbose=False)["input_ids"])


def token_windows(tokenizer, paragraphs: Iterable, seq_len: int, bos: Optional[int] = None,
                  limit: Optional[int] = None) -> torch.Tensor:
    """The paragraphs joined into one token stream (:func:`stream_ids`), cut into ``[N, seq_len]``
    windows (with ``bos``, each window that token and ``seq_len - 1`` of the stream's); with
    ``limit``, at most that many, the text tokenised only as far as they reach."""
    width = seq_len - (bos is not None)
    ids = stream_ids(tokenizer, paragraphs, None if limit is None else limit * max(width, 1))
    n = len(ids) // width if width > 0 else 0
    n = n if limit is None else min(n, limit)
    if n == 0:
        raise ValueError(f"{SHORT} has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    windows = torch.tensor(ids[: n * width]).view(n, width)
    return windows if bos is None else torch.cat([windows.new_full((n, 1), bos), windows], 1)


def check_sizes(*, samples, seq_len, batch_size, causal, least: int = 1) -> None:
    """``ValueError``/``TypeError`` naming the argument (and its flag) unless ``samples`` is an
    int of at least ``least``, ``seq_len`` one of at least 2, ``batch_size`` a positive one and
    ``causal`` a bool."""
    for name, flag, value, low in (("samples", "--samples", samples, least), ("seq_len", "--seq-len", seq_len, 2),
                                   ("batch_size", "", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}{f' ({flag})' if flag else ''}: expected an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name}{f' ({flag})' if flag else ''}: expected at least {low}, got {value}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")


def calibration_batches(tokenizer, paragraphs: list, *, causal: bool, samples: int, seq_len: int,
                        batch_size: int = 8) -> list:
    """Tokenised batches (dicts with ``input_ids`` and ``attention_mask``).

    Causal LMs get ``samples`` full windows of ``seq_len`` tokens from the joined stream (each
    starting with the tokenizer's BOS token where it adds one: :func:`bos_token`);
    encoders get ``samples`` paragraphs, truncated to ``seq_len`` and padded per batch (the
    padding is masked, and excluded from the entropies).
    """
    check_sizes(samples=samples, seq_len=seq_len, batch_size=batch_size, causal=causal)
    if isinstance(paragraphs, (str, bytes)) or not all(isinstance(p, str) for p in paragraphs):
        raise TypeError(f"paragraphs: expected a list of str (one per paragraph), got {type(paragraphs).__name__}"
                        + ("" if isinstance(paragraphs, (str, bytes)) else " holding other values"))
    if causal:
        windows = token_windows(tokenizer, paragraphs, seq_len, bos_token(tokenizer), limit=samples)
        return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]
    texts = paragraphs[:samples]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def sequences(batches) -> int:
    """How many sequences (rows) ``batches`` hold."""
    return sum(int(b["input_ids"].shape[0]) for b in batches)


def tokens(batches) -> int:
    """How many real tokens (not padding) ``batches`` hold."""
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)


def reference_texts(spec: Optional[str] = None) -> list:
    """The bundled texts that ``spec`` (a ``--data`` value, default :data:`DEFAULT_TEXT`) does
    not name: the kinds of text a reference share adds."""
    named = {bundled_name(n) for n in spec_names(spec)}
    return [n for n in BUNDLED_TEXTS if n not in named]


def bundled_name(name: str) -> str:
    """``name``, or the bundled text it is: given by its file's path, or a copy of it (the same
    paragraphs, as :func:`load_split` tells texts apart)."""
    if name in BUNDLED_TEXTS or not os.path.exists(name):
        return name
    st = os.stat(name)
    return _bundled_as(os.path.realpath(name), st.st_mtime_ns, st.st_size) or name


@functools.lru_cache(maxsize=32)
def _bundled_as(path: str, mtime: int, size: int) -> Optional[str]:
    """The bundled text whose paragraphs the file at ``path`` holds (read once per version of it)."""
    try:
        paragraphs = tuple(load_paragraphs(path))
    except (OSError, ValueError):
        return None
    return next((b for b in BUNDLED_TEXTS if tuple(load_paragraphs(b)) == paragraphs), None)


def reference_samples(samples: int, share: float, spec: Optional[str] = None) -> int:
    """How many of ``samples`` calibration sequences a reference ``share`` takes (none where
    ``spec`` names every bundled text)."""
    if as_real(share) is None or not 0 <= share < 1:
        raise ValueError(f"reference: expected a share in [0, 1), got {share!r}")
    return max(0, min(round(samples * share), samples - 1)) if reference_texts(spec) else 0  # a share below 1 leaves one


def reference_batches(tokenizer, *, samples: int, seq_len: int, causal: bool, exclude: Optional[str] = None,
                      batch_size: int = 8) -> list:
    """Calibration batches of ``samples`` sequences from the calibration parts of the bundled
    texts that ``exclude`` (a ``--data`` value) does not name, in equal shares.

    Joined to the batches of the user's text they keep a least-squares refit from fitting one
    kind of text alone; ``headprune prune`` and ``sweep`` take :data:`DEFAULT_REFERENCE` of their
    sequences from here (``--reference``)."""
    check_sizes(samples=samples, seq_len=seq_len, batch_size=batch_size, causal=causal, least=0)
    names = reference_texts(exclude)
    if not names or samples < 1:
        return []
    return mixed_calibration_batches(tokenizer, load_split("+".join(names))[0], causal=causal, samples=samples,
                                     seq_len=seq_len, batch_size=batch_size, names=names, reference=True)


def shortfall(samples: int, got: int, seq_len: int, *, causal: bool, reference: bool) -> str:
    """The warning where the texts gave ``got`` of ``samples`` sequences (with a ``reference``
    share, the bundled texts are among those that gave them)."""
    which = "the calibration text and the bundled texts of the reference share give" if reference else \
        "the calibration text gives"
    return (f"--samples {samples}: {which} {got} sequences{f' of {seq_len} tokens' if causal else ' (paragraphs)'}; "
            "calibrating on those")


def calibration_set(tokenizer, parts: list, spec: Optional[str], *, causal: bool, samples: int, seq_len: int,
                    reference: float, batch_size: int = 8) -> tuple:
    """``(batches, settings)``: ``samples`` calibration sequences, a ``reference`` share of them
    from :func:`reference_batches` and the rest from ``parts`` (the calibration parts of
    ``spec``, as :func:`load_split` gives them) in equal shares; ``settings`` records the
    reference (empty without one). Where the texts give fewer sequences than asked for, the
    reference share is taken of the sequences they give (``samples`` is then more than the
    batches hold; the caller says so)."""
    n = reference_samples(samples, reference, spec)
    batches = mixed_calibration_batches(tokenizer, parts, causal=causal, samples=samples - n, seq_len=seq_len,
                                        batch_size=batch_size, names=spec_names(spec))
    n = shared_reference(n, sequences(batches), samples - n, reference)  # the same share of the sequences there are
    ref = reference_batches(tokenizer, samples=n, seq_len=seq_len, causal=causal, exclude=spec, batch_size=batch_size)
    if sequences(ref) < n:  # the bundled texts' calibration parts hold fewer windows or paragraphs
        warnings.warn(f"--reference: the bundled texts give {sequences(ref)} of the {n} sequences asked of them; "
                      "calibrating on those", TextWarning, stacklevel=2)
    n, names = sequences(ref), reference_texts(spec)  # equal shares: fewer sequences than texts, the first texts'
    return batches + ref, ({"reference": {"samples": n, "texts": names[:n]}} if n else {})
