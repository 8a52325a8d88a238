"""Temporary changes to a model's modules that put back exactly what was there: every
module's own training flag, and a ``forward`` set on the instance (accelerate's hooks, for
example, live there)."""

from __future__ import annotations

from contextlib import contextmanager

__all__ = ["eval_mode", "instance_forward"]

_MISSING = object()


@contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block; every module's training flag as it was after
    (``model.train(flag)`` would set one flag for all of them)."""
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, flag in training.items():
            m.training = flag


@contextmanager
def instance_forward(module, forward):
    """``module.forward`` replaced by ``forward`` inside the block; after it, the instance's
    own ``forward`` (if it had one) is back, else the class's."""
    old = module.__dict__.get("forward", _MISSING)
    module.forward = forward
    try:
        yield module
    finally:
        if old is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = old
