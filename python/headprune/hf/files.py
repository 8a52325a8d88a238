"""Reading a model directory without trusting it: regular files only, JSON of bounded size, and
safetensors headers (tensor names and shapes, no data). Damage is reported as a ``ValueError``
(a missing file as ``FileNotFoundError``) whose message starts with the argument's name and
names the file, never as the reader's own exception type.
"""

from __future__ import annotations

import json
import math
import os
import stat

__all__ = ["regular_file", "read_json", "safetensors_files", "read_header", "MAX_JSON_BYTES", "SAFE_WEIGHTS",
           "SAFE_INDEX", "first_line"]

#: headprune.json with the scores of a large model is a few MB, a config a few KB
MAX_JSON_BYTES = 64 << 20
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def regular_file(file, what: str) -> str:
    """``file`` if it is a regular file. Symlinks to one are fine (the Hugging Face cache links
    snapshots to blobs); a FIFO or a device would block or never end."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {file} does not exist") from None
    except OSError as e:  # a symlink loop, a name too long
        raise ValueError(f"{what}: cannot read {file} ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what}: {file} is not a regular file")
    return os.fspath(file)


def read_json(file, what: str, *, hint: str = "", limit: int = MAX_JSON_BYTES):
    """The JSON value in ``file``, read only if it is a regular file of at most ``limit`` bytes."""
    regular_file(file, what)
    size = os.path.getsize(file)
    if size > limit:
        raise ValueError(f"{what}: {file} is {size:,} bytes, more than the {limit:,} it may have{hint}")
    try:
        with open(file, "rb") as f:
            return json.loads(f.read())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ValueError(f"{what}: {file} is not valid JSON ({reason}){hint}") from None
    except PermissionError as e:
        raise PermissionError(f"{what}: cannot read {file} ({e.strerror})") from None
    except OSError as e:
        raise ValueError(f"{what}: cannot read {file} ({e.strerror})") from None


def safetensors_files(path, what: str, name: str = None) -> list:
    """The weight files of the directory ``path``: ``name`` if given, else ``model.safetensors``
    or, without it, the shards its index lists (transformers' order: the files checked are the
    files it loads). Pickled ``.bin`` weights are never read (unpickling can run code)."""
    if name is not None:
        return [_weights_file(path, name, what)]
    index = os.path.join(path, SAFE_INDEX)
    if os.path.lexists(os.path.join(path, SAFE_WEIGHTS)) or not os.path.lexists(index):
        return [_weights_file(path, SAFE_WEIGHTS, what)]
    data = read_json(index, what)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{what}: {index} has no weight_map of tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    bad = [s for s in shards if os.path.basename(s) != s or not s.endswith(".safetensors") or s.startswith(".")]
    if bad:
        raise ValueError(f"{what}: {index} names shards outside the directory or not .safetensors: {bad[:3]}")
    return [_weights_file(path, s, what) for s in shards]


def _weights_file(path, name: str, what: str) -> str:
    file = os.path.join(path, name)
    if not os.path.lexists(file):
        pickled = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")))
        note = f" (pickled weights such as {pickled[0]} are never loaded: unpickling can run code)" if pickled else ""
        raise FileNotFoundError(f"{what}: {path} has no {name}{note}")
    return regular_file(file, what)


def read_header(files: list, what: str) -> dict:
    """``{tensor name: shape}`` of the safetensors ``files``, from their headers alone. The
    safetensors reader checks that the data of every tensor lies inside its file, so these
    shapes bound what loading the file allocates."""
    from safetensors import SafetensorError, safe_open

    out: dict = {}
    for file in files:
        try:
            with safe_open(file, "pt") as f:
                names = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise ValueError(f"{what}: {file} is not a readable safetensors file ({first_line(e)})") from None
        twice = sorted(set(shapes) & set(out))
        if twice:
            raise ValueError(f"{what}: {file} holds tensors that another shard holds too: {twice[:3]}")
        out.update(shapes)
    return out


_FLOAT_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _float_tensors(files: list) -> dict | None:
    """``{tensor name: (float type, elements)}`` of the floating tensors of the safetensors
    ``files``, from their headers, or ``None`` when one cannot be read."""
    from safetensors import SafetensorError, safe_open

    out: dict = {}
    try:
        for file in files:
            with safe_open(file, "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    name = _FLOAT_NAMES.get(sl.get_dtype())
                    if name is not None:
                        out[k] = (name, math.prod(sl.get_shape()))
    except (SafetensorError, OSError, ValueError, TypeError):
        return None
    return out


def stored_float_type(files: list) -> str | None:
    """The float type that holds most of the weights' elements in the safetensors ``files``
    ("float32", "float16", "bfloat16", "float64"), or ``None`` when they hold no floats or
    cannot be read: what a checkpoint whose config names no type was stored in."""
    counts: dict = {}
    for name, n in (_float_tensors(files) or {}).values():
        counts[name] = counts.get(name, 0) + n
    return max(counts, key=counts.get) if counts else None


def stored_float_types(files: list) -> dict:
    """``{tensor name: float type}`` of the floating tensors of the safetensors ``files`` (an
    unreadable file reads as none: the loader reports it)."""
    return {k: name for k, (name, _) in (_float_tensors(files) or {}).items()}


def cast_as_stored(model, types: dict) -> None:
    """Each parameter and saved buffer of ``model`` named in ``types`` (by its state-dict name)
    in that float type: a model read wide because its files mix types gets each back as stored."""
    import torch

    from ..core.modules import retype

    def stored(m, module, n, t):
        want = types.get(f"{m}.{n}" if m else n)
        return getattr(torch, want) if want is not None and t.is_floating_point() else None

    retype(model, stored)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (transformers' run to many lines), or its type."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
