"""Saving and reloading pruned models (safetensors + JSON, never pickles).

``headprune.json`` records, per attention site, the original indices of the kept query heads
and KV rows, the original config, the scores and the selection settings. A model whose
layers all keep the same layout is saved with that layout in ``config.json`` and also loads
with plain ``AutoModel*.from_pretrained``; otherwise ``config.json`` is the original config
and :func:`load_pruned` rebuilds the layout by pruning a fresh model the same way.
"""

from __future__ import annotations

import errno
import json
import os
import re
from contextlib import contextmanager
from typing import Optional

import torch
from safetensors import SafetensorError
from transformers import PreTrainedConfig

from .. import atomic
from ..prune.mask import added_bias
from ..stats.scores import HeadScores
from .adapters import get_adapter, head_counts, resolve_sites
from .prune import STATE_ATTR, kept_heads, new_state, prune_heads

__all__ = ["save_pruned", "load_pruned", "METADATA_FILE"]

METADATA_FILE = "headprune.json"
FORMAT = "headprune.pruned/1"
#: weights of a directory only load_pruned can rebuild; not the name from_pretrained looks for,
#: so plain loading fails loudly instead of loading a wrong layout or dropping weights
WEIGHTS_FILE = "headprune-model.safetensors"


def save_pruned(
    model, path, *, tokenizer=None, scores: Optional[HeadScores] = None, settings: Optional[dict] = None,
    overwrite: bool = False,
) -> None:
    """Write ``model`` (pruned or not) to the directory ``path``: safetensors weights, the
    config, the tokenizer if given, and ``headprune.json`` (kept heads, scores, settings).

    ``path`` must be new or empty unless ``overwrite`` (which replaces it); a symbolic link is
    refused, not followed. Everything is written to a temporary sibling directory that then
    takes ``path``'s place in one step (:class:`headprune.atomic.Staged`), so ``path`` holds
    the old directory or the new one at every instant, even if the process is killed; the
    model itself is never modified. A write error (a full disk, a file-size limit) raises
    ``OSError`` naming ``path`` and the cause.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    if scores is not None and not isinstance(scores, HeadScores):
        raise TypeError(f"scores: expected HeadScores or None, got {type(scores).__name__}")
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    path = atomic.check_target(path, replace=overwrite, arg="path", hint="pass overwrite=True to replace it")
    try:
        with atomic.Staged(path, replace=overwrite) as stage, _configs_restored(model):
            _write(model, stage.path, adapter, sites, tokenizer, scores, settings)
    except (OSError, SafetensorError) as e:
        raise _write_error(e, path) from e


def _write_error(e: Exception, path: str) -> OSError:
    """The ``OSError`` of a failed write, naming ``path``; safetensors reports its I/O errors
    as ``SafetensorError("... I/O error: No space left on device (os error 28)")``."""
    if isinstance(e, OSError):
        code, cause = e.errno, e.strerror or str(e)
    else:
        m = re.search(r"(?:I/O error: )?([^:]*?) \(os error (\d+)\)", str(e))
        code, cause = (int(m[2]), m[1]) if m else (errno.EIO, str(e))
    message = f"path: cannot write {path} ({cause})"
    return OSError(code, message) if code else OSError(message)


def _write(model, path, adapter, sites, tokenizer, scores, settings) -> None:
    state = getattr(model, STATE_ATTR, None)
    masked_bias = [s.index for s in sites if added_bias(model, s.o)]
    if masked_bias:  # a compensated mask created o biases: record them like pruning does
        state = new_state(model, [head_counts(s, adapter) for s in sites])
        state["o_bias"] = sorted({*state.get("o_bias", []), *masked_bias})
    # an output-projection bias the family's config cannot declare would be dropped by
    # from_pretrained (with only a warning): such a model is not plain-loadable
    plain = state is None or (bool(state.get("uniform")) and not state.get("o_bias"))
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
        "o_bias": [] if state is None else state.get("o_bias", []),
        "plain_loadable": plain,
        "original_config": None if state is None else state["original_config"],
        "scores": None if scores is None else scores.to_dict(),
        "settings": settings or {},
    }
    with open(os.path.join(path, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=2)


@contextmanager
def _configs_restored(model):
    """``save_pretrained`` writes ``architectures`` and ``dtype`` into the live config; the
    saved files need them, the caller's model should not change."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if isinstance(c, PreTrainedConfig)}
    saved = [(c, dict(c.__dict__)) for c in configs.values()]
    try:
        yield
    finally:
        for c, d in saved:
            c.__dict__.clear()
            c.__dict__.update(d)


