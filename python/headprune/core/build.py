"""Loads the native extension ``headprune._C`` once (``headprune.core.ops`` loads it when
imported), after checking that it was built for the torch that is running (version, CUDA
variant, C++ ABI); a mismatch is a clear error naming what differs instead of a crash inside
the extension."""

from __future__ import annotations

import importlib
import threading
import warnings

import torch

_loaded = None
_lock = threading.Lock()
_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (or `make build`)"


class BuildMismatchError(ImportError):
    """headprune._C was compiled for another torch than the one imported."""


def build_info() -> dict:
    """What the native extension was built for: ``torch_version``, ``cuda_version`` (None for
    a CPU build), ``with_cuda``, ``cxx11_abi``, ``cpu_isas``."""
    try:
        from .. import _build_info as bi
    except ImportError as e:
        raise ImportError(f"headprune's native extension is not built: {_REBUILD}") from e
    return {k.lower(): getattr(bi, k) for k in dir(bi) if k.isupper()}


def running_torch() -> dict:
    """The same record for the torch imported now."""
    return {"torch_version": torch.__version__.split("+")[0], "cuda_version": torch.version.cuda,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}


def mismatches(built: dict, running: dict) -> list:
    """``["torch version 2.12.0 (built) vs 2.13.0 (running)", ...]`` for every field that differs.

    A CPU-only extension runs under a CUDA torch of the same version (its ops then have no
    CUDA kernels), so only a CUDA build compiled for another CUDA version is a mismatch."""
    out = []
    if built.get("torch_version") != running["torch_version"]:
        out.append(f"torch version {built.get('torch_version')} (built) vs {running['torch_version']} (running)")
    cuda = built.get("cuda_version") if built.get("with_cuda") else None
    if cuda is not None and cuda != running["cuda_version"]:
        out.append(f"CUDA {cuda} (built) vs {running['cuda_version'] or 'none, a CPU-only torch'} (running)")
    if "cxx11_abi" in built and bool(built["cxx11_abi"]) != running["cxx11_abi"]:
        out.append(f"C++11 ABI {built['cxx11_abi']} (built) vs {running['cxx11_abi']} (running)")
    return out


def load_extension():
    """Imports ``headprune._C`` once (registering ``torch.ops.headprune.*`` and their fake
    kernels for ``torch.compile``) and returns it."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            built, running = build_info(), running_torch()
            differ = mismatches(built, running)
            if differ:
                raise BuildMismatchError(f"headprune._C does not match the running torch: {'; '.join(differ)}; {_REBUILD}")
            if not built.get("with_cuda") and running["cuda_version"] is not None:
                warnings.warn(f"headprune._C was built without CUDA kernels, under a CUDA {running['cuda_version']} torch: "
                              f"its ops refuse GPU tensors; to get them, {_REBUILD} with nvcc on the PATH", stacklevel=2)
            try:
                module = importlib.import_module("headprune._C")
            except ImportError as e:
                raise ImportError(f"headprune._C failed to load ({e}); {_REBUILD}") from e
            from .fakes import register_fakes

            register_fakes()
            _loaded = module
    return _loaded
