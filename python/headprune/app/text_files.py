"""Reading a ``--data`` file or directory into paragraphs: a text file (paragraphs separated by
blank lines), JSON Lines or a ``.json`` array of records with a ``text`` field, or a local
``datasets`` directory. Each paragraph keeps its lines as written but for the whitespace that
ends them, whatever the file's format or line endings, so the same text tokenises alike."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["file_paragraphs", "split_paragraphs"]


def file_paragraphs(path: Path) -> list:
    """The paragraphs of an existing ``--data`` path (see the module doc)."""
    if path.is_dir():
        return _dataset_paragraphs(path)
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):  # .json: what datasets' to_json writes (JSON Lines)
        return [p for p in map(_record, _json_texts(path)) if p]
    return split_paragraphs(_read(path))


def split_paragraphs(text: str) -> list:
    """Paragraphs separated by blank lines (a line of only whitespace is blank too), each with
    its lines as written but for the whitespace that ends them (code keeps its lines and its
    indentation, as a JSON Lines record's text keeps them)."""
    blocks = re.split(r"\n[^\S\n]*\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return [p for p in map(_record, blocks) if p]  # each block as a record reads


def _record(text: str) -> str:
    """One record's text as one paragraph of a text file reads: line endings made ``\\n``, the
    whitespace ending each line dropped, blank lines at either end dropped (the first line's
    indentation kept); ``""`` for a record of whitespace alone."""
    lines = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return lines.strip("\n") if lines.strip() else ""


def _json_texts(path: Path) -> list:
    """The ``text`` field of each record of a JSON Lines file, or of a ``.json`` file holding
    one array of records."""
    text = _read(path)
    whole = _whole_json(text) if path.suffix.lower() == ".json" else None
    if isinstance(whole, dict):
        raise ValueError(f"--data: {path} holds one JSON object; expected an array of records with a 'text' field, "
                         "or one record per line (JSON Lines)")
    if isinstance(whole, list):
        records, where = enumerate(whole, 1), " record "
    else:  # lines end at \n only: JSON strings may hold U+2028, U+2029 or U+0085, where splitlines() breaks
        records = ((n, _json(line, f"{path}:{n}")) for n, line in enumerate(text.split("\n"), 1) if line.strip())
        where = ":"
    out = []
    for n, rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ValueError(f"--data: {path}{where}{n} has no string field 'text'")
        out.append(rec["text"])
    return out


def _whole_json(text: str):
    """A ``.json`` file's one value, or None where it is not one (JSON Lines)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--data: {where} is not valid JSON ({e.msg})") from None


def _read(path: Path) -> str:
    """A ``--data`` file's text (UTF-8; a byte-order mark is dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data: {path} is not UTF-8 text ({e})") from None


def _dataset_paragraphs(path: Path) -> list:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data: {path} is a directory; reading a datasets dataset needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):  # one split is one text: which of several is the user's to say
        if not ds:
            raise ValueError(f"--data: {path} holds a dataset dict with no split, so no text")
        if len(ds) > 1:
            raise ValueError(f"--data: {path} holds a dataset of {len(ds)} splits ({', '.join(map(str, ds))}); name "
                             f"one of their directories (e.g. {path / str(next(iter(ds)))})")
        ds = ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise ValueError(f"--data: dataset {path} has no 'text' column (columns: {ds.column_names})")
    rows = ds["text"]
    bad = next((n for n, t in enumerate(rows) if not isinstance(t, str)), None)
    if bad is not None:  # as a JSON record without a string text is refused: nothing dropped unsaid
        raise ValueError(f"--data: dataset {path} row {bad} has no string 'text' ({type(rows[bad]).__name__})")
    return [p for p in map(_record, rows) if p]