_REQUIRED = ("architecture", "dtype", "attn_implementation", "kept_heads", "kv_heads", "per_layer_bias",
             "plain_loadable", "original_config")


def read_metadata(path) -> dict:
    file = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"path: {path!r} has no {METADATA_FILE}; was it written by headprune.save_pruned?")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"path: {file} is not valid JSON ({e}); was it written by headprune.save_pruned?") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"path: {file} has format {found!r}, expected {FORMAT!r}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"path: {file} lacks {missing}; was it written by headprune.save_pruned?")
    o_bias = meta.setdefault("o_bias", [])
    n = len(meta["kept_heads"]) if isinstance(meta["kept_heads"], list) else 0
    if not isinstance(o_bias, list) or not all(type(i) is int and 0 <= i < n for i in o_bias):
        raise ValueError(f"path: {file} has o_bias {o_bias!r}; expected site indices below {n}")
    return meta


def _check_kept(meta, sites, adapter) -> None:
    """Each site's ``kept_heads`` must be increasing indices of the model's original heads."""
    kept = meta["kept_heads"]
    if not isinstance(kept, list) or len(kept) != len(sites):
        n = len(kept) if isinstance(kept, list) else kept
        raise ValueError(f"path: {METADATA_FILE} lists {n} sites' kept_heads, the model has {len(sites)}")
    for s, k in zip(sites, kept):
        n = head_counts(s, adapter)[0]
        ok = isinstance(k, list) and all(type(h) is int and 0 <= h < n for h in k) and k == sorted(set(k))
        if not ok:
            raise ValueError(
                f"path: {METADATA_FILE} kept_heads of site {s.name} is {k!r}; expected increasing indices below {n}"
            )


def _check_counts(meta, model) -> None:
    """The loaded weights hold as many heads per site as ``headprune.json`` lists."""
    adapter = get_adapter(model)
    for s, kept in zip(resolve_sites(model, adapter), meta["kept_heads"]):
        hq, hkv = head_counts(s, adapter)
        kv = None if meta["kv_heads"] is None else len(meta["kv_heads"][s.index])
        if hq != len(kept) or (kv is not None and hkv != kv):
            raise ValueError(
                f"path: {METADATA_FILE} lists {len(kept)} query / {kv} KV heads for site {s.name}, "
                f"the weights hold {hq} / {hkv}"
            )


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
        if len(resolve_sites(model)) != len(meta["kept_heads"]):
            raise ValueError(f"path: {METADATA_FILE} lists {len(meta['kept_heads'])} sites, the model has {len(resolve_sites(model))}")
        _check_counts(meta, model)
        if meta["original_config"] is not None:  # keep the record for further pruning/saving
            setattr(model, STATE_ATTR, _state_from(meta))
        return model.to(device).eval() if device else model.eval()
    config = transformers.AutoConfig.from_pretrained(path)
    config = type(config).from_dict(meta["original_config"])
    model = cls._from_config(config, **kw)
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    _check_kept(meta, sites, adapter)
    removed = {}
    for s, kept in zip(sites, meta["kept_heads"]):
        keep = set(kept)
        removed[s.index] = [h for h in range(head_counts(s, adapter)[0]) if h not in keep]
    prune_heads(model, removed, _per_layer_bias=tuple(meta["per_layer_bias"]))
    state = getattr(model, STATE_ATTR)
    for layer in meta.get("o_bias", []):  # compensation biases (see prune_heads)
        o = sites[layer].o
        o.bias = torch.nn.Parameter(o.weight.new_zeros(o.weight.shape[1 if adapter.conv1d else 0]))
        state["o_bias"] = sorted({*state.get("o_bias", []), layer})
    _load_state(model, _weights(path))
    if device is not None:
        model.to(device)
    return model.eval()


def _state_from(meta) -> dict:
    return {
        "kept": meta["kept_heads"], "kv": meta["kv_heads"], "per_layer_bias": meta["per_layer_bias"],
        "o_bias": meta.get("o_bias", []),
        "original_config": meta["original_config"], "uniform": meta["plain_loadable"],
    }


def _load_state(model, state: dict) -> None:
    """Strict load, except for weights tied to a loaded one (``save_pretrained`` drops them)."""
    names: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {n for group in names.values() if len(group) > 1 and any(g in state for g in group) for n in group}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatch: headprune.json's heads are not the weights' heads
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ValueError(f"path: saved weights do not match the heads in {METADATA_FILE} ({detail})") from None
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"path: saved weights do not match the rebuilt model (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
