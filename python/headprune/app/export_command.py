"""``headprune export MODEL --gguf FILE``: a model (pruned or not, of the Llama family) written
as a GGUF for llama.cpp, with the fields, tokenizer and untouched tensors of a GGUF of the
unpruned model (``--source``; found by itself where the model or its prune was read from a
GGUF). ``prune`` already writes ``model.gguf`` for a GGUF input; this writes one for what
``recover`` saved, or for a model pruned from a GGUF directory."""

from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager
import os
from pathlib import Path
from typing import Optional

from .. import atomic
from . import commands as C
from .inputs import at_or_inside
from .load import load_model
from .locate import BUNDLED_MODELS, bundled_path, locate, model_dir, prune_folder
from .recover_command import read_report


def export(args) -> int:
    from ..hf import prune_heads
    from ..hf.gguf_export import export_architecture, export_gguf
    from ..hf.prune import zeroed_heads

    if importlib.util.find_spec("gguf") is None:
        raise ValueError("--gguf: writing a GGUF needs the gguf package: pip install gguf")
    src = Path(args.model)
    report = _report(src)
    if not str(args.gguf).strip():
        raise ValueError("--gguf: expected the path of the GGUF file to write, got an empty name")
    out = Path(args.gguf)
    if out.is_dir():
        raise ValueError(f"--gguf: {out} is a directory; name the GGUF file to write")
    if os.path.lexists(out) and not args.force:
        raise FileExistsError(f"--gguf: {out} exists; pass --force to replace it")
    atomic.check_folder(out, "--gguf")  # before the model loads
    source = _source(args.source, src, report)
    folder, gguf, _ = locate(args.model)
    if gguf is None:  # a directory: its family is said first (no --source helps), then that no GGUF is known
        _refuse_family(folder)
        if source is None:
            _no_source(args)
    _refuse_input(out, src, source)
    if os.path.islink(out):  # the export writes no link's target: refused before the model loads
        raise FileExistsError(f"--gguf: {out} is a symbolic link; name the file itself")
    stage = C.Stages(args)
    with stage("loading the model", "load"):
        loaded = load_model(args.model, accept=("causal",), tokenizer=False)  # the GGUF takes --source's tokenizer
    source = source or (loaded.source if loaded.checkpoint_dtype == "gguf" else None)
    _refuse_input(out, src, source)
    zeroed = zeroed_heads(loaded.model)
    if zeroed:  # a masked model: its heads' outputs are zero columns, removed for a smaller file
        prune_heads(loaded.model, zeroed)
    with _cli_names():
        arch = export_architecture(loaded.model, args.architecture)  # a family it cannot write is said first
    if source is None:
        _no_source(args)
    if zeroed:
        print(f"removed {sum(map(len, zeroed.values()))} heads whose output-projection columns are all zero (a "
              "masked model's); what they added was zero, so the model computes what it did")
    created = _parents(out.absolute().parent)
    try:
        with stage(f"writing the GGUF ({arch} architecture)", "gguf"), _cli_names():
            written = export_gguf(loaded.model, out, source=source, dtype=args.gguf_dtype,
                                  architecture=args.architecture, overwrite=args.force)
    except BaseException as e:
        for folder in reversed(created):  # a failure leaves no folder it made
            try:
                os.rmdir(folder)
            except OSError:
                pass
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)  # str() adds "[Errno N] "
        if isinstance(e, OSError) and not text.startswith(("--gguf", "--source")):
            raise OSError(e.errno, f"--gguf: cannot write {out} ({e.strerror or e})") from e
        raise
    kinds = sorted(set(written.values()))
    print(f"{out}: llama.cpp's {arch} architecture, {len(written)} tensors ({', '.join(kinds)}), "
          f"{out.stat().st_size / 2**20:,.1f} MiB; fields and tokenizer from {source}")
    return 0


