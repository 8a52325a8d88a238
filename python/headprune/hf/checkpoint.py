"""Resumable collection: the checkpoint file of a collection's state after some batches."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import struct
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Optional

from .. import atomic
from ..stats.scores import HeadScores

__all__ = ["CHECKPOINT_FORMAT", "BatchesDigest", "Checkpoint", "canonical", "differences", "format_kind",
           "refuse_foreign", "tensor_bytes", "weights_digest", "writing"]


CHECKPOINT_FORMAT = "headprune.checkpoint/2"  # /2: the batches' digest; the weights' exact sums of bits


def refuse_foreign(path: str, ours, kind: str, run: str, arg: str = "checkpoint") -> None:
    """``ValueError`` when a file is at ``path`` and ``ours()`` (which may raise on a file it
    cannot read) says it is no ``kind`` checkpoint: a run that does not resume writes over its
    own checkpoint, never over another file."""
    if not os.path.lexists(path):
        return
    try:
        mine = bool(ours())
    except Exception:  # any unreadable file is not a checkpoint: json, pickle, zip and torch raise many types
        mine = False
    if not mine:
        raise ValueError(f"{arg}: {path} exists and is not a {kind} checkpoint; {run} would write over it, "
                         "so pass another path")


def format_kind(fmt) -> Optional[str]:
    """``"headprune.checkpoint"`` of ``"headprune.checkpoint/2"``: the kind of a checkpoint's
    format, any version (``None``: no such format)."""
    return fmt.rsplit("/", 1)[0] if isinstance(fmt, str) and "/" in fmt else None


def _ours(form) -> bool:
    """A collection checkpoint's format, of this headprune or another version."""
    return format_kind(form) == format_kind(CHECKPOINT_FORMAT)


