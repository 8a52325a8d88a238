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


def collection_fingerprint(args, batches, settings: dict, legacy: Optional[str] = None) -> dict:
    """What a collection checkpoint must have been written with to resume: every setting the sums
    depend on (dtype, device, fused are in ``settings``; the data by its tokens), less
    ``calibration_tokens`` (a count of what the digest holds) and ``distributed`` (the rank files'
    own fingerprint holds the number of processes), both absent from older checkpoints. A model or
    text file is taken by its real path (links followed): the same files named from another
    directory, or spelled otherwise, resume alike; the device by its type (``cpu:0`` is ``cpu``,
    and the ranks of a ``--distributed`` run compute on ``cuda:0``, ``cuda:1``, ...). ``legacy``:
    a form earlier releases wrote, the model and text as given and the device as given
    (``"as given"``: a collection checkpoint) or by its type (``"device by type"``: a sweep journal)."""
    kept = {k: v for k, v in settings.items() if k not in ("calibration_tokens", "distributed")}
    model = str(args.model)
    if legacy is None:
        if isinstance(kept.get("data"), str):
            kept["data"] = texts.data_paths(kept["data"], real=True)
        model = model if model in BUNDLED_MODELS or not os.path.exists(model) else os.path.realpath(model)
    if legacy != "as given" and isinstance(kept.get("device"), str):
        kept["device"] = kept["device"].split(":")[0]
    return {"model": model, "batch_size": args.batch_size, "tokens": tokens_digest(batches), "settings": kept}


def saved_fingerprint(path, key: Optional[str] = None) -> Optional[dict]:
    """The fingerprint a checkpoint or journal file at ``path`` holds, as a dict (its ``key`` part,
    where the caller's fingerprint is wrapped: a rank file's ``settings``), or ``None`` (no such
    file, or none it can be read from: its reader says why)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.loads(json.load(f).get("fingerprint"))
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    saved = saved.get(key) if key is not None and isinstance(saved, dict) else saved
    return saved if isinstance(saved, dict) else None


def resumable_fingerprint(path, args, batches, settings: dict, wrap=lambda fingerprint: fingerprint,
                          key: Optional[str] = None) -> dict:
    """``wrap(collection_fingerprint(...))``, or an earlier form of it where the file at ``path``
    (a run's checkpoint, a rank's, or a journal; ``None``: not resuming) holds that one (in its
    ``key`` part): a run interrupted before the paths and the device were normalised resumes. (A
    checkpoint adds keys of its own, such as the weights' digest: a fingerprint is held where each
    of its keys is; the reader then compares the whole.)"""
    now = wrap(collection_fingerprint(args, batches, settings))
    saved = saved_fingerprint(path, key) if path is not None else None
    if saved is not None and not _holds(saved, now):
        for form in ("as given", "device by type"):
            earlier = wrap(collection_fingerprint(args, batches, settings, legacy=form))
            if _holds(saved, earlier):
                return earlier
    return now


def _holds(saved: dict, fingerprint: dict) -> bool:
    from ..hf.checkpoint import canonical

    fingerprint = json.loads(canonical(fingerprint))
    return all(saved.get(k, _ABSENT) == v for k, v in fingerprint.items())


_ABSENT = object()


def tokens_digest(batches) -> str:
    """A digest of the calibration batches: the data, its tokenization and the batching."""
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
