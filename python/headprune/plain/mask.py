"""Masking heads of ``nn.MultiheadAttention`` models (``out_proj`` input columns)."""

from __future__ import annotations

import torch
from torch import nn

from ..prune.heads import normalize_heads
from ..prune.mask import MaskHandle, refuse_masked_again
from .collect import attention_modules

__all__ = ["mask_modules"]


def mask_modules(model: nn.Module, heads: dict):
    """Zero the pruned heads' ``out_proj`` input columns (see ``headprune.hf.mask_heads``)."""
    sites = attention_modules(model)
    heads = normalize_heads(heads, [s[1].num_heads for s in sites])
    refuse_masked_again(model, heads, [s[1].out_proj.weight for s in sites])
    handle = MaskHandle(model, heads)
    try:
        with torch.no_grad():
            for layer, hs in heads.items():
                mha = sites[layer][1]
                handle.zero_(mha.out_proj.weight, hs, mha.num_heads, mha.head_dim, 1)
    except BaseException:
        handle.restore()
        raise
    return handle
