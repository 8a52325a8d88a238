"""Saving and reloading pruned models (safetensors + JSON, never pickles).

``headprune.json`` records, per attention site, the original indices of the kept query heads
and KV rows, the original config, the scores and the selection settings. A model whose
layers all keep the same layout is saved with that layout in ``config.json`` and also loads
with plain ``AutoModel*.from_pretrained``; otherwise ``config.json`` is the original config
and :func:`load_pruned` rebuilds the layout by pruning a fresh model the same way.
"""

from __future__ import annotations

import copy
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
from ..core.modules import check_module, compiled_over, uncompiled
from ..stats.scores import HeadScores
from .adapters import ADAPTERS, get_adapter, head_counts, resolve_sites
from .attention import model_configs
from .gates import refuse_gated
from .files import cast_as_stored, read_json, read_header, safetensors_files, stored_float_types
from .gguf_export import drop_gguf_quantizer
from .metadata import (DTYPES, FORMAT, METADATA_FILE, WEIGHTS_FILE, attention_to_load, check_save_arguments, model_class,
                       output_model, read_metadata, refuse_plain_loaded)
from .migrate import is_transformers4_pruned, obsolete, transformers4_metadata
from .pooling import sentence_files
from .prune import STATE_ATTR, check_config, kept_heads, new_state, prune_heads, refuse_records_elsewhere
from .records import set_record
from .saved import original_config, saved_layout, saves_offloaded
from .verify import (ORIGINAL_FACTOR, check_size, compare, config_from, expected_tensors, from_pretrained_checked,
                     meta_model, optional_modules, refuse_differences)
from .weights import check_device, load_generation_config, load_state, own_memory, read_weights

__all__ = ["save_pruned", "load_pruned", "read_metadata", "METADATA_FILE"]


def save_pruned(
    model, path, *, tokenizer=None, scores: Optional[HeadScores] = None, settings: Optional[dict] = None,
    overwrite: bool = False,
) -> None:
    """Write ``model`` (pruned or not; compiled: the model inside) to the directory ``path``:
    safetensors weights, the config, the tokenizer if given, and ``headprune.json`` (kept heads,
    scores, ``settings``: a dict of values strict JSON holds, no NaN or infinity). ``path`` must be new or empty unless ``overwrite`` (which replaces it); a symbolic link is
    refused, not followed. Everything is written to a temporary sibling directory that then
    takes ``path``'s place in one step (:class:`headprune.atomic.Staged`), so ``path`` holds
    the old directory or the new one at every instant, even if the process is killed; the
    model itself is never modified. A write error (a full disk, a file-size limit) raises
    ``OSError`` naming ``path`` and the cause.
    """
    atomic.check_replace(overwrite, "overwrite")
    check_module(model, meta=True)  # a meta model has no weights to write
    model = uncompiled(model)
    # a wrapper inside the model: its weights would be saved under _orig_mod. names no model of the family has
    if nested := [n for n, in_place in compiled_over(model, model.modules()) if n and not in_place]:
        raise ValueError(f"model: {nested[0]} is a torch.compile wrapper inside the model; save the model whose layers "
                         "are not wrapped (compile in place with module.compile(), or save before compiling)")
    refuse_records_elsewhere(model)
    refuse_gated(model, "save_pruned", why=", whose gates the saved weights do not hold")
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    if getattr(model, STATE_ATTR, None) is None:  # never pruned: the config it has is what the save writes
        refuse_plain_loaded(model, [head_counts(s, adapter)[0] for s in sites])  # (its record would be lost)
        check_config(model, [head_counts(s, adapter) for s in sites])
    check_save_arguments(path, tokenizer, scores, settings, adapter, sites)
    if any(p.is_meta for p in model.parameters()) and not saves_offloaded(model, adapter, sites):
        raise ValueError("model: has weights accelerate offloaded (on the meta device here), which this save would "
                         "write from memory; load the model without disk or CPU offload to save it")
    path = atomic.check_target(path, replace=overwrite, arg="path", hint="pass overwrite=True to replace it")
    try:
        with atomic.Staged(path, replace=overwrite) as stage, _configs_restored(model), _gguf_quantizer_aside(model):
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