def _refuse_family(folder: Path) -> None:
    """A directory of a family the exporter does not write, refused from its config.json before its
    weights load (the exporter refuses it again on the model)."""
    from ..hf.gguf_export import ARCHITECTURES

    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # the loader says what is wrong with it
    if isinstance(kind, str) and kind not in ARCHITECTURES:
        raise ValueError(f"MODEL: GGUF export writes {', '.join(ARCHITECTURES)} models, got {kind}")


def _no_source(args):
    raise ValueError("--source: a GGUF needs the fields and the tokenizer of a GGUF of the unpruned model, and "
                     f"none is known for {args.model}; pass --source (llama.cpp's convert_hf_to_gguf.py writes one "
                     "from a Hugging Face directory)")


#: the exporter's argument names, as the command line calls them
CLI_NAMES = {"model": "MODEL", "source": "--source", "path": "--gguf", "dtype": "--gguf-dtype",
             "architecture": "--architecture"}


@contextmanager
def _cli_names():
    """The exporter's refusals (``ValueError``, ``OSError``) name the command's arguments, not the
    API's (``model: ...`` is ``MODEL: ...`` here)."""
    try:
        yield
    except (ValueError, OSError) as e:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)  # str() adds "[Errno N] "
        name, sep, rest = text.partition(":")
        if not sep or name not in CLI_NAMES:
            raise
        text = f"{CLI_NAMES[name]}:{rest}".replace("pass overwrite=True", "pass --force")
        raise (ValueError(text) if isinstance(e, ValueError) else type(e)(e.errno, text)) from None


def _parents(folder: Path) -> list:
    """Create ``folder`` and its missing parents; the ones created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for f in missing:
        f.mkdir()
    return missing


def _report(path: Path) -> Optional[dict]:
    """``report.json`` of a directory written by ``headprune prune`` or ``recover`` (its model is
    in ``model/``), given as that directory or as its ``model/``, else ``None``."""
    folder = prune_folder(path)
    if folder is None:
        return None
    report = read_report(folder, "MODEL")
    return report if isinstance(report, dict) else {}


def _refuse_input(out: Path, src: Path, source: Optional[str]) -> None:
    """``--gguf`` naming a file the export reads (MODEL, a file of the directory its model is
    read from, the source GGUF) is refused, ``--force`` or not: the file would be replaced by the
    pruned one while it is its input."""
    if not out.exists():
        return
    for path in (src, source):
        if path is not None and os.path.exists(path) and os.path.samefile(out, path):
            raise ValueError(f"--gguf: {out} is {path}, which the export reads; write the GGUF elsewhere")
    folder = prune_folder(src)
    if folder is not None and os.path.samefile(out, folder / "report.json"):  # which names the source, the record
        raise ValueError(f"--gguf: {out} is the report of {folder}, which the export reads; write the GGUF elsewhere")
    model = model_dir(src)  # where load_model reads the weights
    if model.is_dir() and at_or_inside(out, model):
        raise ValueError(f"--gguf: {out} is a file of {model}, the model the export reads; write the GGUF elsewhere")


def _source(given: Optional[str], path: Path, report: Optional[dict]) -> Optional[str]:
    """The GGUF to copy fields and tokenizer from: ``--source``, else the GGUF ``report`` names
    as the unpruned model (a ``.gguf`` path, a folder holding one, or a bundled model shipped as GGUF)."""
    if given is not None:
        if not Path(given).is_file():
            raise FileNotFoundError(f"--source: {given} is not a file")
        return given
    for name in (report or {}).get("model_path"), (report or {}).get("model"):
        if not isinstance(name, str):
            continue
        if name.lower().endswith(".gguf") and Path(name).is_file():
            return name
        if name not in BUNDLED_MODELS and Path(name).is_dir():  # a folder holding one GGUF, read as that GGUF
            try:
                folder, gguf, _ = locate(name)
            except (OSError, ValueError):
                continue
            if gguf is not None:
                return str(folder / gguf)
        if name in BUNDLED_MODELS and BUNDLED_MODELS[name][2] is not None:
            try:
                root, gguf = bundled_path(name)
            except FileNotFoundError:
                continue
            return str(root / gguf)
    return None
