"""What a collection checkpoint and a sweep journal are resumed by: the settings a
collection's sums depend on, with the model, the text files and the device taken so that the
same ones, named otherwise, resume alike."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from . import texts
from .locate import BUNDLED_MODELS

__all__ = ["collection_fingerprint", "resumable_fingerprint", "saved_fingerprint"]


def collection_fingerprint(args, batches, settings: dict, legacy: bool = False) -> dict:
    """What a collection checkpoint must have been written with to resume: every setting the sums
    depend on (dtype, device, fused are in ``settings``; the data by its tokens), less
    ``calibration_tokens`` (a count of what the digest holds) and ``distributed`` (the rank files'
    own fingerprint holds the number of processes), both absent from older checkpoints. A model or
    text file is taken by its real path (links followed): the same files named from another
    directory, or spelled otherwise, resume alike; the device by its type (``cpu:0`` is ``cpu``,
    and the ranks of a ``--distributed`` run compute on ``cuda:0``, ``cuda:1``, ...). ``legacy``:
    the form earlier releases wrote, the model, text and device as given."""
    kept = {k: v for k, v in settings.items() if k not in ("calibration_tokens", "distributed")}
    model = str(args.model)
    if not legacy:
        if isinstance(kept.get("data"), str):
            kept["data"] = texts.data_paths(kept["data"], real=True)
        if isinstance(kept.get("device"), str):
            kept["device"] = kept["device"].split(":")[0]
        model = model if model in BUNDLED_MODELS or not os.path.exists(model) else os.path.realpath(model)
    return {"model": model, "batch_size": args.batch_size, "tokens": tokens_digest(batches), "settings": kept}


def saved_fingerprint(path) -> Optional[str]:
    """The fingerprint a checkpoint or journal file at ``path`` holds, or ``None`` (no such file,
    or none it can be read from: its reader says why)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return saved if isinstance(saved, str) else None


def resumable_fingerprint(path, args, batches, settings: dict, wrap=lambda fingerprint: fingerprint) -> dict:
    """``wrap(collection_fingerprint(...))``, or its earlier form where the file at ``path`` (a
    run's checkpoint or journal, ``None``: not resuming) holds that one: a run interrupted before
    the paths and the device were normalised resumes. (A checkpoint adds keys of its own, such as
    the weights' digest: a fingerprint is held where each of its keys is.)"""
    now = wrap(collection_fingerprint(args, batches, settings))
    saved = saved_fingerprint(path) if path is not None else None
    if saved is not None and not _holds(saved, now):
        earlier = wrap(collection_fingerprint(args, batches, settings, legacy=True))
        if _holds(saved, earlier):
            return earlier
    return now


def _holds(saved: str, fingerprint: dict) -> bool:
    from ..hf.checkpoint import canonical

    try:
        saved, fingerprint = json.loads(saved), json.loads(canonical(fingerprint))
    except ValueError:
        return False
    return isinstance(saved, dict) and all(saved.get(k, _ABSENT) == v for k, v in fingerprint.items())


_ABSENT = object()


def tokens_digest(batches) -> str:
    """A digest of the calibration batches: the data, its tokenization and the batching."""
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
