"""The recording attention function, registered in transformers' ``AttentionInterface``.

The function registered under ``headprune_<impl>`` calls the implementation the model would
have used (``sdpa``, the family's own ``eager_attention_forward``, ...) with the untouched
arguments, so outputs are bit-identical, and hands the call to the recorder of the
attention module, if a collection is active on it. The mask factory registered under the
same name is the original one, so the mask the model builds is exactly the one it would
have built. Registration lasts while a collection runs (refcounted across collections).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Optional

from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["PREFIX", "RECORDERS", "SiteConfig", "attention_implementation", "config_of", "model_configs",
           "registered_name", "release_name"]

PREFIX = "headprune_"

# id(attention module) -> recorder; the registered function is shared by every model, so
# it only records for modules inside an active collection, and only in the thread that runs
# that collection (a forward of the same model in another thread is left alone).
RECORDERS: dict = {}


def recorder_of(module):
    """The active recorder of ``module`` for the calling thread, or ``None``."""
    recorder = RECORDERS.get(id(module))
    return recorder if recorder is not None and recorder.thread == threading.get_ident() else None


def _inner_function(impl: str, module):
    if impl == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        # GPT-2's float32 path, which its forward takes only under the name "eager"
        return lambda m, query, key, value, mask, *args, **kwargs: m._upcast_and_reordered_attn(query, key, value, mask)
    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise NotImplementedError(f"{type(module).__name__}: no eager_attention_forward in its modeling file")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _make_wrapper(impl: str):
    def headprune_attention(module, query, key, value, attention_mask, *args, **kwargs):
        recorder = recorder_of(module)
        if recorder is not None:
            fused = recorder.attend(module, query, key, value, attention_mask, args, kwargs)
            if fused is not None:
                return fused
        out = _inner_function(impl, module)(module, query, key, value, attention_mask, *args, **kwargs)
        if recorder is not None:
            recorder.record(module, query, key, attention_mask, args, kwargs, out)
        return out

    return headprune_attention


_REGISTRY_LOCK = threading.Lock()
_REGISTRY_USERS: dict = {}  # wrapper name -> active collections using it
_REGISTRY_ADDED: dict = {}  # wrapper name -> the global mappings this module added it to


def registered_name(impl: str) -> str:
    """Register the recording wrapper of ``impl`` and its mask factory, for one user; every
    call is paired with :func:`release_name`, and the last release removes what was added."""
    name = PREFIX + impl
    with _REGISTRY_LOCK:
        if _REGISTRY_USERS.get(name, 0) == 0:
            added = []
            if name not in AttentionInterface._global_mapping:
                AttentionInterface.register(name, _make_wrapper(impl))
                added.append(AttentionInterface._global_mapping)
            mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl)
            if mask_fn is not None and name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
                AttentionMaskInterface.register(name, mask_fn)
                added.append(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
            _REGISTRY_ADDED[name] = added
        _REGISTRY_USERS[name] = _REGISTRY_USERS.get(name, 0) + 1
    return name


def release_name(name: str) -> None:
    """One user of ``name`` is done; the last one removes the entries it registered."""
    with _REGISTRY_LOCK:
        left = _REGISTRY_USERS.get(name, 0) - 1
        if left > 0:
            _REGISTRY_USERS[name] = left
            return
        _REGISTRY_USERS.pop(name, None)
        for mapping in _REGISTRY_ADDED.pop(name, []):
            mapping.pop(name, None)


class SiteConfig:
    """The config of a pruned attention module that reads its head counts from its config in
    ``forward`` (Phi-3): the given attributes are its own, every other one is read from the
    model's config as it is at that moment, so ``set_attn_implementation`` and a collection's
    switch of the implementation reach the module (a copy of the config would keep the old
    implementation)."""

    def __init__(self, base, **own):
        self.__dict__.update(own, base=_unwrapped(base))

    def __getattr__(self, name):  # only for names this config does not hold itself
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):  # half-built (unpickling, copying)
            raise AttributeError(name)
        return getattr(base, name)

    def __repr__(self) -> str:
        own = {k: v for k, v in self.__dict__.items() if k != "base"}
        return f"SiteConfig({own}, base={type(self.__dict__['base']).__name__})"


def config_of(module):
    """The model config behind ``module.config`` (through a :class:`SiteConfig`)."""
    return _unwrapped(module.config)


def _unwrapped(config):
    while isinstance(config, SiteConfig):
        config = config.__dict__["base"]
    return config


def model_configs(model) -> list:
    """Every distinct config object the model's modules read (T5's stacks hold copies)."""
    found, todo = {}, [getattr(m, "config", None) for m in model.modules()]
    while todo:
        c = todo.pop()
        if isinstance(c, PreTrainedConfig) and id(c) not in found:
            found[id(c)] = c
            todo.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}))
    return list(found.values())


@contextmanager
def attention_implementation(model, impl: Optional[str] = None):
    """Switch every config of ``model`` to the recording wrapper of its implementation (or
    of ``impl``); restores the originals on any exit."""
    configs = model_configs(model)
    saved = [(c, c._attn_implementation_internal) for c in configs]
    names = []
    try:
        for c, orig in saved:
            target = impl or orig or "eager"
            if target.startswith(PREFIX):
                raise RuntimeError("model: a headprune collection is already active on this model")
            names.append(registered_name(target))
            c._attn_implementation_internal = names[-1]
        yield
    finally:
        for c, orig in saved:
            c._attn_implementation_internal = orig
        for name in names:
            release_name(name)