class Checkpoint:
    """A JSON file holding a collection's state after ``batches_done`` batches: the
    ``HeadScores.to_dict()`` (float64 values round-trip exactly), the layout fingerprint of
    the model and the caller's fingerprint of the settings its numbers depend on. Written
    atomically (:func:`headprune.atomic.write_file`); the first write also removes the
    temporary files that killed writers left beside it."""

    def __init__(self, path, fingerprint: str, expected: HeadScores):
        self.path, self.fingerprint = os.fspath(path), fingerprint
        self.expected = expected  # the collection's empty scores: its layout, and what a layout refusal names
        self.layout = expected.layout_fingerprint()
        self.batches = None  # the loaded file's digest of the batches it holds (see :class:`BatchesDigest`)
        self._swept = False

    def _refuse(self, why: str, ours: bool = True):
        """The refusal to resume from the file; ``ours=False``: it is no checkpoint, which a run
        without resume would not write over either."""
        return ValueError(f"checkpoint {self.path} {why}; "
                          + ("delete it or drop resume (--resume)" if ours else "pass another path"))

    def check_replaceable(self) -> None:
        """``ValueError`` when a file at the path is not a headprune checkpoint (see :func:`refuse_foreign`)."""
        def ours():
            with open(self.path, encoding="utf-8") as f:
                return _ours(json.load(f).get("format"))

        refuse_foreign(self.path, ours, "headprune", "a collection")

    def load(self) -> Optional[tuple]:
        """``(HeadScores, batches_done)``, or ``None`` when there is no file yet."""
        try:
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._refuse(f"is not a readable headprune checkpoint ({type(e).__name__}: {e})", False) from e
        if not isinstance(d, dict) or not _ours(d.get("format")):
            raise self._refuse(f"is not a headprune checkpoint (expected format {CHECKPOINT_FORMAT!r})", False)
        if d["format"] != CHECKPOINT_FORMAT:  # another version's: a run that does not resume replaces it
            raise self._refuse(f"was written by another headprune (format {d['format']!r}; this one reads "
                               f"{CHECKPOINT_FORMAT!r})")
        if d.get("layout") != self.layout:
            raise self._refuse(f"was written for {self._layout_difference(d)}")
        if _earlier(d.get("fingerprint")):
            raise self._refuse("was written by an earlier headprune, whose fingerprint did not cover the model's config")
        if d.get("fingerprint") != self.fingerprint:
            raise self._refuse(f"was written with other settings ({differences(d.get('fingerprint'), self.fingerprint)})")
        done = d.get("batches_done")
        try:
            scores = HeadScores.from_dict(d.get("scores"))
            scores.moments = self._load_moments(d.get("moments"), scores.num_sites, d.get("moments_sha256"))
            ok = scores.layout_fingerprint() == self.layout and isinstance(done, int) and done >= 0
        except (TypeError, ValueError, RuntimeError, KeyError, OSError) as e:
            raise self._refuse(f"is corrupt ({type(e).__name__}: {e})") from e
        if not ok:
            raise self._refuse("is corrupt (its scores or batches_done do not match its header)")
        if not isinstance(d.get("batches_sha256"), str):
            raise self._refuse("was written by an earlier headprune, which did not record which batches it holds")
        self.batches = d["batches_sha256"]
        return scores, done

    def check_batches(self, digest: str, done: int) -> None:
        """The first ``done`` batches of this run are those the checkpoint holds (``digest``: theirs,
        :class:`BatchesDigest`): the sums would mix two calibrations. Checked whatever the caller's
        fingerprint says of its data."""
        if digest != self.batches:
            raise self._refuse(f"was written for other batches (the first {done} of these differ from those it "
                               "holds)")

    def _layout_difference(self, d: dict) -> str:
        """What differs between the checkpoint's layout and this collection's, in the words
        of the options that set it."""
        unknown = "another model or other collection settings (the layout of its statistics differs)"
        try:
            saved = HeadScores.from_dict(d.get("scores"))
        except (TypeError, ValueError, KeyError, AttributeError):
            return unknown
        now, out = self.expected, []
        if saved.layout() != now.layout():
            out.append("another model (its attention sites or heads differ)")
        if saved.method != now.method:
            out.append(f"another method ({saved.method!r} in the checkpoint, {now.method!r} now)")
        if (d.get("moments") is None) != (now.moments is None):
            have = lambda m: "no second moments" if m else "second moments"  # noqa: E731
            out.append(f"{have(d.get('moments') is None)}, and this collection asks for "
                       f"{have(now.moments is None)} (moments=)")
        if (saved.outputs is None) != (now.outputs is None):
            out.append("other output statistics")
        return "; ".join(out) or unknown

    def save(self, scores: HeadScores, done: int, batches: str) -> None:
        """``batches``: the digest of the ``done`` batches (:class:`BatchesDigest`)."""
        data = {"format": CHECKPOINT_FORMAT, "batches_done": done, "layout": self.layout,
                "fingerprint": self.fingerprint, "scores": scores.to_dict(), "moments": None,
                "batches_sha256": batches}
        with writing(self, self.path) as folder:
            if scores.moments is not None:  # beside the JSON, a name of its own: an existing JSON's stays as it names
                blob = scores.moments.to_bytes()
                data["moments"] = f"{os.path.basename(self.path)}.moments-{done}-{secrets.token_hex(4)}.safetensors"
                data["moments_sha256"] = hashlib.sha256(blob).hexdigest()
                atomic.write_file(os.path.join(folder, data["moments"]), blob)
            atomic.write_file(self.path, json.dumps(data))  # readers see the old file or the new one
            self._remove_old_moments(folder, data["moments"])


    def _load_moments(self, name, sites: int, digest=None):
        """The second moments the checkpoint names (a file beside it), or ``None``; ``digest``:
        the SHA-256 of the file as written (checkpoints before it recorded none)."""
        from ..stats.moments import OutputMoments

        if name is None:
            return None
        if not isinstance(name, str) or os.path.basename(name) != name:
            raise ValueError(f"moments file {name!r} is not a file name beside the checkpoint")
        path = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        if digest is not None:
            h = hashlib.sha256()
            with open(path, "rb") as f:  # in chunks: a large model's moments are GiBs
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            if h.hexdigest() != digest:
                raise ValueError(f"moments file {name} holds other bytes than the checkpoint wrote")
        moments = OutputMoments.load(path)
        if moments.num_sites != sites:
            raise ValueError(f"moments file {name} holds {moments.num_sites} sites, the scores {sites}")
        return moments

    def _remove_old_moments(self, folder: str, keep) -> None:
        """Moments files of earlier saves of this checkpoint (exact names, no glob)."""
        prefix = f"{os.path.basename(self.path)}.moments-"
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(".safetensors") and name != keep:
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass


