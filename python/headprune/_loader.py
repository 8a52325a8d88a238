"""Loads headprune._C after checking it was built for the torch that is running."""

from __future__ import annotations

import importlib

import torch

_loaded = None


class BuildMismatchError(ImportError):
    """headprune._C was compiled for another torch than the one imported."""


def build_info() -> dict:
    """What the native extension was built for (torch version, CUDA, CPU instruction sets)."""
    try:
        from . import _build_info as bi
    except ImportError as e:  # pragma: no cover - only without a build
        raise ImportError(
            "headprune's native extension is not built: run `pip install --no-build-isolation -e .` "
            "in the source tree (or `make build`)"
        ) from e
    return {k.lower(): getattr(bi, k) for k in dir(bi) if k.isupper()}


def load_extension():
    """Imports headprune._C once (which registers torch.ops.headprune.*) and returns it."""
    global _loaded
    if _loaded is not None:
        return _loaded
    info = build_info()
    running = torch.__version__.split("+")[0]
    if info["torch_version"] != running:
        raise BuildMismatchError(
            f"headprune._C was built for torch {info['torch_version']} but torch {running} is imported; "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
    try:
        _loaded = importlib.import_module("headprune._C")
    except ImportError as e:
        raise ImportError(f"headprune._C failed to load ({e}); rebuild with `pip install --no-build-isolation -e .`") from e
    return _loaded
