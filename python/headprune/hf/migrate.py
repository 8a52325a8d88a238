"""Reading a directory that transformers 4 pruned (``model.prune_heads`` then ``save_pretrained``).

transformers 4 saved the original head counts in ``config.json`` with a ``pruned_heads``
record (``{"layer": [original head indices]}``) and weights of the pruned shapes; transformers
5 reads neither. Such a directory is described here in the terms of ``headprune.json``
(kept heads per site, the original config), so ``load_pruned`` rebuilds it the way it
rebuilds its own directories: the original model pruned to the same heads on the meta
device, checked tensor by tensor against the weights, then built and loaded bit-exactly.
Families whose weights transformers 5 renamed are refused by that check with the names that
differ.
"""

from __future__ import annotations

import json
import os
import re

from ..prune.slicing import kv_layout
from .files import read_json
from .metadata import DTYPES, FORMAT, METADATA_FILE

__all__ = ["is_transformers4_pruned", "obsolete", "transformers4_metadata"]

#: buffers transformers 4 saved that transformers 5's models no longer hold (``from_pretrained``
#: ignores them, beside each class's ``_keys_to_ignore_on_load_unexpected``): rotary
#: frequencies and position ids made non-persistent, GPT-2's constant ``masked_bias``
OBSOLETE = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$", r"attn\.masked_bias$")


def is_transformers4_pruned(path) -> bool:
    """Whether ``path`` is a directory without ``headprune.json`` whose ``config.json`` has a
    non-empty transformers 4 ``pruned_heads`` record."""
    config = os.path.join(os.fspath(path), "config.json")
    if os.path.lexists(os.path.join(os.fspath(path), METADATA_FILE)) or not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            head = f.read(1 << 22)
        return bool(json.loads(head).get("pruned_heads")) if '"pruned_heads"' in head else False
    except (OSError, ValueError, AttributeError):
        return False


def transformers4_metadata(path, what: str = "path") -> dict:
    """The ``headprune.json`` record of a transformers 4 pruned directory (not written)."""
    from .adapters import ADAPTERS

    file = os.path.join(os.fspath(path), "config.json")
    config = read_json(file, what)
    pruned = config.pop("pruned_heads", None)
    model_type = config.get("model_type")
    adapter = ADAPTERS.get(model_type)
    if adapter is None or len(adapter.blocks) != 1:
        raise ValueError(f"{what}: {file} is a transformers 4 pruned {model_type!r} model; headprune reads those of "
                         f"one-stack families ({', '.join(sorted(t for t, a in ADAPTERS.items() if len(a.blocks) == 1))})")
    heads = _heads(config, file, what)
    layers = _layers(config, file, what)
    kept = [list(range(heads)) for _ in range(layers)]
    for layer, hs in _pruned(pruned, layers, heads, file, what).items():
        kept[layer] = [h for h in kept[layer] if h not in set(hs)]
    archs = config.get("architectures") or [_base_class(model_type)]  # none named: the family's base model
    return {"format": FORMAT, "model_type": model_type, "architecture": archs[0],
            "attn_implementation": "sdpa", "dtype": _dtype(config), "kept_heads": kept,
            "kv_heads": [kv_layout(k, heads // (config.get("num_key_value_heads") or heads))[0] for k in kept],
            "per_layer_bias": [], "o_bias": [], "plain_loadable": False, "original_config": config,
            "settings": {"migrated_from": "transformers 4 pruned_heads", "pruned_heads": pruned}}


def obsolete(cls, header: dict, expected) -> list:
    """The names in ``header`` (a transformers 4 directory's tensors) that the model (its
    ``expected`` tensor names) lacks and transformers 5's ``cls.from_pretrained`` ignores
    (:data:`OBSOLETE` and the class's ``_keys_to_ignore_on_load_unexpected``): a pruned GPT-2
    or BERT saved before those buffers became non-persistent holds ``attn.bias`` or
    ``position_ids``."""
    patterns = [*OBSOLETE, *(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ())]
    ignored = re.compile("|".join(f"({p})" for p in patterns))
    return [k for k in header if k not in expected and ignored.search(k) is not None]


def _heads(config: dict, file: str, what: str) -> int:
    for key in ("num_attention_heads", "n_head", "n_heads", "num_heads"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    raise ValueError(f"{what}: {file} has no head count (num_attention_heads) to read pruned_heads against")


def _layers(config: dict, file: str, what: str) -> int:
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(config.get(key), int) and 0 < config[key] <= 10_000:
            return config[key]
    raise ValueError(f"{what}: {file} has no layer count (num_hidden_layers) to read pruned_heads against")


def _pruned(pruned, layers: int, heads: int, file: str, what: str) -> dict:
    if not isinstance(pruned, dict):
        raise ValueError(f"{what}: {file} has pruned_heads of type {type(pruned).__name__}; expected "
                         "{layer: [heads]}")
    out = {}
    for key, hs in pruned.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {file} has pruned_heads key {key!r}; expected a layer index") from None
        ok = isinstance(hs, list) and all(type(h) is int and 0 <= h < heads for h in hs)
        if not 0 <= layer < layers or not ok:
            raise ValueError(f"{what}: {file} has pruned_heads {{{key!r}: {str(hs)[:40]}}}; expected a layer below "
                             f"{layers} and head indices below {heads}")
        out[layer] = sorted(set(hs))
    return out


def _base_class(model_type: str) -> str:
    import transformers

    return transformers.MODEL_MAPPING[transformers.CONFIG_MAPPING[model_type]].__name__


def _dtype(config: dict) -> str:
    d = config.get("torch_dtype") or config.get("dtype") or "float32"
    return d if d in DTYPES else "float32"
