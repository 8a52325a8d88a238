"""The configs of a pruned model: whether one layout can be written into them, and writing it
(each model its own copy of the config objects, so another model built from the same object
keeps its head counts)."""

from __future__ import annotations

import copy

from transformers import PreTrainedConfig

from .adapters import head_dim
from .attention import SiteConfig

__all__ = ["config_accepts", "layout_fields", "update_configs"]


def config_accepts(config, adapter, hq, hkv, d) -> bool:
    """Whether transformers' own validation accepts the pruned counts (e.g. Llama insists on
    ``hidden_size % num_attention_heads == 0`` even with an explicit ``head_dim``)."""
    trial = copy.deepcopy(config)
    trial.num_attention_heads = hq
    setattr(trial, adapter.config_head_dim, d)
    if adapter.config_kv_heads:
        setattr(trial, adapter.config_kv_heads, hkv)
    try:
        getattr(trial, "validate", lambda: None)()
    except Exception:  # any validator failure just means "not expressible"
        return False
    return True


def update_configs(undo, model, sites, adapter, state) -> bool:
    """Write the new head counts into the configs when one layout fits every layer (so
    ``AutoModel.from_pretrained`` rebuilds it); returns whether it did."""
    layouts = {(len(k), len(kv)) for k, kv in zip(state["kept"], state["kv"])}
    d = {head_dim(s, adapter) for s in sites}
    if adapter.config_head_dim is None or len(layouts) != 1 or len(d) != 1 or state["per_layer_bias"]:
        return False
    (hq, hkv), (d,) = layouts.pop(), d
    if hq == 0 or not config_accepts(model.config, adapter, hq, hkv, d):
        return False
    _own_configs(undo, model)
    configs = {id(model.config): model.config}
    configs.update({id(s.module.config): s.module.config for s in sites if hasattr(s.module, "config")})
    for cfg in configs.values():
        for field, value in zip(layout_fields(adapter), (hq, d, hkv)):
            undo.set(cfg, field, value)
    return True


def layout_fields(adapter) -> tuple:
    """The config fields :func:`update_configs` writes: query heads, head size and, on grouped-query
    families, KV heads."""
    return ("num_attention_heads", adapter.config_head_dim) + ((adapter.config_kv_heads,) if adapter.config_kv_heads
                                                               else ())


def _own_configs(undo, model) -> None:
    """Point every module of ``model`` that reads a config at a copy of it (one per object):
    ``from_config(cfg)`` twice gives two models one config object, which a pruning of one would
    edit for both (a teacher then read the student's head counts)."""
    copies = {}
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if isinstance(cfg, SiteConfig):  # a pruned module's own counts over the model's config (see SiteConfig)
            base = cfg.__dict__["base"]
            undo.set(cfg, "base", copies.setdefault(id(base), copy.deepcopy(base)))
        elif isinstance(cfg, PreTrainedConfig):
            undo.set(module, "config", copies.setdefault(id(cfg), copy.deepcopy(cfg)))