#: written into a directory that ``from_pretrained`` cannot read (heads differ between layers,
#: or output-projection biases the family's config cannot declare)
_NOT_PLAIN_README = """# A {arch} with attention heads removed by headprune

Its layers keep different numbers of heads (or a number its config's validation refuses, or
output-projection biases its config cannot declare, or, in T5, other heads in layers sharing one
relative-position table), which a transformers config cannot express, so its weights are in
`{weights}`, a name `from_pretrained` does not read (it stops: no model weights file). Load
it with headprune:

```python
import headprune
model = headprune.load_pruned("this/directory")
```

or from the command line: `headprune eval this/directory`. `headprune.json` lists the kept
heads of every layer (original indices); `config.json` is the unpruned model's.
"""


def _write(model, path, adapter, sites, tokenizer, scores, settings) -> None:
    state, declare, plain = saved_layout(model, adapter, sites)
    original = None if state is None else original_config(model, state, adapter)
    if plain:
        with _declared_biases(model, sites, adapter, declare):
            model.save_pretrained(path, safe_serialization=True)
    else:
        # The config cannot express this layout: the original config and the state dict under another file name
        # (plain loading finds no weights), which load_pruned maps onto a re-pruned model (save_pretrained renames keys).
        from safetensors.torch import save_model

        save_model(model, os.path.join(path, WEIGHTS_FILE))
        config = dict(original)  # a model read from a GGUF names no architecture
        config["architectures"] = config.get("architectures") or [type(model).__name__]
        config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")  # as save_pretrained writes it
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():  # sampling settings, as save_pretrained keeps them
            generation.save_pretrained(path)
        with open(os.path.join(path, "README.md"), "w") as f:
            f.write(_NOT_PLAIN_README.format(arch=type(model).__name__, weights=WEIGHTS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    sentence_files(model, path)  # the sentence-transformers pipeline of the directory it was read from
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
        # declared biases are the config's own: the original model is recorded with them
        "o_bias": [] if state is None or declare else state.get("o_bias", []),
        "plain_loadable": plain,
        "original_config": {**original, declare: True} if declare else original,
        "scores": None if scores is None else scores.to_dict(),
        "settings": settings or {},
    }
    with open(os.path.join(path, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=2)


@contextmanager
def _declared_biases(model, sites, adapter, flag):
    """With ``flag`` (the family's config switch for attention biases, see
    ``Adapter.config_bias``): while saving, the configs set it and every q/k/v/o projection
    without a bias has a zero one, so ``from_pretrained`` builds the biases the compensation
    needs and the function is unchanged. Removed again on exit (the configs are restored by
    :func:`_configs_restored`)."""
    added = []
    try:
        if flag is not None:
            for cfg in model_configs(model):
                setattr(cfg, flag, True)
            for s in sites:
                for name in (s.block.q, s.block.k, s.block.v, s.block.o):
                    lin = s.sub(name)
                    if getattr(lin, "bias", None) is None:
                        lin.bias = torch.nn.Parameter(lin.weight.new_zeros(lin.weight.shape[0]), requires_grad=False)
                        added.append(lin)
        yield
    finally:
        for lin in added:
            lin.bias = None


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


@contextmanager
def _gguf_quantizer_aside(model):
    """transformers keeps a GGUF quantizer on a model it read from a GGUF, whose weights are
    plain floats: ``save_pretrained`` refuses it, and a saved config would ask for a GGUF file.
    Set aside while the model is written (the config under :func:`_configs_restored`)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        yield
        return
    held = drop_gguf_quantizer(model)
    state = getattr(model, STATE_ATTR, None)  # the original config a pruning recorded, read with the quantizer
    original = state and state.get("original_config")
    if original and "quantization_config" in original:
        state["original_config"] = {k: v for k, v in original.items() if k != "quantization_config"}
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        model.__dict__.update(held)
        if original:
            state["original_config"] = original


def _check_kept(meta, sites, adapter, file) -> None:
    """Each site's ``kept_heads`` must be indices of the model's original heads."""
    kept = meta["kept_heads"]
    if len(kept) != len(sites):
        raise ValueError(f"path: {file} lists {len(kept)} sites' kept_heads, the model has {len(sites)}")
    for s, k in zip(sites, kept):
        n = head_counts(s, adapter)[0]
        if k and k[-1] >= n:
            raise ValueError(f"path: {file} kept_heads of site {s.name} is {k!r}; "
                             f"expected increasing indices below {n}")


def _check_sites(meta, sites, adapter, file) -> None:
    """``sites`` and ``per_layer_bias`` name the model's sites and blocks."""
    names = [s.name for s in sites]
    if meta.get("sites", names) != names:
        raise ValueError(f"path: {file} lists sites {meta['sites'][:6]}, the model has {names[:6]}")
    blocks = sorted({f"{b.stack}.{b.kind}" for b in adapter.blocks}) if adapter.shared_position_bias else []
    bad = [b for b in meta["per_layer_bias"] if b not in blocks]
    if bad:
        raise ValueError(f"path: {file} has per_layer_bias {bad}; the model's blocks with a shared position bias "
                         f"are {blocks}")


def _check_counts(meta, model, file) -> None:
    """The loaded weights hold as many heads per site as ``headprune.json`` lists (all of them,
    in order, for a model saved unpruned)."""
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    if len(sites) != len(meta["kept_heads"]):
        raise ValueError(f"path: {file} lists {len(meta['kept_heads'])} sites, the model has {len(sites)}")
    _check_sites(meta, sites, adapter, file)
    for s, kept in zip(sites, meta["kept_heads"]):
        hq, hkv = head_counts(s, adapter)
        kv = None if meta["kv_heads"] is None else len(meta["kv_heads"][s.index])
        if hq != len(kept) or (kv is not None and hkv != kv):
            raise ValueError(
                f"path: {file} lists {len(kept)} query / {kv} KV heads for site {s.name}, the weights hold {hq} / {hkv}"
            )
        if meta["original_config"] is None and kept != list(range(hq)):
            raise ValueError(f"path: {file} kept_heads of site {s.name} is {kept!r} without an original_config; "
                             f"an unpruned model keeps {list(range(hq))}")


def _directory(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path!r} is not a directory")
    return path


def load_pruned(path, *, device: Optional[str] = None, attn_implementation: Optional[str] = None):
    """Rebuild the model saved by :func:`save_pruned`, bit-exactly, in eval mode: every saved
    tensor as it was. Buffers a model does not save are rebuilt as transformers builds them (a
    rotary model cast to bfloat16 before saving computed with a bfloat16 ``inv_freq``, rebuilt in
    float32: a tiny Llama's bfloat16 logits differed by 2e-3, as after plain ``save_pretrained`` and
    ``from_pretrained``).

    A directory that transformers 4 pruned (``config.json`` with ``pruned_heads``) is read too, into
    the model headprune's pruning of those heads gives (:mod:`.migrate`); a folder ``headprune prune``
    or ``recover`` wrote, as its ``model/``. ``device``: where the model goes (not ``meta``).
    Nothing in the directory is trusted. ``headprune.json`` is checked field by field; the
    model it declares is built on the meta device and compared tensor by tensor with the
    safetensors headers before anything is allocated; weights are read from safetensors only
    and transformers gets local files and local attention code only. A damaged directory
    raises ``ValueError`` (``FileNotFoundError`` for a missing file) naming what is wrong.
    ``attn_implementation``: the attention to build the model with (default: the one it was saved
    with, or ``sdpa``, with a warning, where that one does not run here).
    """
    path = _directory(path)
    path = output_model(path) or path  # a folder headprune prune or recover wrote: its model
    if device is not None:
        check_device(device)
    if is_transformers4_pruned(path):  # config.json's pruned_heads: read as headprune.json would say
        meta, file = transformers4_metadata(path), os.path.join(path, "config.json")
    else:
        meta, file = read_metadata(path), os.path.join(path, METADATA_FILE)
    cls = model_class(meta, "path", file)
    adapter = ADAPTERS[cls.config_class.model_type]
    plain = meta["plain_loadable"]
    files = safetensors_files(path, "path", None if plain or file.endswith("config.json") else WEIGHTS_FILE)
    header = read_header(files, "path")
    weights = files[0] if len(files) == 1 else f"the {len(files)} weight shards in {path}"
    kw = dict(attn_implementation=attention_to_load(meta, attn_implementation, file, cls), dtype=DTYPES[meta["dtype"]])
    kw.update(optional_modules(cls, adapter, header))
    original = kv = heads = None
    if meta["original_config"] is not None:
        source = f"{file}'s original_config"
        original = config_from(cls.config_class, meta["original_config"], len(header), "path", source)
        kv, heads = _check_rebuild(cls, original, meta, adapter, kw, header, (file, weights))
    if plain:
        config_file = os.path.join(path, "config.json")
        config = config_from(cls.config_class, read_json(config_file, "path"), len(header), "path", config_file)
        types = stored_float_types(files)  # mixed (float32 norms beside bfloat16 weights): read wide, cast each back
        mixed = len(set(types.values())) > 1
        if not mixed and set(types.values()) - {meta["dtype"]} and not file.endswith("config.json"):
            stored = next(iter(types.values()))
            raise ValueError(f"path: {file} records dtype {meta['dtype']}, but {weights} hold {stored}")
        wide = {"dtype": torch.float64 if "float64" in types.values() else torch.float32} if mixed else {}
        model = from_pretrained_checked(cls, path, config, header, "path", config_file, weights, strict=True,
                                        **{**kw, **wide})
        if mixed:
            cast_as_stored(model, types)
        own_memory(model)
        _check_counts(meta, model, file)
    if kv is not None and kv != meta["kv_heads"]:
        raise ValueError(f"path: {file} has kv_heads {str(meta['kv_heads'])[:80]}; pruning the original "
                         f"model to its kept_heads gives {str(kv)[:80]}")
    if plain:
        if original is not None:  # keep the record for further pruning/saving (original indices)
            set_record(model, {**_state_from(meta), "num_heads": heads}, resolve_sites(model, adapter))
    else:
        # _check_rebuild built from a copy: original is still the config as read
        model = _prune_as_saved(cls._from_config(original, **kw), meta, adapter, file)
        state = {}
        for f in files:  # a transformers 4 directory may hold its weights in shards
            state.update(read_weights(f))
        load_state(model, {k: v for k, v in state.items() if k in header})
        load_generation_config(model, path)
    return model.to(device).eval() if device else model.eval()


def _check_rebuild(cls, config, meta, adapter, kw, header, files) -> list:
    """On the meta device: the original model is no larger than the weights allow and, pruned
    to the kept heads, names its sites as ``headprune.json`` does and (for a directory only
    load_pruned reads) holds exactly the weights' tensors. Returns its KV rows and its original
    query-head counts per site. ``files``: the names of headprune.json and of the weights, for
    messages; the buffers of a transformers 4 directory that transformers 5 ignores are taken out
    of ``header``. ``config`` is not changed (pruning a uniform layout writes the new counts into
    the model's config, so the model is built from a copy)."""
    file, weights = files
    source = f"{file}'s original_config"
    model = meta_model(lambda: cls._from_config(copy.deepcopy(config), **kw), len(header), "path", source)
    check_size(model, header, "path", source, factor=ORIGINAL_FACTOR)
    model = _prune_as_saved(model, meta, adapter, file)
    if not meta["plain_loadable"]:
        expected, tied = expected_tensors(model, saved_names=False)
        for name in obsolete(cls, header, expected) if file.endswith("config.json") else ():
            del header[name]  # a buffer transformers 4 saved: not loaded (as transformers 5 ignores it)
        described = ("the model config.json describes (its pruned_heads removed)" if file.endswith("config.json")
                     else f"the model {METADATA_FILE} describes (original_config pruned to kept_heads)")
        refuse_differences(compare(expected, tied, header), "path", weights, described)
    state = getattr(model, STATE_ATTR)
    return state["kv"], state["num_heads"]


def _prune_as_saved(model, meta, adapter, file):
    """``model`` (built from the original config) pruned to the layout ``headprune.json`` (``file``) records."""
    sites = resolve_sites(model, adapter)
    _check_kept(meta, sites, adapter, file)
    _check_sites(meta, sites, adapter, file)
    counts = [head_counts(s, adapter) for s in sites]
    removed = {s.index: sorted(set(range(c[0])) - set(kept)) for s, c, kept in zip(sites, counts, meta["kept_heads"])}
    prune_heads(model, removed, _per_layer_bias=tuple(meta["per_layer_bias"]), _from_config=True)
    state = getattr(model, STATE_ATTR, None) or new_state(model, counts, from_config=True)  # no head removed
    set_record(model, state, sites)
    for layer in meta["o_bias"]:  # compensation biases (see prune_heads)
        o = sites[layer].o
        o.bias = torch.nn.Parameter(o.weight.new_zeros(o.weight.shape[1 if adapter.conv1d else 0]))
        state["o_bias"] = sorted({*state.get("o_bias", []), layer})
    return model


def _state_from(meta) -> dict:
    return {
        "kept": meta["kept_heads"], "kv": meta["kv_heads"], "per_layer_bias": meta["per_layer_bias"],
        "o_bias": meta["o_bias"], "original_config": meta["original_config"], "uniform": meta["plain_loadable"],
    }