def tensor_bytes(t) -> bytes:
    """A tensor's values as bytes (any type, layout or device), for digests."""
    import torch

    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class BatchesDigest:
    """A running SHA-256 of a collection's batches: every key and value of each, tensors by their
    type, shape and bytes (``labels`` too, from which a T5 derives its decoder's input)."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, batch: Mapping, *, check: bool = True) -> None:
        """Feed one batch (``check``: refuse one that is no dict, else hash it as any value)."""
        from .batches import check_batch

        if check:
            check_batch(batch)
        self._feed(dict(batch) if isinstance(batch, Mapping) else batch)

    def _feed(self, v) -> None:
        """One value: tensors by their type, shape and bytes; numbers, strings and None by their
        text; lists, tuples and dicts item by item; anything else by its type."""
        import numpy as np
        import torch

        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, torch.Tensor):
            raw = tensor_bytes(v)
            self._h.update(f"T{v.dtype}:{tuple(v.shape)}:{len(raw)};".encode() + raw)
        elif v is None or isinstance(v, (bool, int, float, str)):
            self._h.update(f"V{type(v).__name__}={v!r};".encode())
        elif isinstance(v, (list, tuple)):
            self._h.update(f"L{len(v)}[".encode())
            for item in v:
                self._feed(item)
        elif isinstance(v, Mapping):
            self._h.update(f"D{len(v)}{{".encode())
            for k in sorted(v, key=str):
                self._h.update(f"{k!r}:".encode())
                self._feed(v[k])
        else:  # by its type alone (its text may hold an address, or abridge what it holds)
            self._h.update(f"O{type(v).__module__}.{type(v).__qualname__};".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@contextmanager
def writing(owner, path):
    """Around a checkpoint's writes (``as`` its folder): the folder made, on ``owner``'s first write
    (``owner._swept`` false) the temporary files that killed writers left there removed, and an
    ``OSError`` named as the checkpoint's."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        if not owner._swept:
            atomic.remove_leftovers(folder)
            owner._swept = True
        yield folder
    except OSError as e:
        message = f"checkpoint: cannot write {os.path.abspath(path)} ({e.strerror or e})"
        raise (OSError(e.errno, message) if e.errno else OSError(message)) from e


def _earlier(saved) -> bool:
    """A fingerprint of the releases whose model digest left the config out (key ``weights``)."""
    try:
        saved = json.loads(saved)
    except (TypeError, ValueError):
        return False
    return isinstance(saved, dict) and "weights" in saved and "weights and config" not in saved


def differences(saved, now, where: str = "the checkpoint") -> str:
    """``"seq_len: 9 in the checkpoint, 10 now"``: where two JSON fingerprints differ (``where``:
    the saved one's name)."""
    try:
        a, b = _flat(json.loads(saved)), _flat(json.loads(now))
    except (TypeError, ValueError):
        a, b = {}, {}
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if not keys:
        return "the calibration settings differ"
    return "; ".join(f"{k}: {a.get(k)} in {where}, {b.get(k)} now" for k in keys[:4])


def _flat(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def canonical(fingerprint) -> str:
    if isinstance(fingerprint, Mapping):
        return json.dumps(fingerprint, sort_keys=True, default=str)
    if not isinstance(fingerprint, str):
        raise TypeError(f"fingerprint: expected a str or a dict, got {type(fingerprint).__name__}")
    return fingerprint


def weights_digest(model) -> str:
    """A short digest of ``model``'s weights: every parameter's and buffer's name, shape and type,
    the sum of its values' bits and a strided sample of 256 of its values, and a transformers model's config
    (all but where it was read from and the transformers version writing it). A resume compares
    it, so a checkpoint written for other weights of the same layout (a directory pruned again with
    ``--force``, a fine-tune saved over it) or for another config of the same weights (an edited
    ``config.json``: another activation, norm epsilon or rotary base) is refused; it reads each
    tensor once without hashing every byte."""
    import torch

    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if callable(getattr(config, "to_json_string", None)):  # where it was read from and the installed transformers aside
        fields = {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items()
                  if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(fields, sort_keys=True).encode())
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.numel() == 0 or t.device.type == "meta":
                continue
            flat = t.detach().reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 256)][:256].double().cpu().numpy().tobytes())
            h.update(struct.pack("<Q", _bits_sum(flat)))
    return h.hexdigest()[:16]


def _bits_sum(flat) -> int:
    """The sum of a tensor's values read as integers (their bits), modulo 2^64: exact, so the same
    on any number of threads and machines (a float sum's rounding depends on how it is split)."""
    import torch

    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    total = 0
    for chunk in flat.contiguous().view(ints).split(1 << 22):  # int64 copies of a bounded size
        total += int(chunk.sum(dtype=torch.int64))
    return total % (1 << 64)

