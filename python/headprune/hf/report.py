"""Parameter counts and attention FLOPs of a model, before and after pruning."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ranking.units import count_arg
from .adapters import get_adapter, head_counts, head_dim, resolve_sites
from .speed import max_positions

__all__ = ["PruneReport", "measure", "attention_flops_per_token"]

#: context length at which the per-token attention FLOPs are quoted by default
DEFAULT_CONTEXT = 1024


def parameter_count(model) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def attention_flops_per_token(model, context: int = DEFAULT_CONTEXT) -> int:
    """Multiply-adds x 2 per token in all attention blocks: the q/k/v/o projections plus the
    score and value products against ``context`` keys."""
    context = count_arg("context", context, "a non-negative int", minimum=0)
    adapter = get_adapter(model)
    total = 0
    for site in resolve_sites(model, adapter):
        hq, hkv = head_counts(site, adapter)
        d = head_dim(site, adapter)
        hidden = site.o.weight.shape[1 if adapter.conv1d else 0]
        total += 2 * hidden * d * (2 * hq + 2 * hkv) + 4 * hq * d * context
    return total


def _cache_windows(model, n: int) -> list:
    """Per causal self-attention site (``n`` of them, in order), the window a generating model's
    KV cache keeps of it, as transformers builds the cache from the config (sliding and chunked
    layers), or ``None`` where it grows with every token."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    except (ImportError, AttributeError, TypeError, ValueError):  # another transformers: every layer grows
        return [None] * n
    if len(types) != n:
        return [None] * n
    return [k.get("sliding_window") if t in ("sliding_attention", "chunked_attention") else None
            for t, k in zip(types, kwargs)]


def _kv_bytes(model, adapter, sites, counts, width: int) -> tuple:
    """``(bytes the KV cache grows by per token past every window, causal sites whose cache a
    window keeps, bytes their caches grow by per token until their windows fill)``: keys and
    values of each causal self-attention site, one zero each per token for a site with no head
    left (see ``headprune.hf.empty``); ``None`` without a causal site (or a windowed one)."""
    causal = [(s, c) for s, c in zip(sites, counts) if s.block.causal]
    if not causal:
        return None, 0, None
    windows = _cache_windows(model, len(causal))
    per = [2 * width * (c[1] * head_dim(s, adapter) if c[1] else 1) for s, c in causal]
    windowed = [b for b, w in zip(per, windows) if w is not None]
    return sum(b for b, w in zip(per, windows) if w is None), len(windowed), sum(windowed) if windowed else None


def measure(model, context: int = DEFAULT_CONTEXT, dtype=None) -> dict:
    """Head counts, parameters, attention FLOPs per token at ``context`` (at most the model's
    positions) and the bytes the KV cache of a generating model grows by per token, in ``dtype``
    (default: the model's own float type), so that two models held in different types compare at
    one type. Layers whose cache a sliding window keeps (Mistral, Qwen2's upper layers, Gemma 2's
    local layers) stop growing at the window, so they are left out of that figure and counted in
    ``kv_cache_window_sites``; ``kv_cache_window_bytes_per_token`` is what their caches grow
    by per token until then."""
    context = count_arg("context", context)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a torch float type (torch.float16, say) or None, got {dtype!r}")
    adapter = get_adapter(model)
    sites = resolve_sites(model, adapter)
    counts = [head_counts(s, adapter) for s in sites]
    dtype = dtype or next(model.parameters()).dtype
    context = min(context, max_positions(model, context))  # what it can take
    kv_bytes, windowed, window_bytes = _kv_bytes(model, adapter, sites, counts, dtype.itemsize)
    return {
        "parameters": parameter_count(model),
        "attention_flops_per_token": attention_flops_per_token(model, context),
        "context": context,
        "query_heads": sum(c[0] for c in counts),
        "kv_heads": sum(c[1] for c in counts),
        "kv_cache_bytes_per_token": kv_bytes,  # None without a causal site
        "kv_cache_window_sites": windowed,
        "kv_cache_window_bytes_per_token": window_bytes,  # theirs, until each one's window fills
        "kv_cache_dtype": str(dtype).removeprefix("torch."),
    }


@dataclass
class PruneReport:
    """What :func:`prune_heads` changed (``before`` / ``after`` from :func:`measure`)."""

    before: dict
    after: dict
    #: ``{site: [original head indices]}`` this call removed
    removed: dict = field(default_factory=dict)
    #: heads asked for that an earlier pruning had already removed (ignored)
    already_removed: dict = field(default_factory=dict)

    @property
    def parameters_removed(self) -> int:
        return self.before["parameters"] - self.after["parameters"]

    @property
    def flops_ratio(self) -> float:
        return self.after["attention_flops_per_token"] / max(1, self.before["attention_flops_per_token"])

    def to_dict(self) -> dict:
        return {"before": self.before, "after": self.after, "removed": {str(k): v for k, v in self.removed.items()},
                "already_removed": {str(k): v for k, v in self.already_removed.items()}}

    def __str__(self) -> str:
        b, a = self.before, self.after
        return (
            f"query heads {b['query_heads']} -> {a['query_heads']}, KV heads {b['kv_heads']} -> {a['kv_heads']}, "
            f"parameters {b['parameters']:,} -> {a['parameters']:,}, attention FLOPs/token "
            f"(context {a['context']}) {b['attention_flops_per_token']:,} -> {a['attention_flops_per_token']:,}"
        )
