"""Resumable collection: the checkpoint file of a collection's state after some batches."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Optional

from ..stats.scores import HeadScores

__all__ = ["CHECKPOINT_FORMAT", "Checkpoint", "canonical"]


CHECKPOINT_FORMAT = "headprune.checkpoint/1"


class Checkpoint:
    """A JSON file holding a collection's state after ``batches_done`` batches: the
    ``HeadScores.to_dict()`` (float64 values round-trip exactly), the layout fingerprint of
    the model and the caller's fingerprint of the calibration settings. Written atomically."""

    def __init__(self, path, fingerprint: str, layout: str):
        self.path, self.fingerprint, self.layout = os.fspath(path), fingerprint, layout

    def _refuse(self, why: str):
        return ValueError(f"checkpoint {self.path} {why}; delete it or drop --resume")

    def load(self) -> Optional[tuple]:
        """``(HeadScores, batches_done)``, or ``None`` when there is no file yet."""
        try:
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._refuse(f"is not a readable headprune checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
            raise self._refuse(f"is not a headprune checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        if d.get("layout") != self.layout or d.get("fingerprint") != self.fingerprint:
            what = "model layout" if d.get("layout") != self.layout else "calibration settings"
            raise self._refuse(f"was written for another model/data (the {what} differ)")
        done = d.get("batches_done")
        try:
            scores = HeadScores.from_dict(d.get("scores"))
            ok = scores.layout_fingerprint() == self.layout and isinstance(done, int) and done >= 0
        except (TypeError, ValueError, RuntimeError, KeyError) as e:
            raise self._refuse(f"is corrupt ({type(e).__name__}: {e})") from e
        if not ok:
            raise self._refuse("is corrupt (its scores or batches_done do not match its header)")
        return scores, done

    def save(self, scores: HeadScores, done: int) -> None:
        data = {"format": CHECKPOINT_FORMAT, "batches_done": done, "layout": self.layout,
                "fingerprint": self.fingerprint, "scores": scores.to_dict()}
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def canonical(fingerprint) -> str:
    if isinstance(fingerprint, Mapping):
        return json.dumps(fingerprint, sort_keys=True, default=str)
    if not isinstance(fingerprint, str):
        raise TypeError(f"fingerprint: expected a str or a dict, got {type(fingerprint).__name__}")
    return fingerprint
