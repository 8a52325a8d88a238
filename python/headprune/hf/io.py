"""Saving and reloading pruned models (safetensors + JSON, never pickles).

``headprune.json`` records, per attention site, the original indices of the kept query heads
and KV rows, the original config, the scores and the selection settings. A model whose
layers all keep the same layout is saved with that layout in ``config.json`` and also loads
with plain ``AutoModel*.from_pretrained``; otherwise ``config.json`` is the original config
and :func:`load_pruned` rebuilds the layout by pruning a fresh model the same way.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ..scores import HeadScores
from .adapters import get_adapter, head_counts, resolve_sites
from .prune import STATE_ATTR, kept_heads, prune_heads

__all__ = ["save_pruned", "load_pruned", "METADATA_FILE"]

METADATA_FILE = "headprune.json"
FORMAT = "headprune.pruned/1"
WEIGHTS_FILE = "model.safetensors"


def save_pruned(model, path, *, tokenizer=None, scores: Optional[HeadScores] = None, settings: Optional[dict] = None) -> None:
    """Write ``model`` (pruned or not) to the directory ``path``: safetensors weights, the
    config, the tokenizer if given, and ``headprune.json`` (kept heads, scores, settings)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    if scores is not None and not isinstance(scores, HeadScores):
        raise TypeError(f"scores: expected HeadScores or None, got {type(scores).__name__}")
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    state = getattr(model, STATE_ATTR, None)
    plain = state is None or bool(state.get("uniform"))
    os.makedirs(path, exist_ok=True)
    if plain:
        model.save_pretrained(path, safe_serialization=True)
    else:
        # The config cannot express this layout: write the original one (plain loading then
        # fails loudly on shapes) and the state dict under the module names, which
        # load_pruned maps onto a re-pruned fresh model (save_pretrained may rename keys).
        from safetensors.torch import save_model

        save_model(model, os.path.join(path, WEIGHTS_FILE))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(state["original_config"], f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    meta = {
        "format": FORMAT,
        "model_type": adapter.model_type,
        "architecture": type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "sites": [s.name for s in sites],
        "kept_heads": [kept_heads(model)[s.index] for s in sites],
        "kv_heads": None if state is None else state["kv"],
        "per_layer_bias": [] if state is None else state["per_layer_bias"],
        "plain_loadable": plain,
        "original_config": None if state is None else state["original_config"],
        "scores": None if scores is None else scores.to_dict(),
        "settings": settings or {},
    }
    with open(os.path.join(path, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def read_metadata(path) -> dict:
    file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"path: {path!r} has no {METADATA_FILE}; was it written by headprune.save_pruned?")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _weights(path) -> dict:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"path: no .safetensors weights in {path!r}")
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


def load_pruned(path, *, device: Optional[str] = None):
    """Rebuild the model saved by :func:`save_pruned`, bit-exactly, in eval mode."""
    import transformers

    meta = read_metadata(path)
    cls = getattr(transformers, meta["architecture"], None)
    if cls is None:
        raise ValueError(f"path: unknown architecture {meta['architecture']!r} in {METADATA_FILE}")
    dtype = getattr(torch, meta["dtype"])
    kw = dict(attn_implementation=meta["attn_implementation"], dtype=dtype)
    if meta["plain_loadable"]:
        model = cls.from_pretrained(path, **kw)
        if meta["original_config"] is not None:  # keep the record for further pruning/saving
            setattr(model, STATE_ATTR, _state_from(meta))
        return model.to(device).eval() if device else model.eval()
    config = transformers.AutoConfig.from_pretrained(path)
    config = type(config).from_dict(meta["original_config"])
    model = cls._from_config(config, **kw)
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    if len(sites) != len(meta["kept_heads"]):
        raise ValueError(f"path: {METADATA_FILE} lists {len(meta['kept_heads'])} sites, the model has {len(sites)}")
    removed = {}
    for s, kept in zip(sites, meta["kept_heads"]):
        keep = set(kept)
        removed[s.index] = [h for h in range(head_counts(s, adapter)[0]) if h not in keep]
    prune_heads(model, removed, _per_layer_bias=tuple(meta["per_layer_bias"]))
    _load_state(model, _weights(path))
    if device is not None:
        model.to(device)
    return model.eval()


def _state_from(meta) -> dict:
    return {
        "kept": meta["kept_heads"], "kv": meta["kv_heads"], "per_layer_bias": meta["per_layer_bias"],
        "original_config": meta["original_config"], "uniform": meta["plain_loadable"],
    }


def _load_state(model, state: dict) -> None:
    """Strict load, except for weights tied to a loaded one (``save_pretrained`` drops them)."""
    names: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {n for group in names.values() if len(group) > 1 and any(g in state for g in group) for n in group}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"path: saved weights do not match the rebuilt model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
