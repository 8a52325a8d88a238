"""Undo logs: every attribute change of an operation on a model, so a failure midway
(including ``KeyboardInterrupt``) puts the model back exactly as it was."""

from __future__ import annotations

__all__ = ["Undo"]


class Undo:
    """Every attribute change of a pruning pass, so a failure midway (including
    ``KeyboardInterrupt``) puts the model back exactly as it was."""

    _ABSENT = object()

    def __init__(self):
        self.log = []

    def set(self, obj, name, value) -> None:
        self.log.append((obj, name, getattr(obj, name, self._ABSENT) if name != "forward" else obj.__dict__.get(name, self._ABSENT)))
        setattr(obj, name, value)

    def call(self, undo_fn) -> None:
        self.log.append((None, undo_fn, None))

    def rollback(self) -> None:
        while self.log:
            obj, name, old = self.log.pop()
            if obj is None:
                name()
            elif old is self._ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
