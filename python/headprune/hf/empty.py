"""The forward of an attention site with no head left: it adds only the output projection's
bias, still records its tokens in a KV cache, and returns an attention map with no head."""

from __future__ import annotations

import torch
from transformers import Cache

__all__ = ["empty_forward", "headless_kv"]


def empty_forward(kind, o, conv1d, module, cross, *args, **kwargs):
    """Forward of a site with no head left: attention adds only the o bias (if any)."""
    x = args[0] if args else kwargs["hidden_states"]
    cache = kwargs.get("cache")
    _advance_cache(module, cache, x, cross)
    weights = _no_weights(module, x, cross, cache, kwargs)
    if kind == "context":  # BERT-like: the o projection lives in the parent
        return x.new_zeros(*x.shape[:-1], 0), weights
    out = x.new_zeros(*x.shape[:-1], o.weight.shape[1 if conv1d else 0])
    out = out if getattr(o, "bias", None) is None else out + o.bias
    if kind == "output_position_bias":
        return out, kwargs.get("position_bias"), weights
    return out, weights


def _no_weights(module, x, cross: bool, cache, kwargs) -> torch.Tensor:
    """The attention weights of a site with no head left, ``[batch, 0, queries, keys]``: a map
    of its own in ``output_attentions``, where ``None`` would drop the layer from the tuple and
    shift every later layer's map to its index."""
    mask, other = kwargs.get("attention_mask"), kwargs.get("encoder_hidden_states", kwargs.get("key_value_states"))
    keys = x.shape[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        keys = mask.shape[-1]
    elif cross and isinstance(other, torch.Tensor):
        keys = other.shape[1]
    elif not cross and cache is not None and getattr(module, "layer_idx", None) is not None:
        cache = getattr(cache, "self_attention_cache", cache)
        if callable(getattr(cache, "get_seq_length", None)):
            keys = max(keys, int(cache.get_seq_length(module.layer_idx)))
    return x.new_zeros(x.shape[0], 0, x.shape[1], keys)


def _advance_cache(module, cache, x, cross: bool) -> None:
    """A self-attention with no head left still records its tokens in the KV cache, as one
    zero per token for keys and values (a cache layer with no element counts no token):
    transformers reads the cache's length (where the next tokens' positions start) from its
    first layer, so a first layer without heads made every cached decode step start at 0."""
    # a paged cache (continuous batching) takes positions from its scheduler, not from a layer
    if not isinstance(cache, Cache) or getattr(module, "layer_idx", None) is None:
        return
    if hasattr(cache, "self_attention_cache"):  # an encoder-decoder's: only its self-attention counts
        if cross:
            return
        cache = cache.self_attention_cache
    empty = headless_kv(x.shape[0], x.shape[1], x)
    cache.update(empty, empty, module.layer_idx)


def headless_kv(batch: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
    """What a self-attention with no head left keeps in a KV cache for keys and for values: one
    zero per token (``like``'s type and device), so the cache counts its tokens."""
    return like.new_zeros(batch, 1, tokens, 1)
