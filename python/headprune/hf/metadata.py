"""``headprune.json``, the record :func:`~headprune.hf.save_pruned` writes beside a pruned
model's weights, and its validation.

:func:`read_metadata` checks every field's type and form, and the fields against each other,
before anything is built, with one message per field naming it. What needs the model (head
counts, site names, the weights' shapes) is checked by :func:`~headprune.hf.load_pruned` on the
meta device.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import torch

from .adapters import ADAPTERS, supported_model_types
from .files import first_line, read_json

__all__ = ["METADATA_FILE", "FORMAT", "WEIGHTS_FILE", "DTYPES", "read_metadata", "check_attn_implementation", "attention_to_load",
           "check_save_arguments", "model_class"]

METADATA_FILE = "headprune.json"
FORMAT = "headprune.pruned/1"
#: weights of a directory only load_pruned can rebuild; not the name from_pretrained looks for,
#: so plain loading fails loudly instead of loading a wrong layout or dropping weights
WEIGHTS_FILE = "headprune-model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
#: attention implementations transformers runs from its own code; anything of the form
#: ``org/name`` is a kernel it would download from the Hub and run
LOCAL_ATTENTION = ("eager", "sdpa", "flex_attention")
_HINT = "; was it written by headprune.save_pruned?"
_REQUIRED = ("architecture", "dtype", "attn_implementation", "kept_heads", "kv_heads", "per_layer_bias",
             "plain_loadable", "original_config")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_index(x) -> bool:
    return type(x) is int and x >= 0  # not bool: True is an int


def _increasing(xs) -> bool:
    return isinstance(xs, list) and all(map(_is_index, xs)) and all(a < b for a, b in zip(xs, xs[1:]))


def _scores(value) -> bool:
    if value is None:
        return True
    from ..stats.scores import HeadScores

    try:
        HeadScores.from_dict(value)
    except Exception:  # any failure to read them back means they are not HeadScores.to_dict()
        return False
    return True


def _heads(v) -> bool:
    return isinstance(v, list) and all(map(_is_index, v))


#: field -> (check of its value alone, what was expected); a field whose check is given as
#: ``(list, check)`` is a list whose items are checked one by one, so the message names the item
_FIELDS = {
    "model_type": (lambda v: isinstance(v, str) and v in ADAPTERS, f"one of {', '.join(supported_model_types())}"),
    "architecture": (lambda v: isinstance(v, str) and re.fullmatch(r"[A-Z][A-Za-z0-9_]*", v) is not None,
                     "the name of a transformers model class, such as 'LlamaModel'"),
    "dtype": (lambda v: isinstance(v, str) and v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "sites": ((list, lambda v: isinstance(v, str)), "a site name"),
    "kept_heads": ((list, _increasing), "increasing head indices"),
    "kv_heads": ((type(None), list, _heads), "KV head indices (or kv_heads null)"),
    "per_layer_bias": ((list, lambda v: isinstance(v, str)), "a block name such as 'decoder.self'"),
    "o_bias": (_increasing, "a list of increasing site indices"),
    "plain_loadable": (lambda v: type(v) is bool, "true or false"),
    "original_config": (lambda v: v is None or isinstance(v, dict), "null or the original config as an object"),
    "scores": (_scores, "null or scores written by HeadScores.to_dict()"),
    "settings": (lambda v: isinstance(v, dict), "an object"),
}


def _field_error(name, value):
    """Why ``value`` is wrong for the field ``name`` (None if it is right)."""
    check, expected = _FIELDS[name]
    if callable(check):
        return None if check(value) else f"{name} {_short(value)}; expected {expected}"
    *containers, item_ok = check
    if value is None and type(None) in containers:
        return None
    if not isinstance(value, list):
        return f"{name} {_short(value)}; expected a list"
    bad = next((i for i, v in enumerate(value) if not item_ok(v)), None)
    return None if bad is None else f"{name}[{bad}] {_short(value[bad])}; expected {expected}"


def output_model(path):
    """The model directory inside ``path`` where ``path`` is a folder ``headprune prune`` or
    ``recover`` wrote (``model/`` beside ``report.json``, no ``headprune.json`` of its own), else ``None``."""
    inner = os.path.join(path, "model")
    if os.path.lexists(os.path.join(path, METADATA_FILE)) or not os.path.isfile(os.path.join(path, "report.json")):
        return None
    return inner if os.path.isfile(os.path.join(inner, METADATA_FILE)) else None


def read_metadata(path, what: str = "path") -> dict:
    """``headprune.json`` of the directory ``path``, every field checked (``ValueError`` naming
    the first wrong field; ``FileNotFoundError`` if there is none)."""
    file = os.path.join(path, METADATA_FILE)
    if not os.path.lexists(file):
        inner = output_model(path)
        if inner is not None:
            raise FileNotFoundError(f"{what}: {os.fspath(path)!r} is a folder headprune wrote (prune or recover); the "
                                    f"model is its model/: load {inner!r}")
        raise FileNotFoundError(f"{what}: {os.fspath(path)!r} has no {METADATA_FILE}{_HINT}")
    meta = read_json(file, what, hint=_HINT)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{what}: {file} has format {_short(found)}, expected {FORMAT!r}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{what}: {file} lacks {missing}{_HINT}")
    meta.setdefault("o_bias", [])
    meta.setdefault("settings", {})
    for name in _FIELDS:
        problem = _field_error(name, meta[name]) if name in meta else None
        if problem:
            raise ValueError(f"{what}: {file} has {problem}")
    problem = _inconsistent(meta)
    if problem:
        raise ValueError(f"{what}: {file} has {problem}")
    if not isinstance(meta["attn_implementation"], str):  # a name that cannot run here is replaced on load
        check_attn_implementation(meta["attn_implementation"], f"{what}: {file} has attn_implementation")
    return meta


def attention_to_load(meta: dict, wanted, file: str, cls=None) -> str:
    """The attention implementation a load builds the model with: ``wanted`` where given (checked
    as :func:`check_attn_implementation` does), else the one ``meta`` records where it runs here,
    else ``sdpa`` (``eager`` for a class ``cls`` without an SDPA path, Gemma 2's) with a warning
    (a model saved on a GPU with flash-attn, or with a Hub kernel, which is never fetched: the
    weights do not depend on it)."""
    if wanted is not None:
        check_attn_implementation(wanted, "attn_implementation:")
        return wanted
    recorded = meta["attn_implementation"]
    try:
        check_attn_implementation(recorded, "")
    except ValueError:
        import warnings

        instead = "sdpa" if getattr(cls, "_supports_sdpa", True) else "eager"
        warnings.warn(f"{file} records attn_implementation {_short(recorded)}, which does not run here; the model "
                      f"is loaded with {instead} (attn_implementation= chooses another)", stacklevel=3)
        return instead
    return recorded


def _inconsistent(meta) -> str:
    """The first field that contradicts another (empty if none)."""
    n = len(meta["kept_heads"])
    pruned = meta["original_config"] is not None
    if (meta["kv_heads"] is not None) != pruned:
        return "kv_heads and original_config not both null (an unpruned model) or both set (a pruned one)"
    if pruned and len(meta["kv_heads"]) != n:
        return f"kv_heads for {len(meta['kv_heads'])} sites and kept_heads for {n}"
    if "sites" in meta and len(meta["sites"]) != n:
        return f"{len(meta['sites'])} sites and kept_heads for {n}"
    if meta["o_bias"] and meta["o_bias"][-1] >= n:
        return f"o_bias {_short(meta['o_bias'])}; expected site indices below {n}"
    if not pruned and not meta["plain_loadable"]:
        return "plain_loadable false without an original_config to rebuild the model from"
    if meta["plain_loadable"] and (meta["o_bias"] or meta["per_layer_bias"]):
        return "plain_loadable true with o_bias or per_layer_bias, which a plain config cannot express"
    return ""


def check_attn_implementation(value, what: str) -> None:
    """Accept only attention implementations transformers has locally: ``eager``, ``sdpa``,
    ``flex_attention``, and ``flash_attention_N`` where its package is installed (without it,
    transformers would fetch a kernel from the Hub instead)."""
    if value in LOCAL_ATTENTION:
        return
    flash = re.fullmatch(r"flash_attention_(\d)", value) if isinstance(value, str) else None
    if flash is None:
        raise ValueError(f"{what} {_short(value)}; expected one of {', '.join(LOCAL_ATTENTION)}, flash_attention_2 "
                         "(kernels named 'org/name' are refused: they are downloaded and run)")
    try:
        from transformers.modeling_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX as matrix

        installed = matrix[int(flash.group(1))]["general_availability_check"]()
    except (ImportError, KeyError, TypeError):
        installed = False
    if not installed:
        raise ValueError(f"{what} {value!r}, whose flash-attn package is not installed here; "
                         f"use one of {', '.join(LOCAL_ATTENTION)}")


def model_class(meta: dict, what: str, file: str):
    """The transformers class named by ``architecture`` in ``file``, if it is a model class of a
    supported family (and of ``model_type``, where given)."""
    import transformers

    name = meta["architecture"]
    try:
        cls = getattr(transformers, name, None)
    except Exception as e:  # a lazily imported module that fails to import
        raise ValueError(f"{what}: {file} has architecture {name!r}, which fails to import "
                         f"({first_line(e)})") from None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{what}: {file} has unknown architecture {name!r}: not a transformers model class")
    model_type = getattr(cls.config_class, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"{what}: {file} has architecture {name!r}, of model_type {model_type!r}; "
                         f"headprune supports {', '.join(supported_model_types())}")
    if meta.get("model_type", model_type) != model_type:
        raise ValueError(f"{what}: {file} has model_type {meta['model_type']!r} but architecture {name!r}, "
                         f"a {model_type} model")
    return cls


def check_save_arguments(path, tokenizer, scores, settings, adapter, sites) -> None:
    """``save_pruned``'s arguments, before anything is written: ``scores`` must describe this
    model's attention sites (they go into headprune.json beside its kept heads)."""
    from transformers import GenerationConfig, PretrainedConfig

    from ..stats.scores import HeadScores

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    if tokenizer is not None and (not callable(getattr(tokenizer, "save_pretrained", None)) or isinstance(
            tokenizer, (torch.nn.Module, PretrainedConfig, GenerationConfig))):  # theirs would write over the model's files
        raise TypeError(f"tokenizer: expected a tokenizer or processor with save_pretrained, got "
                        f"{type(tokenizer).__name__}")
    if scores is not None and not isinstance(scores, HeadScores):
        raise TypeError(f"scores: expected HeadScores or None, got {type(scores).__name__}")
    if scores is not None and (scores.num_sites != len(sites) or scores.model_type not in (None, adapter.model_type)):
        raise ValueError(f"scores: statistics of a {scores.model_type or 'model'} with {scores.num_sites} attention "
                         f"sites, not of this {adapter.model_type} with {len(sites)}")
    if settings is not None:
        if not isinstance(settings, dict):
            raise TypeError(f"settings: expected a dict or None, got {type(settings).__name__}")
        try:
            json.dumps(settings, allow_nan=False)  # NaN and Infinity are not JSON: strict parsers refuse them
        except (TypeError, ValueError) as e:
            where = _first(settings, "settings", lambda v, at: isinstance(v, float) and not math.isfinite(v)
                           and f"{at} = {v}")
            raise TypeError(f"settings: expected values JSON can hold "
                            f"({f'{where} is not a finite number' if where else e})") from None
        # a key JSON would turn into a string, read back as one
        if where := _first(settings, "settings", lambda v, at: isinstance(v, dict) and next(
                (f"the key {k!r} of {at}" for k in v if not isinstance(k, str)), None)):
            raise TypeError(f"settings: expected string keys, as JSON holds them; {where} is not a string")


def _first(value, where: str, found) -> Optional[str]:
    """The first ``found(v, where_v)`` that is not falsy over ``value`` and the dicts' and lists'
    values within it, depth first (``where``: how ``value`` is named), else ``None``."""
    if hit := found(value, where):
        return hit
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return next((w for k, v in items if (w := _first(v, f"{where}[{k!r}]", found))), None)


def refuse_plain_loaded(model, counts: list) -> None:
    """Refuse to take head indices on a model headprune has no record of (``counts``: its sites'
    query heads) whose config names a directory headprune saved with heads removed before the last
    (a uniform layout loaded with plain ``from_pretrained``): its heads' positions are not the
    original indices that ``headprune.json`` beside the weights keeps, and a pruning would remove
    other heads than those named and record the pruned config as the original."""
    path = getattr(model.config, "_name_or_path", None)
    file = os.path.join(path, METADATA_FILE) if isinstance(path, str) and path else None
    if file is None or not os.path.isfile(file):
        return
    try:
        kept = read_json(file, "headprune.json").get("kept_heads")
    except (OSError, ValueError, AttributeError):
        return  # not a record headprune reads: nothing to go by
    if (not isinstance(kept, list) or len(kept) != len(counts)
            or not all(isinstance(k, list) and len(k) == c for k, c in zip(kept, counts))):
        return  # another layout than the model's: written over since, or not its record
    moved = {i: k for i, k in enumerate(kept) if k != list(range(len(k)))}
    if moved:
        raise ValueError(f"model: loaded from {path} without its pruning record (plain from_pretrained), so its "
                         f"heads' positions are not the original indices heads= names (layer {next(iter(moved))} "
                         f"keeps original heads {next(iter(moved.values()))}, {file}); load it with "
                         "headprune.load_pruned")

